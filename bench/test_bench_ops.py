"""mpskernels.ops per call, one thread: what a one-off call costs against the object-model
path (kernel and images made once; encode + commit + wait) and against torch 2.13 /
NumPy doing the same call. Small inputs show the per-call overhead, larger ones that it
fades. Samples alternate between all the variants of a case (bench/timing.py); medians.

Run: PYTHONPATH=$PWD python -m pytest bench/test_bench_ops.py -q -s -p no:randomly
(torch is optional: pip install torch==2.13.0). Recorded figures: docs/ops.md."""
import numpy as np
import pytest

import mpskernels as mk
import timing
from mpskernels import ops
from mpskernels.bench import set_blas_threads   # NumPy's OpenBLAS thread count

SECONDS, ROUNDS = 2.0, 5


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def _conv(size, channels):
    def case(device, torch, rng):
        x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
        w = (rng.standard_normal((channels, channels, 3, 3)) / channels).astype(np.float32)
        xh = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        conv = mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(3, 3, channels, channels),
                                             np.ascontiguousarray(w.transpose(0, 2, 3, 1)))
        queue = device.make_command_queue()
        src = mk.Image.from_numpy(device, xh)
        dst = mk.Image(device, mk.ImageDescriptor(mk.ImageFeatureChannelFormat.FLOAT32, size, size,
                                                  channels))

        def object_model():
            cb = queue.make_command_buffer()
            conv.encode(cb, src, dst)
            cb.commit()
            cb.wait_until_completed()
        fns = {"ops NCHW": lambda: ops.conv2d(x, w, padding=1, device=device),
               "ops NHWC": lambda: ops.conv2d(xh, w, padding=1, layout="NHWC", device=device),
               "object model": object_model}
        if torch is not None:
            F, xt, wt = torch.nn.functional, torch.from_numpy(x), torch.from_numpy(w)
            xc = xt.contiguous(memory_format=torch.channels_last)
            wc = wt.contiguous(memory_format=torch.channels_last)
            fns["torch NCHW"] = lambda: F.conv2d(xt, wt, padding=1)
            fns["torch channels_last"] = lambda: F.conv2d(xc, wc, padding=1)
        return f"conv2d 1x{channels}x{size}x{size} 3x3", fns
    return case


def _matmul(batch, m):
    def case(device, torch, rng):
        shape = (batch, m, m) if batch else (m, m)
        a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        c = np.empty(shape, np.float32)
        fns = {"ops": lambda: ops.matmul(a, b, device=device),
               "numpy": lambda: np.matmul(a, b, out=c)}
        if not batch:
            A, B, C = (mk.Matrix.from_numpy(device, v) for v in (a, b, c))
            kernel = mk.MatrixMultiplication(device, m, m, m)
            queue = device.make_command_queue()

            def object_model():
                cb = queue.make_command_buffer()
                kernel.encode(cb, A, B, C)
                cb.commit()
                cb.wait_until_completed()
            fns["object model"] = object_model
        if torch is not None:
            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            fns["torch"] = lambda: torch.matmul(at, bt)
        return f"matmul {'x'.join(map(str, shape))} @ same", fns
    return case


def _relu(shape):
    def case(device, torch, rng):
        x = rng.standard_normal(shape).astype(np.float32)
        y = np.empty_like(x)
        fns = {"ops": lambda: ops.relu(x, device=device),
               "numpy": lambda: np.maximum(x, 0, out=y)}
        if torch is not None:
            xt = torch.from_numpy(x)
            fns["torch"] = lambda: torch.relu(xt)
        return f"relu {'x'.join(map(str, shape))}", fns
    return case


def _sum(shape, axis):
    def case(device, torch, rng):
        x = rng.standard_normal(shape).astype(np.float32)
        fns = {"ops": lambda: ops.sum(x, axis, device=device), "numpy": lambda: np.sum(x, axis)}
        if torch is not None:
            xt = torch.from_numpy(x)
            fns["torch"] = lambda: torch.sum(xt, axis)
        return f"sum {'x'.join(map(str, shape))} axis {axis}", fns
    return case


CASES = [_conv(8, 16), _conv(56, 64), _matmul(0, 8), _matmul(0, 256), _matmul(16, 64),
         _relu((4,)), _relu((1, 64, 56, 56)), _sum((64, 64), 1), _sum((64, 56, 56), (1, 2))]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_ops_per_call(report, index):
    if set_blas_threads is not None:
        set_blas_threads(1)
    device = mk.Device(num_threads=1)
    name, fns = CASES[index](device, _torch(), np.random.default_rng(0))
    for fn in fns.values():
        fn()
    samples = timing.paired_samples(SECONDS, *fns.values(), rounds=ROUNDS)
    med = {label: float(np.median(t)) * 1e6 for label, t in zip(fns, samples)}
    ours = [k for k in med if k.startswith("ops")]
    for label in ours:
        for peer in (k for k in med if not k.startswith("ops")):
            report((f"{name}: {label} / {peer}", 1, med[label], med[peer], med[label] / med[peer], ""))
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in med.items()))
