"""Reductions against NumPy, 1 and 2 threads, and the machine's read bandwidth.

Run: PYTHONPATH=$PWD python -m pytest bench/test_bench_reduction.py -q
(summary table at the end; see docs/reduction.md for recorded figures).

Images are NHWC float32, so the NumPy equivalent of each kernel is a reduction of the same
(N, H, W, C) array over one axis, into a preallocated result (out=):
  across feature channels: x.sum(axis=-1) / x.max(axis=-1) / x.argmax(axis=-1)  (contiguous)
  per row (along x):       x.sum(axis=2)  / x.max(axis=2)
  per column (along y):    x.sum(axis=1)  / x.max(axis=1)
NumPy runs on one thread. Our time is encode + commit + wait of one command buffer.

Timing: the machine may be shared, so our kernel and NumPy's call are sampled alternately
(ROUNDS rounds of a few runs each) and each side's median is taken over all its samples; the
ratio ours / NumPy compares medians from the same stretch of time. "kernel alone" runs the
recorded command directly (no encode, commit or queue hand-off): what the C kernel costs.

Read bandwidth: mk_reduce_read_probe (OR of every 64-bit word of a buffer, AVX-512 loads,
split over the same thread count) — the best read rate a kernel can hope for. The 64 MiB
cases sample the probe over the source image's own storage alternately with the kernel and
report probe time / kernel time: the fraction of the read bandwidth they reach (must hold:
>= 80%)."""

import numpy as np
import pytest

import mpskernels as mk
import timing
from mpskernels import _native

F32 = mk.ImageFeatureChannelFormat.FLOAT32
SMALL = (1, 56, 56, 256)     # 3.2 MB: 1x256x56x56 in MPS terms
LARGE = (1, 256, 256, 256)   # 64 MiB
ROUNDS = 9

# (name, class, axis of the NHWC array, NumPy function, result dtype)
CASES = [
    ("channels sum", mk.NNReduceFeatureChannelsSum, 3, np.sum, np.float32),
    ("channels max", mk.NNReduceFeatureChannelsMax, 3, np.max, np.float32),
    ("channels argmax", mk.NNReduceFeatureChannelsArgumentMax, 3, np.argmax, np.int64),
    ("row sum", mk.NNReduceRowSum, 2, np.sum, np.float32),
    ("row max", mk.NNReduceRowMax, 2, np.max, np.float32),
    ("column sum", mk.NNReduceColumnSum, 1, np.sum, np.float32),
    ("column max", mk.NNReduceColumnMax, 1, np.max, np.float32),
]
LARGE_CASES = ("channels sum", "row sum", "column sum", "channels max")

_images = {}


def paired_samples(seconds, *fns, **kwargs):
    return timing.paired_samples(seconds, *fns, rounds=ROUNDS, **kwargs)


def source(device, shape):
    key = (id(device), shape)
    if key not in _images:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        _images[key] = (x, mk.Image.from_numpy(device, x))
    return _images[key]


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth(benchmark, report, threads):
    """The machine's read bandwidth as the probe sees it on a 64 MiB buffer."""
    buf = np.ones(64 << 20, dtype=np.uint8)
    pool = mk.Device(num_threads=threads)._pool
    benchmark.pedantic(lambda: _native.read_probe(buf, pool), rounds=30, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GBps"] = buf.nbytes / median / 1e9
    report(("read probe 64 MiB", threads, median * 1e6, float("nan"), float("nan"),
            f"{buf.nbytes / median / 1e9:.1f} GB/s (median), "
            f"{buf.nbytes / benchmark.stats.stats.min / 1e9:.1f} GB/s (best)"))


_devices = {}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["1x256x56x56", "64MiB"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "_") for c in CASES])
def test_reduction_vs_numpy(benchmark, report, case, shape, threads):
    name, cls, axis, numpy_fn, dtype = case
    if shape == LARGE and name not in LARGE_CASES:
        pytest.skip("the 64 MiB image runs the sums and one max")
    device = _devices.setdefault(threads, mk.Device(num_threads=threads))
    queue = device.make_command_queue()
    x, src = source(device, shape)
    n, h, w, c = shape
    out_shape = {3: (n, h, w), 2: (n, h, c), 1: (n, w, c)}[axis]
    dst_shape = {3: (w, h, 1), 2: (1, h, c), 1: (w, 1, c)}[axis]
    dst = mk.Image(device, mk.ImageDescriptor(F32, *dst_shape, n))
    kernel = cls(device)
    out = np.empty(out_shape, dtype=dtype)

    def ours():
        cb = queue.make_command_buffer()
        kernel.encode(cb, src, dst)
        cb.commit()
        cb.wait_until_completed()

    def theirs():
        numpy_fn(x, axis=axis, out=out)

    # the kernel alone: the recorded command run directly, without a command buffer
    cb = queue.make_command_buffer()
    kernel.encode(cb, src, dst)
    command = cb._commands[-1]

    def kernel_alone():
        command.run(device._pool)

    if shape == SMALL:
        times = paired_samples(3.0, ours, theirs, kernel_alone)
    else:
        storage = src._storage
        times = paired_samples(12.0, ours, theirs, kernel_alone,
                               lambda: _native.read_probe(storage, device._pool))
    ours_s, numpy_s, alone_s = np.median(times[0]), np.median(times[1]), np.median(times[2])
    benchmark.group = f"{name} {shape}"
    benchmark.pedantic(ours, rounds=5 if shape == LARGE else 50, warmup_rounds=1)
    gbps = x.nbytes / ours_s / 1e9
    extra = (f"{gbps:.1f} GB/s; best/best ratio {times[0].min() / times[1].min():.2f}; "
             f"kernel alone {alone_s * 1e6:.0f}us (ratio {alone_s / numpy_s:.2f})")
    if shape == LARGE:
        probe_s, probe_best = np.median(times[3]), times[3].min()
        extra += (f"; of the read bandwidth: {100 * probe_s / ours_s:.0f}% by medians "
                  f"({x.nbytes / probe_s / 1e9:.1f} GB/s), {100 * probe_best / times[0].min():.0f}% "
                  f"best vs best ({x.nbytes / probe_best / 1e9:.1f} GB/s)")
    benchmark.extra_info.update(numpy_us=numpy_s * 1e6, ours_us=ours_s * 1e6,
                                ratio=ours_s / numpy_s, GBps=gbps)
    report((f"{name} {'x'.join(map(str, shape))}", threads, ours_s * 1e6, numpy_s * 1e6,
            ours_s / numpy_s, extra))
