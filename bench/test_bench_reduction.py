"""Reductions against NumPy, 1 and 2 threads, and the machine's read bandwidth.

Run: PYTHONPATH=$PWD python -m pytest bench/test_bench_reduction.py -q -p no:randomly
(summary table at the end; see docs/reduction.md for recorded figures).

Images are NHWC float32, so NumPy's equivalent of each kernel reduces the same (N, H, W, C)
array over one axis in float32, into a preallocated result (out=). Where NumPy has several
ways, each is timed and the fastest is the peer ("numpy" below; the others are listed):
  sums: np.sum(x, axis), np.einsum (e.g. "nhwc->nwc") and a matmul with a vector of ones
        (OpenBLAS gemv, limited to the same thread count as ours)
  max:  np.max(x, axis);   argmax: np.argmax(x, axis)
  axis: across feature channels -1, per row (along x) 2, per column (along y) 1.
np.sum, np.max and np.argmax run on one thread. Our time is encode + commit + wait of one
command buffer; "kernel alone" runs the recorded command directly (no encode, commit or
queue hand-off): what the C kernel costs.

Timing: the machine may be shared, so all contenders are sampled alternately (ROUNDS rounds of
a few runs each); the ratio ours / NumPy is the median over rounds of each round's ratio of
medians (samples of one round are a second or less apart; the shared host's speed moves by up
to 2x between minutes). The times shown are medians over all samples. Each NumPy way runs in its own block after a
pause (its OpenBLAS threads spin on after a call). On the 64 MiB image, ours, the kernel alone
and the probe (all three read the same storage) take turns call by call within a round; on
1x256x56x56 each has its own block too, like NumPy's: at 2 threads each thread's half (1.6 MB)
stays in its own 2 MiB L2 from call to call, unless calls that split the image differently
(the probe splits bytes, a column reduction columns) take turns.

Read bandwidth: mk_reduce_read_probe (OR of every 64-bit word of a buffer, AVX-512 loads, split
over the same thread count): the best read rate a kernel can hope for
(test_read_probe_is_the_fastest_read checks it against NumPy's fastest reads). The 64 MiB
cases run the probe over the source image's own storage, in turn with ours, and report our
read rate as a percentage of the probe's: the median over turns of (probe time / our time),
each pair of calls milliseconds apart (must hold: >= 80%). Per-block medians seconds apart
were no measure on the shared machine: the probe alone moved 3-17 ms between blocks of one
run. Printed, not asserted: on a shared machine one run can miss by chance."""

import time

import numpy as np
import pytest

import mpskernels as mk
import timing
from mpskernels import _native
from mpskernels.bench import SETTLE_SECONDS
from mpskernels.bench import set_blas_threads   # NumPy's OpenBLAS thread count

F32 = mk.ImageFeatureChannelFormat.FLOAT32
SMALL = (1, 56, 56, 256)     # 3.2 MB: 1x256x56x56 in MPS terms
LARGE = (1, 256, 256, 256)   # 64 MiB
ROUNDS = 9

# (name, class, axis of the NHWC array, reduction)
CASES = [
    ("channels sum", mk.NNReduceFeatureChannelsSum, 3, "sum"),
    ("channels max", mk.NNReduceFeatureChannelsMax, 3, "max"),
    ("channels argmax", mk.NNReduceFeatureChannelsArgumentMax, 3, "argmax"),
    ("row sum", mk.NNReduceRowSum, 2, "sum"),
    ("row max", mk.NNReduceRowMax, 2, "max"),
    ("column sum", mk.NNReduceColumnSum, 1, "sum"),
    ("column max", mk.NNReduceColumnMax, 1, "max"),
]
LARGE_CASES = ("channels sum", "row sum", "column sum", "channels max")

_images, _devices = {}, {}


def source(device, shape):
    key = (id(device), shape)
    if key not in _images:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        _images[key] = (x, mk.Image.from_numpy(device, x))
    return _images[key]


def numpy_ways(x, axis, reduction):
    """{name: call} of NumPy's ways to compute the reduction of x over axis, each into its
    own preallocated result."""
    n, h, w, c = x.shape
    out_shape = {3: (n, h, w), 2: (n, h, c), 1: (n, w, c)}[axis]
    if reduction == "argmax":
        out = np.empty(out_shape, np.int64)
        return {"np.argmax": lambda: np.argmax(x, axis=axis, out=out)}
    out = np.empty(out_shape, np.float32)
    if reduction == "max":
        return {"np.max": lambda: np.max(x, axis=axis, out=out)}
    out_e, out_m = np.empty_like(out), np.empty_like(out)
    subscripts = {3: "nhwc->nhw", 2: "nhwc->nhc", 1: "nhwc->nwc"}[axis]
    # the reduced axis as the inner dimension of a matrix product with ones
    if axis == 3:
        a, b, o = x.reshape(-1, c), np.ones(c, np.float32), out_m.reshape(-1)
    elif axis == 2:
        a, b, o = np.ones((1, w), np.float32), x.reshape(n * h, w, c), out_m.reshape(n * h, 1, c)
    else:
        a, b, o = np.ones((1, h), np.float32), x.reshape(n, h, w * c), out_m.reshape(n, 1, w * c)
    return {"np.sum": lambda: np.sum(x, axis=axis, out=out),
            "np.einsum": lambda: np.einsum(subscripts, x, out=out_e),
            "matmul ones": lambda: np.matmul(a, b, out=o)}


def in_turns(seconds, *fns):
    """Times of each fn(), called in turn (the order rotating) for `seconds` after a pause:
    row i of the result holds one call of each, made within the same few milliseconds."""
    time.sleep(SETTLE_SECONDS)
    for fn in fns:
        fn()
    rows, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rows) < 3:
        row = [0.0] * len(fns)
        for j in range(len(fns)):
            k = (len(rows) + j) % len(fns)
            t0 = time.perf_counter()
            fns[k]()
            row[k] = time.perf_counter() - t0
        rows.append(row)
    return np.array(rows)


def rounds_of(seconds, ours, blocks, turns):
    """Per round: the samples of each of the `ours` fns (called in turn if `turns`, else each
    in its own block), our read share of the probe's (ours[2] / ours[0]: per turn, or the
    ratio of the blocks' medians), and each of the `blocks` fns' samples in its own block."""
    each = seconds / ROUNDS / (len(blocks) + len(ours))
    out = []
    for _ in range(ROUNDS):
        if turns:
            t = in_turns(each * len(ours), *ours)
            mine, shares = list(t.T), t[:, 2] / t[:, 0]
        else:
            mine = timing.paired_samples(each * len(ours), *ours, rounds=1)
            shares = np.array([np.median(mine[2]) / np.median(mine[0])])
        out.append((mine, shares, timing.paired_samples(each * len(blocks), *blocks, rounds=1)))
    return out


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


@pytest.fixture(params=[1, 2], ids=["1", "2"])
def threads(request):
    """Our pool and NumPy's OpenBLAS (matmul) get the same thread count."""
    if set_blas_threads is None:
        pytest.skip("cannot set NumPy's OpenBLAS thread count")
    set_blas_threads(request.param)
    yield request.param
    set_blas_threads(1)


def test_read_bandwidth(benchmark, report, threads):
    """The machine's read bandwidth as the probe sees it on a 64 MiB buffer."""
    buf = np.ones(64 << 20, dtype=np.uint8)
    pool = mk.Device(num_threads=threads)._pool
    probe = lambda: _native.read_probe(buf, pool)   # noqa: E731
    times = timing.paired_samples(3.0, probe, rounds=3)[0]   # (benchmark.stats: None if disabled)
    benchmark.pedantic(probe, rounds=3, warmup_rounds=1)
    median = np.median(times)
    benchmark.extra_info["GBps"] = gbps(buf.nbytes, median)
    report(("read probe 64 MiB", threads, median * 1e6, float("nan"), float("nan"),
            f"{gbps(buf.nbytes, median):.1f} GB/s (median), "
            f"{gbps(buf.nbytes, times.min()):.1f} GB/s (best)"))


def test_read_probe_is_the_fastest_read(report):
    """The probe against NumPy's fastest whole-array reads of a 256 MiB float32 array (one
    thread each), in GB/s: if NumPy read faster, the probe would understate the bandwidth."""
    x = np.random.default_rng(0).standard_normal((256 << 20) // 4).astype(np.float32)
    pool = mk.Device(num_threads=1)._pool
    if set_blas_threads is not None:
        set_blas_threads(1)
    ones = np.ones(x.size // 1024, np.float32)
    ways = {"probe": lambda: _native.read_probe(x.view(np.uint8), pool),
            "np.sum": x.sum, "np.max": x.max,
            "np.bitwise_or.reduce (uint64)": lambda: np.bitwise_or.reduce(x.view(np.uint64)),
            "matmul ones": lambda: np.matmul(ones, x.reshape(-1, 1024))}
    times = timing.paired_samples(20.0, *ways.values(), rounds=5)
    rates = {name: gbps(x.nbytes, np.median(t)) for name, t in zip(ways, times)}
    best = {name: gbps(x.nbytes, t.min()) for name, t in zip(ways, times)}
    report(("read probe vs NumPy, 256 MiB", 1, np.median(times[0]) * 1e6, float("nan"),
            float("nan"), "; ".join(f"{k} {rates[k]:.1f} GB/s (best {best[k]:.1f})" for k in ways)))


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["1x256x56x56", "64MiB"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "_") for c in CASES])
def test_reduction_vs_numpy(benchmark, report, case, shape, threads):
    name, cls, axis, reduction = case
    if shape == LARGE and name not in LARGE_CASES:
        pytest.skip("the 64 MiB image runs the sums and one max")
    device = _devices.setdefault(threads, mk.Device(num_threads=threads))
    queue = device.make_command_queue()
    x, src = source(device, shape)
    n, h, w, c = shape
    dst_shape = {3: (w, h, 1), 2: (1, h, c), 1: (w, 1, c)}[axis]
    dst = mk.Image(device, mk.ImageDescriptor(F32, *dst_shape, n))
    kernel = cls(device)

    def ours():
        cb = queue.make_command_buffer()
        kernel.encode(cb, src, dst)
        cb.commit()
        cb.wait_until_completed()

    # the kernel alone: the recorded command run directly, without a command buffer
    cb = queue.make_command_buffer()
    kernel.encode(cb, src, dst)
    command = cb._commands[-1]
    storage = src._storage
    turns = {"ours": ours, "alone": lambda: command.run(device._pool),
             "probe": lambda: _native.read_probe(storage, device._pool)}
    peers = numpy_ways(x, axis, reduction)
    per_round = rounds_of((1.0 if shape == SMALL else 3.0) * (len(turns) + len(peers)),
                          list(turns.values()), list(peers.values()), turns=shape == LARGE)
    times = {k: np.concatenate([r[0][i] for r in per_round]) for i, k in enumerate(turns)}
    times.update({k: np.concatenate([r[2][i] for r in per_round]) for i, k in enumerate(peers)})
    median = {k: np.median(t) for k, t in times.items()}
    peer = min(peers, key=median.get)
    ours_s, numpy_s, alone_s = median["ours"], median[peer], median["alone"]
    p = list(peers).index(peer)
    ratio = np.median([np.median(r[0][0]) / np.median(r[2][p]) for r in per_round])
    # our read rate as a share of the probe's in the same stretch of time
    share = np.median(np.concatenate([r[1] for r in per_round]))
    round_shares = [np.median(r[1]) for r in per_round]
    alone_share = np.median([np.median(r[0][2]) / np.median(r[0][1]) for r in per_round])

    benchmark.group = f"{name} {shape}"
    benchmark.pedantic(ours, rounds=5 if shape == LARGE else 50, warmup_rounds=1)
    others = ", ".join(f"{k} {median[k] * 1e6:.0f}us" for k in peers if k != peer)
    extra = (f"numpy = {peer}{f' (also {others})' if others else ''}; ratio of the run's "
             f"medians {ours_s / numpy_s:.2f}; kernel alone "
             f"{alone_s * 1e6:.0f}us (ratio {alone_s / numpy_s:.2f}); "
             f"read {gbps(x.nbytes, ours_s):.1f} GB/s, probe {gbps(x.nbytes, median['probe']):.1f} "
             f"GB/s: {100 * share:.0f}% of the probe's rate (median; rounds "
             f"{100 * min(round_shares):.0f}-{100 * max(round_shares):.0f}%; kernel alone "
             f"{100 * alone_share:.0f}%)")
    if shape == LARGE:
        extra += "; must hold: >= 80%"
    benchmark.extra_info.update(numpy_us=numpy_s * 1e6, ours_us=ours_s * 1e6, peer=peer,
                                ratio=ratio, GBps=gbps(x.nbytes, ours_s), read_share=share)
    report((f"{name} {'x'.join(map(str, shape))}", threads, ours_s * 1e6, numpy_s * 1e6,
            ratio, extra))
