"""SGEMM (MatrixMultiplication) against NumPy's matmul(out=) (OpenBLAS), 1 and 2 threads, with
the machine's FMA peak measured beside it.

Run: PYTHONPATH=$PWD python -m pytest bench/test_bench_matrix.py -q -p no:randomly
(summary table at the end; recorded figures in docs/gemm.md).

Shapes are M x K x N: C (M x N) = A (M x K) B (K x N), float32, row-major. Our time is
encode + commit + wait of one command buffer; NumPy's is np.matmul(a, b, out=c) with
OpenBLAS limited to the same thread count. The machine may be shared, so the two are sampled
alternately (ROUNDS rounds, a block of each per round). The ratio (ours / NumPy) is the median
over rounds of each round's ratio of block medians: the two blocks of a round are a second or
less apart, while the shared host's speed moves by up to 2x between minutes (the same build's
ratio of whole-run medians moved by 0.2 between runs). Also printed: the ratio of the medians
over the whole run and its range over rounds; "best" compares the fastest runs.
At one thread the kernel alone (the recorded command run on this thread) and NumPy are also
timed in this thread's CPU time, which time taken by other processes does not inflate.

FMA peak: mk_gemm_fma_burn (12 independent FMA chains per thread in the active ISA's widest
registers, the best of repeated bursts) on the same number of threads, measured when the first
case starts and again right after each product; a row's "% of peak" is taken against the best
burst so far, and the FMA peak rows, printed last, give the best of the whole run. (On a shared
host the probe moved from 104 to 164 GFLOP/s within minutes: a peak taken once, in a slow
moment, put a product at 113-146% of it.) At one thread the probe
is also sampled in the CPU-time rounds, alternately with ours and NumPy's, one burst doing the
product's flops: our share of the peak then compares the same statistic (median with median,
best with best) on the same clock under the same load from other jobs. (The best of 2 ms
bursts at the start against the median of 0.1 s products that the other jobs interrupt asks a
shared machine for more than a quiet one; the paired figure is the one to judge by.)

The other matrix kernels (MatrixVectorMultiplication both ways, MatrixSum, MatrixNeuron,
MatrixFullyConnected) are timed against the NumPy calls a user would write instead, in
alternating blocks, as GB/s moved or GFLOP/s.

The one-row product 1x4096x4096 reads 64 MiB of B per run: it is bound by the read bandwidth,
so at one thread the read probe of bench/test_bench_reduction.py (AVX-512 loads of every word)
is sampled over B's own storage alternately with ours and NumPy's, and each is reported as a
fraction of it (probe median / kernel median, in thread CPU time)."""
import time

import numpy as np
import pytest

import mpskernels as mk
import timing
from mpskernels import _native
from mpskernels.bench import set_blas_threads

ROUNDS = 7
SHAPES = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048),
          (3136, 576, 64), (64, 4096, 1024), (1, 4096, 4096)]   # M x K x N


_devices, _peaks = {}, {}


def _device(threads):
    if threads not in _devices:
        _devices[threads] = mk.Device(num_threads=threads)
        _note_peak(threads, _native.fma_peak_gflops(_devices[threads]._pool, 0.5))
    return _devices[threads]


def _note_peak(threads, gflops):
    """The machine's peak is the fastest burst seen: a slow moment of the host lowers a probe,
    nothing raises it."""
    _peaks[threads] = max(_peaks.get(threads, 0.0), gflops)


def paired_samples(seconds, *fns, **kwargs):
    return timing.paired_samples(seconds, *fns, rounds=ROUNDS, **kwargs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_sgemm_vs_numpy(benchmark, report, shape, threads):
    if set_blas_threads is None:
        pytest.skip("cannot set NumPy's OpenBLAS thread count")
    m, k, n = shape
    device = _device(threads)
    queue = device.make_command_queue()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.empty((m, n), dtype=np.float32)
    A, B = mk.Matrix.from_numpy(device, a), mk.Matrix.from_numpy(device, b)
    C = mk.Matrix.with_device(device, mk.MatrixDescriptor(m, n))
    kernel = mk.MatrixMultiplication(device, m, n, k)

    def ours():
        cb = queue.make_command_buffer()
        kernel.encode(cb, A, B, C)
        cb.commit()
        cb.wait_until_completed()

    seconds = min(8.0, max(2.0, 2 * m * n * k / 2e10))
    set_blas_threads(threads)
    try:
        rounds = [timing.paired_samples(seconds / ROUNDS, ours, lambda: np.matmul(a, b, out=c),
                                        rounds=1) for _ in range(ROUNDS)]
        times = [np.concatenate([r[i] for r in rounds]) for i in range(2)]
        round_ratios = [np.median(r[0]) / np.median(r[1]) for r in rounds]
        if threads == 1:   # CPU time of this thread: what other processes take does not count
            cb = queue.make_command_buffer()
            kernel.encode(cb, A, B, C)
            command = cb._commands[-1]
            burn_iters = max(1, round(2.0 * m * n * k / 384))   # 384 flops per round
            fns = [lambda: command.run(device._pool), lambda: np.matmul(a, b, out=c),
                   lambda: _native.fma_burn(device._pool, burn_iters)]
            if m == 1:   # bound by reading B: against the read probe over B's storage
                fns.append(lambda: _native.read_probe(B._bytes, device._pool))
            cpu = paired_samples(seconds / 2, *fns, clock=time.thread_time)
    finally:
        set_blas_threads(1)
    _note_peak(threads, _native.fma_peak_gflops(device._pool, 0.2))
    if threads == 1:
        _note_peak(1, burn_iters * 384 / cpu[2].min() / 1e9)
    ours_s, numpy_s = np.median(times[0]), np.median(times[1])
    ratio = np.median(round_ratios)
    benchmark.group = f"sgemm {m}x{k}x{n}"
    benchmark.pedantic(ours, rounds=3, warmup_rounds=0)
    flops = 2.0 * m * n * k
    gflops, best = flops / ours_s / 1e9, flops / times[0].min() / 1e9
    extra = (f"{gflops:.1f} GFLOP/s ({100 * gflops / _peaks[threads]:.0f}% of peak; best run "
             f"{best:.1f} = {100 * best / _peaks[threads]:.0f}%); NumPy {flops / numpy_s / 1e9:.1f}"
             f"; ratio of the run's medians {ours_s / numpy_s:.2f}, rounds "
             f"{min(round_ratios):.2f}-{max(round_ratios):.2f}; best/best ratio "
             f"{times[0].min() / times[1].min():.2f}")
    if threads == 1:
        cpu_gflops = flops / cpu[0].min() / 1e9

        def share(stat):   # our GFLOP/s over the probe's, by the same statistic
            return flops / stat(cpu[0]) / (burn_iters * 384 / stat(cpu[2]))
        extra += (f"; CPU time: ratio {np.median(cpu[0]) / np.median(cpu[1]):.2f} (medians), "
                  f"{cpu[0].min() / cpu[1].min():.2f} (best), ours {cpu_gflops:.1f} GFLOP/s = "
                  f"{100 * cpu_gflops / _peaks[threads]:.0f}% of peak; against the probe "
                  f"sampled alternately: {100 * share(np.median):.0f}% (medians), "
                  f"{100 * share(np.min):.0f}% (best)")
        if m == 1:
            probe = np.median(cpu[3])
            extra += (f"; of the read bandwidth ({B._bytes.nbytes / probe / 1e9:.1f} GB/s): "
                      f"ours {100 * probe / np.median(cpu[0]):.0f}%, NumPy "
                      f"{100 * probe / np.median(cpu[1]):.0f}%")
    benchmark.extra_info.update(numpy_us=numpy_s * 1e6, ours_us=ours_s * 1e6, ratio=ratio,
                                gflops=gflops)
    report((f"sgemm {m}x{k}x{n}", threads, ours_s * 1e6, numpy_s * 1e6, ratio, extra))


@pytest.mark.parametrize("threads", [1, 2])
def test_fma_peak(report, threads):
    """After the products: the best burst of the run (the start and beside each product)."""
    _device(threads)
    report(("FMA peak", threads, float("nan"), float("nan"), float("nan"),
            f"{_peaks[threads]:.1f} GFLOP/s ({_native.active_isa()}), the best burst of the run"))


def test_small_multiplication_latency(report):
    """64x64x64 MatrixMultiplication: encode + commit + wait (must hold: median <= 15 us)."""
    device = _device(1)
    queue = device.make_command_queue()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    A, B = mk.Matrix.from_numpy(device, a), mk.Matrix.from_numpy(device, b)
    C = mk.Matrix.with_device(device, mk.MatrixDescriptor(64, 64))
    kernel = mk.MatrixMultiplication(device, 64, 64, 64)
    c = np.empty((64, 64), np.float32)

    def ours():
        cb = queue.make_command_buffer()
        kernel.encode(cb, A, B, C)
        cb.commit()
        cb.wait_until_completed()

    times = paired_samples(2.0, ours, lambda: np.matmul(a, b, out=c))
    ours_s, numpy_s = np.median(times[0]), np.median(times[1])
    report(("MatrixMultiplication 64x64x64 latency", 1, ours_s * 1e6, numpy_s * 1e6,
            ours_s / numpy_s, f"must hold: median <= 15 us (best {times[0].min() * 1e6:.1f} us)"))


def _other_kernels(device, rng):
    """(name, encode(cb), NumPy's way, (amount, unit)) for the matrix kernels besides
    MatrixMultiplication, each against what a NumPy user would write; the amount is GB read
    and written, or GFLOP."""
    def mat(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x, mk.Matrix.from_numpy(device, x)

    def vec(n):
        x = rng.standard_normal(n).astype(np.float32)
        return x, mk.Vector.from_numpy(device, x)

    out = []
    a, A = mat(4096, 4096)
    x, X = vec(4096)
    y, Y = vec(4096)
    for transpose in (False, True):
        mv = mk.MatrixVectorMultiplication(device, 4096, 4096, transpose)
        at = a.T if transpose else a
        out.append((f"MatrixVectorMultiplication 4096x4096{' transposed' if transpose else ''}",
                    lambda cb, mv=mv: mv.encode(cb, A, X, Y),
                    lambda at=at: np.matmul(at, x, out=y), (a.nbytes / 1e9, "GB/s")))
    srcs = [mat(1024, 1024) for _ in range(4)]
    r, R = mat(1024, 1024)
    msum = mk.MatrixSum(device, 4, 1024, 1024)

    def numpy_sum():
        np.add(srcs[0][0], srcs[1][0], out=r)
        for s, _ in srcs[2:]:
            np.add(r, s, out=r)
    out.append(("MatrixSum 4 x 1024x1024", lambda cb: msum.encode(cb, [s for _, s in srcs], R),
                numpy_sum, (5 * r.nbytes / 1e9, "GB/s")))
    bias, Bias = vec(1024)
    neuron = mk.MatrixNeuron(device)
    neuron.set_neuron_type(mk.CNNNeuronType.RELU)
    m0, M0 = srcs[0]
    out.append(("MatrixNeuron 1024x1024 bias + ReLU", lambda cb: neuron.encode(cb, M0, Bias, R),
                lambda: np.maximum(np.add(m0, bias, out=r), 0, out=r), (2 * r.nbytes / 1e9, "GB/s")))
    f, F = mat(256, 1024)
    h, H = mat(256, 1024)
    fc = mk.MatrixFullyConnected(device)
    fc.set_neuron_type(mk.CNNNeuronType.RELU)
    out.append(("MatrixFullyConnected 256x1024x1024 bias + ReLU",
                lambda cb: fc.encode(cb, F, M0, Bias, H),
                lambda: np.maximum(np.add(np.matmul(f, m0, out=h), bias, out=h), 0, out=h),
                (2 * 256 * 1024 * 1024 / 1e9, "GFLOP/s")))
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_other_matrix_kernels_vs_numpy(report, threads):
    """MatrixVectorMultiplication, MatrixSum, MatrixNeuron and MatrixFullyConnected against
    NumPy (OpenBLAS at our thread count): ratio of the medians of alternating blocks."""
    if set_blas_threads is None:
        pytest.skip("cannot set NumPy's OpenBLAS thread count")
    device = _device(threads)
    queue = device.make_command_queue()
    set_blas_threads(threads)
    try:
        for name, encode, theirs, (amount, unit) in _other_kernels(device, np.random.default_rng(0)):
            def ours():
                cb = queue.make_command_buffer()
                encode(cb)
                cb.commit()
                cb.wait_until_completed()
            t_ours, t_np = (np.median(t) for t in paired_samples(2.0, ours, theirs))
            report((name, threads, t_ours * 1e6, t_np * 1e6, t_ours / t_np,
                    f"{amount / t_ours:.1f} {unit} (NumPy {amount / t_np:.1f})"))
    finally:
        set_blas_threads(1)
