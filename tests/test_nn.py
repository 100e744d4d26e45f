"""The nn kernel family (src/nn/) through the IR's nodes: softmax, layer normalisation, erf,
hard-swish, tanh-GELU, the gather (pad / slice / index gather) and bilinear resize, each
against a float64 NumPy reference written here, on every ISA; bound tensors have padded rows,
so the kernels also see strided operands. Tolerances: fp32 relative 1e-5 for normalisations
(float sums in 16 lanes over at most a few thousand elements), 2e-6 for erf and hard-swish
(a few ulp), 1e-5 for tanh-GELU: its exp argument 2u is rounded in fp32, a relative error
|2u| * 2^-24 of the result, up to ~3e-6 where the result is tiny."""
import math

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import _native, ml


def run(device, build, *arrays):
    """The network build(net, *inputs) -> output value, run on arrays; the output array."""
    net = ml.Network("t")
    inputs = [net.input(f"x{i}", a.shape) for i, a in enumerate(arrays)]
    net.output(build(net, *inputs), "y")
    return ml.Session(net, device=device).run({f"x{i}": a for i, a in enumerate(arrays)})["y"]


def erf64(x):
    return np.vectorize(math.erf)(np.asarray(x, np.float64))


SHAPES = [(1, 1), (3, 1), (2, 5), (4, 16), (3, 37), (2, 3, 129), (1, 2, 3, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax(device, isa, rng, shape):
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    y = run(device, lambda n, a: n.softmax(a), x)
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_softmax_extremes(device, isa):
    x = np.array([[1e30, 0, -1e30, 5], [-np.inf, 0, 0, -np.inf], [88, 89, 90, -200]], np.float32)
    y = run(device, lambda n, a: n.softmax(a), x)
    xd = x.astype(np.float64)
    e = np.exp(xd - xd.max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("shape,axis", [((2, 5), -1), ((3, 4, 37), 1), ((2, 3, 4, 5), 0), ((1, 7, 300), 2)])
@pytest.mark.parametrize("output", ml.Network.LAYER_NORM_OUTPUTS)
def test_layer_norm(device, isa, rng, shape, axis, output):
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    inner = shape[axis:]
    scale = rng.standard_normal(inner[-1:]).astype(np.float32)   # broadcast over the normalised dims
    bias = rng.standard_normal(inner).astype(np.float32)
    y = run(device, lambda n, a: n.layer_norm(a, scale, bias, axis, 1e-3, output), x)
    xd = x.astype(np.float64)
    dims = tuple(range(axis % len(shape), len(shape)))
    mean = xd.mean(dims, keepdims=True)
    inv = 1 / np.sqrt(((xd - mean) ** 2).mean(dims, keepdims=True) + 1e-3)
    want = {"y": (xd - mean) * inv * scale + bias, "mean": mean, "inv_std_dev": inv}[output]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("function", ml.Network.UNARY)
def test_unary(device, isa, rng, function):
    x = np.concatenate([rng.standard_normal(1000) * 3, np.linspace(-12, 12, 1001), [0.0, -0.0, 1e-30, -1e-30],
                        [np.inf, -np.inf, np.nan]]).astype(np.float32).reshape(1, -1)
    y = run(device, lambda n, a: n.unary(a, function), x)
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        want = {"erf": erf64(xd),
                "hard_swish": xd * np.clip(xd / 6 + 0.5, 0, 1),
                "gelu_tanh": xd / (1 + np.exp(-2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))}[function]
    finite = np.isfinite(xd)
    np.testing.assert_allclose(y[finite], want[finite], rtol=1e-5 if function == "gelu_tanh" else 2e-6, atol=1e-37)
    if function == "erf":
        np.testing.assert_array_equal(y[~finite], [1, -1, np.nan])


def gather_reference(x, index, value):
    out = x.astype(np.float64)
    for k, t in enumerate(index):
        if t is not None:
            t = np.asarray(t)
            taken = np.take(out, np.maximum(t, 0), axis=k)
            mask = (t < 0).reshape([-1 if i == k else 1 for i in range(x.ndim)])
            out = np.where(mask, value, taken)
    return out


GATHERS = [  # shape, index tables (None: all)
    ((2, 3, 4, 5), [None, None, [0, 0, 1, 2, 3, 3], [-1, 0, 1, 2, 3, 4, -1]]),       # edge / constant pads
    ((2, 3, 4, 5), [None, [2, 1], None, [4, 2, 0]]),                                 # negative steps
    ((7, 33), [[6, 0, -1], list(range(1, 33, 2))]),
    ((2, 2, 3, 2, 17), [None, [1, -1], None, [1, 0], list(range(17))]),              # rank 5
    ((1, 1, 1, 40), [None, None, None, list(range(3, 40))]),                          # one memcpy per row
]


@pytest.mark.parametrize("shape,index", GATHERS)
def test_gather(device, isa, rng, shape, index):
    x = rng.standard_normal(shape).astype(np.float32)
    y = run(device, lambda n, a: n.gather(a, index, value=2.5), x)
    np.testing.assert_array_equal(y, gather_reference(x, index, 2.5))


def resize_reference(x, y0, y1, wy, x0, x1, wx):
    xd = x.astype(np.float64)
    wy, wx = np.asarray(wy, np.float64)[:, None, None], np.asarray(wx, np.float64)[None, :, None]
    top = xd[:, y0][:, :, x0] * (1 - wx) + xd[:, y0][:, :, x1] * wx
    bottom = xd[:, y1][:, :, x0] * (1 - wx) + xd[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize("shape,out_hw", [((1, 2, 2, 1), (4, 4)), ((2, 5, 7, 19), (11, 3)), ((1, 9, 8, 64), (18, 16))])
def test_resize_linear(device, isa, rng, shape, out_hw):
    x = rng.standard_normal(shape).astype(np.float32)
    tables = []
    for d, o in zip(shape[1:3], out_hw):
        pos = np.clip((np.arange(o) + 0.5) * d / o - 0.5, 0, d - 1)
        i0 = np.floor(pos).astype(np.int32)
        tables += [i0, np.minimum(i0 + 1, d - 1), (pos - i0).astype(np.float32)]
    y = run(device, lambda n, a: n.resize_linear(a, *tables), x)
    np.testing.assert_allclose(y, resize_reference(x, *tables), rtol=1e-5, atol=1e-6)


def test_threads_give_identical_bits(rng):
    """Chunks depend on the shape only: 1 and 2 threads give the same bits."""
    x = rng.standard_normal((64, 300)).astype(np.float32)
    g = rng.standard_normal(300).astype(np.float32)
    for build in (lambda n, a: n.softmax(a), lambda n, a: n.layer_norm(a, g, g),
                  lambda n, a: n.unary(a, "erf"), lambda n, a: n.gather(a, [list(range(63, -1, -3)), None])):
        ys = [run(mk.Device(num_threads=t), build, x) for t in (1, 2)]
        np.testing.assert_array_equal(ys[0], ys[1])


def test_kernels_refuse_bad_tables():
    """The C checks index tables against the source extent (MK_EINVAL -> ValueError)."""
    src, dst = np.zeros(8, np.float32), np.zeros(8, np.float32)
    ones = np.zeros(1, np.int32)
    command = _native.NNGatherCommand([ones, ones, ones, np.array([0, 9], np.int32)], 0.0, (1, 1, 1, 8), (1, 1, 1, 2))
    command.set_operand(0, src.ctypes.data, 4, 0, 0, 0, 1)
    command.set_operand(1, dst.ctypes.data, 4, 0, 0, 0, 1)
    with pytest.raises(Exception, match="gather|NNGather|invalid"):
        command.run()
    with pytest.raises(ValueError, match="index"):
        _native.NNGatherCommand([ones, ones, ones], 0.0, (1, 1, 1, 8), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="wy"):
        _native.NNResizeCommand(ones, ones, np.zeros(2, np.float32), ones, ones, np.zeros(1, np.float32),
                                1, 1, (1, 1, 1, 1))


def test_network_checks(device):
    net = ml.Network("t")
    x = net.input("x", (2, 3))
    with pytest.raises(mk.ValidationError, match="function must be"):
        net.unary(x, "gelu_erf")
    with pytest.raises(mk.ValidationError, match="index table 1"):
        net.gather(x, [None, [3]])
    with pytest.raises(mk.ValidationError, match="contiguous range"):
        net.reduce(net.input("z", (2, 3, 4)), "sum", (0, 2))
    with pytest.raises(mk.ValidationError, match="axis 2"):
        net.layer_norm(x, axis=2)
    with pytest.raises(mk.ValidationError, match="inner dimensions"):
        net.matmul(x, x)
