"""The `mpskernels` command: `mpskernels info` and `mpskernels bench`."""
import argparse
import sys


def _progress(done, total, name):
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:40s}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpskernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="CPU features, the instruction set in use, threads")
    bench = sub.add_parser("bench", help="time the kernels against NumPy on this machine")
    bench.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                       help="thread counts to run (default: 1 2)")
    bench.add_argument("--min-time", type=float, default=0.25, help="seconds per measurement")
    args = parser.parse_args(argv)

    import mpskernels
    if args.command == "info":
        info = mpskernels.cpu_info()
        found = [name for name, present in info["features"].items() if present]
        print(f"cpu:         {info['name']}")
        print(f"features:    {' '.join(found) or 'none detected'}")
        print(f"isa:         {info['isa']} (best supported: {info['best_isa']}; "
              f"MPSKERNELS_MAX_ISA={info['max_isa'] or 'unset'})")
        print(f"threads:     {info['num_threads']} (CPUs in affinity mask: {info['affinity_cpus']})")
        print(f"version:     {mpskernels.__version__}")
        return 0
    from mpskernels import bench as b
    rows = b.run(tuple(args.threads), progress=_progress,
                 min_time=args.min_time)
    print(b.format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
