"""Timing shared by the benchmarks: ours and the peer's, sampled alternately in one run so
that load from elsewhere on a shared machine falls on both alike."""
import time

import numpy as np


def _samples(fn, seconds, clock):
    fn()
    out = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(out) < 3:
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def paired_samples(seconds, *fns, rounds, clock=time.perf_counter):
    """Times of each fn(), sampled alternately over `rounds` rounds (clock: e.g.
    time.thread_time for CPU time instead of wall time)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t += _samples(fn, seconds / rounds / len(fns), clock)
    return [np.array(t) for t in times]
