"""The nn family (src/nn/) against PyTorch, and the constant-weight GEMM choice of the ML
pipeline (the convolution family's 1x1 path vs mk_sgemm).

Run: PYTHONPATH=$PWD python -m pytest bench/test_bench_nn.py -q -s
(needs torch==2.13.0 for the peer; summary table at the end; figures in docs/ml.md).

Ours: one network node, compiled once, its tensors bound once; "ours" is its recorded commands
run directly (the kernels alone, as a pipeline's node costs once encoded), and the extra column
the whole machine-learning pass (encode + commit + wait: ~130 us of Python encode and hand-off
on top, whatever the node). Peer: the torch call on
contiguous tensors with out= where it has one, torch.set_num_threads(threads). Samples
alternate between the two (bench/timing.py); at one thread the clock is the calling thread's
CPU time (the waiting thread runs a one-thread buffer itself), robust to a shared machine.

GEMM with a constant B (Gemm / MatMul weights): the 1x1 convolution (weights packed once when
the pipeline is compiled) against one GemmCommand (mk_sgemm, B [K][N] contiguous, the bias in
its epilogue), both recorded into a command buffer directly; the `gemm` node takes mk_sgemm
for one row, the convolution otherwise."""
import time

import numpy as np
import pytest

import mpskernels as mk
import timing
from mpskernels import _native, ml
from mpskernels.enums import TensorDataType
from mpskernels.ml import _Operand, _conv_kernel, _packed, gemm_op

ROUNDS = 8
SECONDS = 2.0


def _clock(threads):
    return time.thread_time if threads == 1 else time.perf_counter


def _dispatcher(device, build, shapes):
    """A function running the one-node network on random inputs, and the inputs."""
    net = ml.Network("bench")
    ins = [net.input(f"x{i}", s) for i, s in enumerate(shapes)]
    net.output(build(net, *ins), "y")
    session = ml.Session(net, device=device)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    state, heap, table, _ = session.compile(shapes)
    for i, a in enumerate(arrays):
        table.set_tensor(mk.Tensor.from_numpy(device, a), i)
    queue = device.make_command_queue()

    def encode():
        cb = queue.make_command_buffer()
        enc = cb.make_machine_learning_command_encoder()
        enc.set_pipeline_state(state)
        enc.set_argument_table(table)
        enc.dispatch_network(heap)
        enc.end_encoding()
        return cb

    def run():
        cb = encode()
        cb.commit()
        cb.wait_until_completed()

    recorded = encode()   # never committed: its commands are run directly
    commands = list(recorded._commands)

    def kernels():
        for command in commands:
            command.run(device._pool)

    return run, kernels, arrays


def _torch_cases(torch):
    F = torch.nn.functional
    return {   # name: (shapes, our network op, torch call on the inputs)
        "softmax 1536x128 (attention scores)": (
            [(12 * 128, 128)], lambda n, x: n.softmax(x), lambda x: torch.softmax(x, -1)),
        "softmax 64x1000": ([(64, 1000)], lambda n, x: n.softmax(x), lambda x: torch.softmax(x, -1)),
        "layer norm 512x768": (
            [(512, 768)], lambda n, x: n.layer_norm(x, np.ones(768), np.zeros(768)),
            lambda x: F.layer_norm(x, (768,), torch.ones(768), torch.zeros(768))),
        "erf 1M": ([(1024, 1024)], lambda n, x: n.unary(x, "erf"), torch.erf),
        "hard-swish 1M": ([(1024, 1024)], lambda n, x: n.unary(x, "hard_swish"), F.hardswish),
        "gelu tanh 1M": ([(1024, 1024)], lambda n, x: n.unary(x, "gelu_tanh"),
                         lambda x: F.gelu(x, approximate="tanh")),
        "pad 1x64x64x64 by 1 (NHWC)": (
            [(1, 64, 64, 64)],
            lambda n, x: n.gather(x, [None, _padded(64, 1), _padded(64, 1), None]),
            lambda x: F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1))),
        "bilinear 2x 1x64x64x64 (NHWC)": (
            [(1, 64, 64, 64)],
            lambda n, x: n.resize_linear(x, *_bilinear_tables(64, 128), *_bilinear_tables(64, 128)),
            lambda x: F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)),
    }


def _padded(d, pad):
    """The gather table of a constant pad: -1 outside the source."""
    i = np.arange(-pad, d + pad)
    return np.where((i >= 0) & (i < d), i, -1)


def _bilinear_tables(d, out):
    pos = np.clip((np.arange(out) + 0.5) * d / out - 0.5, 0, d - 1)
    i0 = np.floor(pos).astype(np.int32)
    return i0, np.minimum(i0 + 1, d - 1), (pos - i0).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["softmax 1536x128 (attention scores)", "softmax 64x1000", "layer norm 512x768",
                                  "erf 1M", "hard-swish 1M", "gelu tanh 1M", "pad 1x64x64x64 by 1 (NHWC)",
                                  "bilinear 2x 1x64x64x64 (NHWC)"])
def test_nn_vs_torch(report, case, threads):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(threads)
    shapes, build, peer = _torch_cases(torch)[case]
    run, kernels, arrays = _dispatcher(mk.Device(num_threads=threads), build, shapes)
    tensors = [torch.from_numpy(a) for a in arrays]
    if "NHWC" in case:   # torch's fastest layout for these: channels_last
        tensors = [t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
                   for t in tensors]
    ta, tp, tb = timing.paired_samples(SECONDS, kernels, run, lambda: peer(*tensors), rounds=ROUNDS,
                                       clock=_clock(threads))
    a, p, b = (np.median(t) * 1e6 for t in (ta, tp, tb))
    report((case, threads, a, b, a / b, f"kernel alone; the whole pass {p:.0f} us; torch {torch.__version__}"))


GEMMS = [(1, 512, 1000), (1, 2048, 1000), (2, 512, 1000), (2, 2048, 1000), (4, 512, 1000), (4, 2048, 1000), (8, 512, 1000), (8, 2048, 1000), (16, 768, 768), (64, 768, 768),
         (197, 384, 1152), (512, 3072, 768)]


@pytest.mark.parametrize("m,k,n", GEMMS, ids=[f"{m}x{k}x{n}" for m, k, n in GEMMS])
def test_constant_gemm_conv_vs_sgemm(report, m, k, n):
    """ours = the 1x1 convolution path, peer = mk_sgemm: ratio < 1 means the convolution is
    faster (the gemm node uses it beyond one row). One thread, thread CPU time."""
    device = mk.Device(num_threads=1)
    queue = device.make_command_queue()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    wt, b = np.ascontiguousarray(w.T), rng.standard_normal(n).astype(np.float32)
    y1, y2 = np.zeros((m, n), np.float32), np.zeros((m, n), np.float32)
    kernel = _conv_kernel(device, {"weights": w.reshape(n, 1, 1, k), "bias": b, "strides": (1, 1),
                                   "dilations": (1, 1), "pads": (0, 0, 0, 0), "groups": 1, "neuron": None})

    def operand(a, name):
        return _Operand(a.ctypes.data, a.shape, _packed(a.shape), TensorDataType.FLOAT32, name)

    def conv():
        cb = queue.make_command_buffer()
        gemm_op(cb, kernel, operand(x, "x"), operand(y1, "y"), "gemm")
        cb.commit()
        cb.wait_until_completed()

    def sgemm():
        cb = queue.make_command_buffer()
        command = _native.GemmCommand(1, m, n, k, 1.0, 0.0, b)
        command.set_operand(0, x.ctypes.data, 4, k, 1, 0)
        command.set_operand(1, wt.ctypes.data, 4, n, 1, 0)
        command.set_operand(2, y2.ctypes.data, 4, n, 1, 0)
        cb._add(command, [], "sgemm")
        cb.commit()
        cb.wait_until_completed()

    conv()
    sgemm()
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-3)
    ta, tb = timing.paired_samples(SECONDS, conv, sgemm, rounds=ROUNDS, clock=time.thread_time)
    a, bb = np.median(ta) * 1e6, np.median(tb) * 1e6
    report((f"constant-B GEMM {m}x{k}x{n}: 1x1 conv vs mk_sgemm", 1, a, bb, a / bb,
            f"{2 * m * n * k / a / 1e3:.1f} vs {2 * m * n * k / bb / 1e3:.1f} GFLOP/s"))
