"""Quick benchmarks of what exists against NumPy, in one process (used by `mpskernels bench`
and by bench/). Each case times our encode + commit + wait against the NumPy call a user would
write instead, as a median over repeated runs, and reports the ratio ours / theirs."""
import ctypes
import glob
import os
import time

import numpy as np

import mpskernels as mk

F32 = mk.ImageFeatureChannelFormat.FLOAT32

# Pause before each block: a peer's idle threads keep spinning after its last call (OpenBLAS:
# 2^28 cycles, about 0.1 s) and take the core our second thread needs. Measured: our 2-thread
# 512^3 product took 2.94 ms right after NumPy's block, 1.57 ms after a 0.2 s pause.
SETTLE_SECONDS = 0.3


def cpu_ticks():
    """(ticks stolen by the hypervisor, all ticks) of every CPU so far, from /proc/stat (None
    where there is none): on a shared VM the host takes cores away for whole rounds."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[7], sum(fields)


def steal_since(start):
    """Share of all CPU time the host took since `start` (a cpu_ticks()), or None."""
    end = cpu_ticks()
    if start is None or end is None or end[1] == start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def _openblas_thread_setter():
    """NumPy's OpenBLAS set_num_threads (None if not found)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


set_blas_threads = _openblas_thread_setter()


def _samples(fn, seconds, clock):
    time.sleep(SETTLE_SECONDS)
    fn()   # a discarded first call: caches warm, threads awake
    out = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(out) < 3:
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def paired_samples(seconds, *fns, rounds, clock=time.perf_counter):
    """Times of each fn(), sampled in alternating blocks over `rounds` rounds, so that load
    from elsewhere on a shared machine falls on all alike (clock: e.g. time.thread_time)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t += _samples(fn, seconds / rounds / len(fns), clock)
    return [np.array(t) for t in times]


def paired_medians(ours, theirs, seconds=0.5, rounds=10):
    """Median seconds of ours() and of theirs(), sampled alternately."""
    return [float(np.median(t)) for t in paired_samples(seconds, ours, theirs, rounds=rounds)]


def _run(queue, encode):
    cb = queue.make_command_buffer()
    encode(cb)
    cb.commit()
    cb.wait_until_completed()


def cases(device):
    """(name, ours, numpy's, bytes moved per run) for each benchmark case."""
    queue = device.make_command_queue()
    rng = np.random.default_rng(0)
    out = []

    def unary(name, kernel, shape, reference):
        n, h, w, c = shape
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        src = mk.Image.from_numpy(device, x)
        dst = mk.Image(device, mk.ImageDescriptor(F32, w, h, c, n))
        y = np.empty_like(x)
        out.append((name, lambda: _run(queue, lambda cb: kernel.encode(cb, src, dst)),
                    lambda: reference(x, y), 2 * x.nbytes))

    relu = mk.CNNNeuronReLU(device, a=0.0)
    unary("relu 1x56x56x256", relu, (1, 56, 56, 256), lambda x, y: np.maximum(x, 0, out=y))
    unary("relu 1x1x1x4 (latency)", relu, (1, 1, 1, 4), lambda x, y: np.maximum(x, 0, out=y))

    def sigmoid(x, y):
        np.negative(x, out=y)
        np.exp(y, out=y)
        np.add(y, 1, out=y)
        np.reciprocal(y, out=y)

    unary("sigmoid 1x56x56x256", mk.CNNNeuronSigmoid(device), (1, 56, 56, 256), sigmoid)

    a = rng.standard_normal((1, 56, 56, 256)).astype(np.float32)
    b = rng.standard_normal((1, 56, 56, 256)).astype(np.float32)
    ia, ib = mk.Image.from_numpy(device, a), mk.Image.from_numpy(device, b)
    isum = mk.Image(device, mk.ImageDescriptor(F32, 56, 56, 256))
    y = np.empty_like(a)
    add = mk.CNNAdd(device)
    out.append(("add 1x56x56x256", lambda: _run(queue, lambda cb: add.encode(cb, ia, ib, isum)),
                lambda: np.add(a, b, out=y), 3 * a.nbytes))

    # 32 chained ReLUs through temporaries vs NumPy ping-ponging two buffers
    x = rng.standard_normal((1, 112, 112, 64)).astype(np.float32)
    src = mk.Image.from_numpy(device, x)
    dst = mk.Image(device, mk.ImageDescriptor(F32, 112, 112, 64))
    desc = mk.ImageDescriptor(F32, 112, 112, 64)

    def chain(cb):
        image = src
        for _ in range(31):
            t = mk.TemporaryImage(cb, desc)
            relu.encode(cb, image, t)
            image = t
        relu.encode(cb, image, dst)

    y0, y1 = np.empty_like(x), np.empty_like(x)

    def numpy_chain():
        np.maximum(x, 0, out=y0)
        for i in range(31):
            np.maximum(y0 if i % 2 == 0 else y1, 0, out=y1 if i % 2 == 0 else y0)

    out.append(("32 relus 1x112x112x64 via temporaries", lambda: _run(queue, chain), numpy_chain,
                64 * x.nbytes))

    # SGEMM 512^3 (MatrixMultiplication) vs np.matmul (OpenBLAS, its own thread count)
    ma, mb = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    mc = np.empty((512, 512), np.float32)
    left, right = mk.Matrix.from_numpy(device, ma), mk.Matrix.from_numpy(device, mb)
    result = mk.Matrix.with_device(device, mk.MatrixDescriptor(512, 512))
    matmul = mk.MatrixMultiplication(device, 512, 512, 512)
    out.append(("matmul 512x512x512", lambda: _run(queue, lambda cb: matmul.encode(
        cb, left, right, result)), lambda: np.matmul(ma, mb, out=mc), 3 * mc.nbytes))
    return out


def run(threads=(1, 2), progress=None, min_time=0.25):
    """Rows of (case, threads, ours_us, numpy_us, ratio, our GB/s)."""
    rows = []
    per_device = [cases(mk.Device(num_threads=n)) for n in threads]
    total = sum(len(c) for c in per_device)
    done = 0
    for n, device_cases in zip(threads, per_device):
        if set_blas_threads is not None:
            set_blas_threads(n)   # NumPy's matmul gets our thread count
        for name, ours, theirs, nbytes in device_cases:
            t_ours, t_np = paired_medians(ours, theirs, 2 * min_time)
            rows.append((name, n, t_ours * 1e6, t_np * 1e6, t_ours / t_np, nbytes / t_ours / 1e9))
            done += 1
            if progress:
                progress(done, total, name)
    return rows


def format_rows(rows):
    lines = [f"{'case':40s} {'threads':>7s} {'ours us':>10s} {'numpy us':>10s} {'ratio':>7s} {'GB/s':>7s}"]
    for name, n, ours, theirs, ratio, gbs in rows:
        lines.append(f"{name:40s} {n:7d} {ours:10.1f} {theirs:10.1f} {ratio:7.2f} {gbs:7.1f}")
    lines.append("ratio = our time / NumPy's (below 1: we are faster); NumPy's ufuncs run on one "
                 "thread, its matmul on as many as ours.")
    return "\n".join(lines)
