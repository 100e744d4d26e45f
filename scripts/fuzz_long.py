#!/usr/bin/env python
"""The long API fuzz: tests/test_fuzz.py's state machine with fresh random seeds, round after
round, until at least --calls API calls have been made (default 100,000).

    PYTHONPATH=$PWD python scripts/fuzz_long.py [--calls N] [--steps S] [--examples E]

Prints the calls made, how each call ended (counts per kind and per exception type) and every
failure hypothesis found (shrunk, with the blob that reproduces it). Exit status 1 if any."""
import argparse
import collections
import faulthandler
import os
import random
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import test_fuzz  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=100, help="steps per example")
    parser.add_argument("--examples", type=int, default=200, help="examples per round")
    parser.add_argument("--seed", type=int, default=None,
                        help="first round's seed (default: from the clock); round k uses seed + k")
    args = parser.parse_args()
    faulthandler.enable()          # a crash prints where each thread was
    seed = args.seed if args.seed is not None else int(time.time())
    warnings.simplefilter("ignore", ResourceWarning)   # leftover read counts: expected here
    total, failures, rounds = collections.Counter(), [], 0
    start = time.monotonic()
    while total["calls"] < args.calls:
        rounds += 1
        before = test_fuzz.STATS.copy()
        random.seed(seed + rounds)     # hypothesis draws its seed from `random` when not derandomized
        print(f"round {rounds}: seed {seed + rounds}", flush=True)
        try:
            test_fuzz.run_fuzz(args.examples, args.steps, derandomize=False)
        except BaseException as exc:  # noqa: BLE001 - report every finding and go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append("".join(traceback.format_exception(exc)))
            print(f"round {rounds}: FAILURE\n{failures[-1]}", flush=True)
        total += test_fuzz.STATS - before
        encodes = total["encode"] + sum(v for k, v in total.items() if k.endswith(" encoded"))
        print(f"round {rounds}: {total['calls']} calls, {encodes} kernels encoded, "
              f"{time.monotonic() - start:.0f} s", flush=True)
    print(f"\n{total['calls']} API calls in {rounds} rounds, {time.monotonic() - start:.0f} s, "
          f"{len(failures)} failures")
    invalid = collections.Counter()
    for key, count in total.items():
        if key.startswith("encode ("):
            for reason in key[len("encode ("):-1].split("; "):
                invalid[reason] += count
    summary = {key: total[key] for key in ("kernel", "encode", "commit", "read_count",
                                           "sub_image", "batch_representation", "read_bytes",
                                           "write_bytes", "Image.from_numpy", "TemporaryImage")}
    summary.update({key: count for key, count in total.items()
                    if key.endswith((" encoded", " refused"))})
    summary.update({key: count for key, count in total.items() if key.startswith("raised ")})
    for key, count in sorted(summary.items(), key=lambda kv: -kv[1]):
        print(f"  {count:8d}  {key}")
    print("invalid encodes, by rule broken or property set wrong:")
    for key, count in invalid.most_common():
        print(f"  {count:8d}  {key}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
