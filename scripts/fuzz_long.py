#!/usr/bin/env python
"""The long fuzz: every fuzzer of tests/ with fresh random seeds, round after round, until at
least --calls API calls have been made in all (default 100,000).

    PYTHONPATH=$PWD python scripts/fuzz_long.py [--calls N] [--only api,matrix,mpkg,onnx] [--seed S]

A round runs each fuzzer once: the API state machine (tests/test_fuzz.py: images, temporaries,
pointwise kernels, convolution and reductions, values checked), the matrix state machine
(tests/test_fuzz_matrix.py) and the mutated .mpkg packages and ONNX models
(tests/test_fuzz_package.py). A call is one call into the library's API (a load, a compile and
run of a loaded network, an encode, a commit, a read back...), counted by each fuzzer as it
makes it. Round k runs every fuzzer under hypothesis seed S + k - 1 (printed), so
`--seed <that> --only <fuzzer>` replays it first, a crash included. Prints, per fuzzer, the
calls, time, failures, how the calls ended and the rules invalid calls broke. Exit status 1 if
anything failed."""
import argparse
import collections
import faulthandler
import os
import resource
import sys
import time
import traceback
import warnings

import hypothesis.core

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import test_fuzz  # noqa: E402
import test_fuzz_matrix  # noqa: E402
import test_fuzz_package  # noqa: E402

# name: (module counting its calls, one round: examples x steps). The package fuzzers' calls
# are whole file loads and network runs, ~10x slower than an encode: more examples per round.
FUZZERS = {
    "api": (test_fuzz, lambda: test_fuzz.run_fuzz(100, 100, derandomize=False)),
    "matrix": (test_fuzz_matrix, lambda: test_fuzz_matrix.run_fuzz(100, 100, derandomize=False)),
    "mpkg": (test_fuzz_package, lambda: test_fuzz_package.run_fuzz(400, 4, False, ("mpkg",))),
    "onnx": (test_fuzz_package, lambda: test_fuzz_package.run_fuzz(400, 4, False, ("onnx",))),
}


def summary(name, stats, seconds, failures):
    print(f"\n== {name}: {stats['calls']} calls, {seconds:.0f} s, {failures} failures")
    # "what (reason; reason)" keys are invalid calls: counted per rule broken below
    plain = {k: v for k, v in stats.items() if "(" not in k and k != "calls"}
    for key, count in sorted(plain.items(), key=lambda kv: -kv[1]):
        print(f"  {count:8d}  {key}")
    invalid = collections.Counter()
    for key, count in stats.items():
        if "(" in key and key.endswith(")"):
            for reason in key[key.index("(") + 1:-1].split("; "):
                invalid[reason] += count
    if invalid:
        print("  invalid calls, by rule broken or argument set wrong:")
        for key, count in invalid.most_common():
            print(f"  {count:8d}  {key}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--only", default=",".join(FUZZERS), help="fuzzers to run, comma separated")
    parser.add_argument("--seed", type=int, default=None, help="first round's seed (default: the clock)")
    parser.add_argument("--hang", type=int, default=600,
                        help="seconds one example (package fuzzers: one file) may take before it is a "
                             "hang (stacks dumped, exit): long, as niced processes may be paused for "
                             "minutes on a shared machine")
    parser.add_argument("--max-gb", type=float, default=8,
                        help="address space limit: a file asking for gigabytes raises MemoryError (a "
                             "finding) instead of the kernel's OOM killer ending this or another process; "
                             "not under a sanitizer (its shadow memory takes terabytes of address space)")
    args = parser.parse_args()
    if not os.environ.get("MPSKERNELS_SANITIZER"):
        limit = int(args.max_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    names = args.only.split(",")
    faulthandler.enable()          # a crash prints where each thread was
    for module in (test_fuzz, test_fuzz_matrix, test_fuzz_package):
        module.HANG_SECONDS = args.hang
    assert hasattr(hypothesis.core, "global_force_seed")
    seed = args.seed if args.seed is not None else int(time.time())
    warnings.simplefilter("ignore", ResourceWarning)   # leftover read counts: expected here
    stats = {name: collections.Counter() for name in names}
    seconds = collections.Counter()
    failures = collections.defaultdict(list)
    rounds, start = 0, time.monotonic()
    while sum(s["calls"] for s in stats.values()) < args.calls:
        rounds += 1
        for name in names:
            module, run = FUZZERS[name]
            # what pytest's --hypothesis-seed sets: hypothesis ignores the `random` module
            hypothesis.core.global_force_seed = seed + rounds - 1
            print(f"round {rounds} {name}: seed {seed + rounds - 1}", flush=True)
            before, t0 = module.STATS.copy(), time.monotonic()
            try:
                run()
            except BaseException as exc:  # noqa: BLE001 - report every finding and go on
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures[name].append("".join(traceback.format_exception(exc)))
                print(f"round {rounds} {name}: FAILURE\n{failures[name][-1]}", flush=True)
            stats[name] += module.STATS - before
            seconds[name] += time.monotonic() - t0
        total = sum(s["calls"] for s in stats.values())
        print(f"round {rounds}: {total} calls (" + ", ".join(f"{n} {stats[n]['calls']}" for n in names)
              + f"), {time.monotonic() - start:.0f} s", flush=True)
    nfail = sum(len(f) for f in failures.values())
    print(f"\n{total} API calls in {rounds} rounds, {time.monotonic() - start:.0f} s, {nfail} failures")
    for name in names:
        summary(name, stats[name], seconds[name], len(failures[name]))
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
