"""Elementwise kernels (neurons, arithmetic, temporaries) against NumPy, 1 and 2 threads.
The ratio is our median / NumPy's median, sampled in alternating blocks in one run
(mpskernels/bench.py); pytest-benchmark's table times ours alone."""
import pytest

import mpskernels as mk
from mpskernels import bench


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("index", range(5))
def test_elementwise_vs_numpy(benchmark, report, threads, index):
    device = mk.Device(num_threads=threads)
    name, ours, numpy_call, nbytes = bench.cases(device)[index]
    benchmark.group = name
    benchmark.name = f"{name} threads={threads}"
    benchmark.pedantic(ours, rounds=200, warmup_rounds=5)
    ours_s, numpy_s = bench.paired_medians(ours, numpy_call, seconds=2.0)
    benchmark.extra_info.update(numpy_us=numpy_s * 1e6, ratio=ours_s / numpy_s)
    report((name, threads, ours_s * 1e6, numpy_s * 1e6, ours_s / numpy_s,
            f"{nbytes / ours_s / 1e9:.1f} GB/s"))
