"""The `mpskernels` command: `info`, `bench`, `package` (ONNX -> .mpkg) and `run` (a model)."""
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
    package = sub.add_parser("package", help="build an .mpkg package from an ONNX model (needs onnx)")
    package.add_argument("model", help="MODEL.onnx")
    package.add_argument("-o", "--output", help="output path (default: MODEL.mpkg)")
    run = sub.add_parser("run", help="run an .onnx or .mpkg model: outputs, latency, memory plan")
    run.add_argument("model", help="MODEL.onnx or MODEL.mpkg")
    run.add_argument("--input", action="append", default=[],
                     help="an .npy file per input, in order, or NAME=FILE.npy (default: seeded random data)")
    run.add_argument("--output", help="save the first output (.npy), or all outputs (.npz)")
    run.add_argument("--batch", type=int, default=1, help="the size of free dimensions of random inputs (default 1)")
    run.add_argument("--repeat", type=int, default=10, help="timed runs (default 10)")
    run.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    args = parser.parse_args(argv)
    if args.command == "package":
        return _package(args)
    if args.command == "run":
        return _run(args)

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


def _package(args):
    import os
    from mpskernels.ml_package import build_package
    out = args.output or os.path.splitext(args.model)[0] + ".mpkg"
    net = build_package(args.model, out)
    print(f"{out}: {len(net.nodes)} nodes, {len(net.inputs)} inputs, {len(net.outputs)} outputs, "
          f"{os.path.getsize(out)} bytes")
    return 0


def _run(args):
    import time

    import numpy as np

    from mpskernels.ml import Session
    session = Session(args.model, num_threads=args.threads)
    inputs, named = {}, {}
    for spec in args.input:
        name, _, path = spec.rpartition("=")
        named[name or len(named)] = np.load(path)
    rng = np.random.default_rng(0)
    for i, arg in enumerate(session.get_inputs()):
        given = named.get(arg.name, named.get(i))
        if given is None:
            shape = [args.batch if d is None else d for d in arg.shape]
            given = rng.standard_normal(shape, dtype=np.float32)
        inputs[arg.name] = given
    outputs = session.run(inputs)
    times = []
    for _ in range(max(args.repeat, 1)):
        t = time.perf_counter()
        session.run(inputs)
        times.append(time.perf_counter() - t)
    for name, value in outputs.items():
        lead = np.array2string(value.reshape(-1)[:6], precision=5, separator=", ")
        print(f"output {name!r}: shape {value.shape}, first values {lead}")
    state = session.compile([a.shape for a in inputs.values()])[0]
    m = state.memory_stats
    print(f"latency: median {np.median(times) * 1e3:.3f} ms over {len(times)} runs "
          f"({session.device.num_threads} threads)")
    print(f"memory plan: intermediates heap {m['peak_bytes']} bytes, lower bound {m['lower_bound_bytes']} "
          f"bytes, without aliasing {m['requested_bytes']} bytes")
    if args.output:
        if args.output.endswith(".npz"):
            np.savez(args.output, **outputs)
        else:
            np.save(args.output, next(iter(outputs.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
