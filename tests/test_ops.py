"""mpskernels.ops against plain float64 references written here (einsum over taps for the
convolutions, window loops for pooling, float64 matmul and reductions, the neurons'
formulas): many shapes (odd sizes, strides, dilation, groups, depthwise, batch > 1, channel
counts not multiples of 16, both layouts, channels-last / strided / negative-stride / misaligned
inputs, out= in every form), the weights cache (reuse, and never stale after an in-place
change), bad input, and bitwise equality for 1 and 2 threads.

Tolerances. Products (conv, linear, matmul): |ours - ref| <= 1e-5 * S, S = sum |w*x| (+ |b|)
of each output: the fp32 error of a K-term sum is at most ~K*u*S (u = 2^-24) and typically
sqrt(K)*u*S; 1e-5*S covers K <= ~170 terms at the worst rate and all K used here at the
typical rate (as tests/test_convolution.py; Winograd's measured bound is 1.7e-6*S). A fused
neuron maps that interval (tolerance = the spread of f over y +- e, + 1e-6 |f|). Sums and
means: 1e-6 * sum |x| (+ 1e-30); max / min / argmax / argmin exact. Neurons: relative 1e-6
(~8 ulps) + 1e-7 absolute (the kernels' documented accuracy; ReLU, PReLU, ReLU6, |x| exact)."""
import math

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ops

F32 = np.float32


# ---- references ---------------------------------------------------------------------------------

def conv_ref(x, w, b, stride, pads, dilation, groups):
    """float64 NCHW cross-correlation, and S = sum |w*x| + |b| per output."""
    (pt, pb), (pl, pr) = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    w = w.astype(np.float64)
    n, _, h, wd = xp.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y, s = np.zeros((n, o, ho, wo)), np.zeros((n, o, ho, wo))
    for g in range(groups):
        for ky in range(kh):
            for kx in range(kw):
                y0, x0 = ky * dilation[0], kx * dilation[1]
                patch = xp[:, g * cg:(g + 1) * cg, y0:y0 + stride[0] * (ho - 1) + 1:stride[0],
                           x0:x0 + stride[1] * (wo - 1) + 1:stride[1]]
                wt = w[g * og:(g + 1) * og, :, ky, kx]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wt)
                s[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", np.abs(patch), np.abs(wt))
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
        s += np.abs(b).reshape(1, -1, 1, 1)
    return y, s


def conv_transpose_ref(x, w, b, stride, pad, output_padding, dilation, groups):
    """float64 NCHW transposed convolution by its definition: input pixel (iy, ix) adds
    w[c, o, ky, kx] * x to output (iy*stride - pad + ky*dilation, ...); and S."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // groups
    full = [(e - 1) * s + d * (k - 1) + 1 + op
            for e, s, d, k, op in zip((h, wd), stride, dilation, (kh, kw), output_padding)]
    y, s = np.zeros((n, og * groups, *full)), np.zeros((n, og * groups, *full))
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg]
        for ky in range(kh):
            for kx in range(kw):
                wt = w[g * cg:(g + 1) * cg, :, ky, kx]
                y0, x0 = ky * dilation[0], kx * dilation[1]
                sl = (slice(None), slice(g * og, (g + 1) * og),
                      slice(y0, y0 + (h - 1) * stride[0] + 1, stride[0]),
                      slice(x0, x0 + (wd - 1) * stride[1] + 1, stride[1]))
                y[sl] += np.einsum("nchw,co->nohw", xg, wt)
                s[sl] += np.einsum("nchw,co->nohw", np.abs(xg), np.abs(wt))
    crop = (slice(None), slice(None), slice(pad[0], full[0] - pad[0]),
            slice(pad[1], full[1] - pad[1]))
    y, s = y[crop], s[crop]
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
        s += np.abs(b).reshape(1, -1, 1, 1)
    return y, s


def pool_ref(x, mode, k, stride, pad, dilation, ceil_mode, count_include_pad):
    """float64 NCHW pooling by windows, PyTorch's output size and divisor rules."""
    n, c, h, w = x.shape
    size = []
    for e, kk, s, p, d in zip((h, w), k, stride, pad, dilation):
        span = d * (kk - 1) + 1
        o = (e + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= e + p:
            o -= 1
        size.append(o)
    y = np.zeros((n, c, *size))
    for oy in range(size[0]):
        for ox in range(size[1]):
            ys = [oy * stride[0] - pad[0] + i * dilation[0] for i in range(k[0])]
            xs = [ox * stride[1] - pad[1] + j * dilation[1] for j in range(k[1])]
            taps = [x[:, :, yy, xx] for yy in ys for xx in xs if 0 <= yy < h and 0 <= xx < w]
            if mode == "max":
                y[:, :, oy, ox] = np.max(taps, axis=0)
            else:
                if count_include_pad:   # the window clipped to the padded input
                    hh = min(ys[-1] + 1, h + pad[0]) - ys[0]
                    ww = min(xs[-1] + 1, w + pad[1]) - xs[0]
                    divisor = hh * ww
                else:
                    divisor = len(taps)
                y[:, :, oy, ox] = np.sum(taps, axis=0, dtype=np.float64) / divisor
    return y


def random(rng, *shape):
    return rng.uniform(-1, 1, shape).astype(F32)


def assert_within(got, expected, tol, what=""):
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = np.abs(got.astype(np.float64) - expected)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), got.shape)
        raise AssertionError(f"{what}{bad.sum()} of {got.size} outside tolerance; at {i}: got "
                             f"{got[i]!r}, expected {expected[i]!r} +- {tol[i]!r}")


def to_layout(x, layout):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def from_layout(y, layout):
    return y.transpose(0, 3, 1, 2) if layout == "NHWC" else y


# ---- conv2d ---------------------------------------------------------------------------------------

# (N, C, H, W, out, kh, kw, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 3, 9, 11, 5, 3, 3, 1, 1, 1, 1),
    (2, 17, 13, 7, 33, 3, 3, 2, 1, 1, 1),
    (3, 8, 10, 10, 16, 1, 1, 1, 0, 1, 1),
    (1, 6, 15, 12, 9, 3, 3, 1, 2, 2, 3),
    (2, 24, 11, 9, 24, 3, 3, 1, 1, 1, 24),           # depthwise
    (1, 12, 14, 14, 36, 5, 5, 2, 2, 1, 12),          # depthwise, multiplier 3
    (1, 3, 23, 19, 20, 7, 7, 2, 3, 1, 1),            # an RGB first layer
    (2, 40, 8, 8, 40, 3, 3, 1, 1, 1, 1),             # Winograd
    (1, 32, 9, 7, 20, 3, 1, (2, 1), (1, 0), (1, 2), 4),
    (1, 5, 6, 5, 7, 2, 4, 1, ((0, 1), (2, 1)), 1, 1),  # asymmetric padding
    (1, 16, 7, 7, 8, 3, 3, 1, "same", 2, 2),
    (2, 4, 5, 6, 3, 3, 2, 1, "valid", 1, 1),
]


def _pads(padding, k, dilation):
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        return tuple((t // 2, t - t // 2) for t in total)
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        return padding
    py, px = padding if isinstance(padding, tuple) else (padding, padding)
    return (py, py), (px, px)


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"k{c[5]}{c[6]}s{c[7]}p{c[8]}d{c[9]}g{c[10]}")
def test_conv2d(device, rng, case, layout):
    n, c, h, w, o, kh, kw, stride, padding, dilation, groups = case
    x, wt, b = random(rng, n, c, h, w), random(rng, o, c // groups, kh, kw), random(rng, o)
    y, s = conv_ref(x, wt, b, _pair(stride), _pads(padding, (kh, kw), _pair(dilation)),
                    _pair(dilation), groups)
    got = ops.conv2d(to_layout(x, layout), wt, b, stride, padding, dilation, groups,
                     layout=layout, device=device)
    assert got.dtype == F32 and got.flags.c_contiguous
    assert_within(from_layout(got, layout), y, 1e-5 * s)


@pytest.mark.parametrize("activation", ["relu", "relu6", "sigmoid", "tanh", "gelu", "elu",
                                        "leaky", "prelu"])
def test_conv2d_activation(device, rng, activation):
    x, wt, b = random(rng, 2, 10, 8, 9), random(rng, 12, 10, 3, 3), random(rng, 12)
    y, s = conv_ref(x, wt, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    slopes = rng.uniform(0, 0.5, 12)
    f = {"relu": lambda v: np.maximum(v, 0), "relu6": lambda v: np.clip(v, 0, 6),
         "sigmoid": lambda v: 1 / (1 + np.exp(-v)), "tanh": np.tanh,
         "gelu": lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2))),
         "elu": lambda v: np.where(v >= 0, v, np.expm1(v)),
         "leaky": lambda v: np.where(v >= 0, v, 0.1 * v),
         "prelu": lambda v: np.where(v >= 0, v, slopes.reshape(1, -1, 1, 1) * v)}[activation]
    act = {"leaky": mk.NNNeuronDescriptor(mk.CNNNeuronType.RELU, 0.1),
           "prelu": mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes)}.get(activation, activation)
    got = ops.conv2d(x, wt, b, padding=1, activation=act, device=device)
    e = 1e-5 * s
    tol = np.maximum(np.abs(f(y + e) - f(y)), np.abs(f(y - e) - f(y))) + 1e-6 * np.abs(f(y)) + 1e-7
    assert_within(got, f(y), tol)


def test_conv2d_memory_formats(device, rng):
    """Channels-last NCHW views run in place and give a channels-last result; strided,
    negative-stride, Fortran-order and misaligned inputs are copied; the same numbers."""
    x, wt, b = random(rng, 2, 6, 11, 10), random(rng, 8, 6, 3, 3), random(rng, 8)
    y, s = conv_ref(x, wt, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    tol = 1e-5 * s
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    got = ops.conv2d(channels_last, wt, b, padding=1, device=device)
    assert got.transpose(0, 2, 3, 1).flags.c_contiguous   # memory format kept, as PyTorch
    assert_within(got, y, tol)
    wide = np.zeros((2, 6, 11, 20), F32)
    wide[..., ::2] = x
    assert_within(ops.conv2d(wide[..., ::2], wt, b, padding=1, device=device), y, tol)
    flipped = np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]
    assert_within(ops.conv2d(flipped, wt, b, padding=1, device=device), y, tol)
    assert_within(ops.conv2d(np.asfortranarray(x), np.asfortranarray(wt), b, padding=1,
                             device=device), y, tol)
    raw = np.zeros(x.size * 4 + 1, np.uint8)
    misaligned = raw[1:].view(F32).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned
    assert_within(ops.conv2d(misaligned, wt, b, padding=1, device=device), y, tol)
    nhwc_view = np.zeros((2, 11, 10, 9), F32)[..., 1:7]   # channel slice: pixel stride 9
    nhwc_view[...] = x.transpose(0, 2, 3, 1)
    assert_within(ops.conv2d(nhwc_view, wt, b, padding=1, layout="NHWC", device=device)
                  .transpose(0, 3, 1, 2), y, tol)


def test_conv2d_out(device, rng):
    x, wt = random(rng, 1, 4, 6, 6), random(rng, 5, 4, 3, 3)
    y, s = conv_ref(x, wt, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    out = np.full((1, 5, 6, 6), np.nan, F32)
    assert ops.conv2d(x, wt, padding=1, out=out, device=device) is out
    assert_within(out, y, 1e-5 * s)
    big = np.full((1, 5, 6, 12), np.nan, F32)   # a strided out
    ops.conv2d(x, wt, padding=1, out=big[..., ::2], device=device)
    assert_within(big[..., ::2], y, 1e-5 * s)
    assert np.isnan(big[..., 1::2]).all()
    nhwc = np.full((1, 6, 6, 5), np.nan, F32)    # out whose memory is channels-last
    ops.conv2d(x, wt, padding=1, out=nhwc.transpose(0, 3, 1, 2), device=device)
    assert_within(nhwc.transpose(0, 3, 1, 2), y, 1e-5 * s)
    same = np.zeros((1, 4, 6, 6), F32)           # out overlapping the input: made aside
    same[...] = x
    y4, s4 = conv_ref(x, wt[:4], None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    ops.conv2d(same, wt[:4].copy(), padding=1, out=same, device=device)
    assert_within(same, y4, 1e-5 * s4)


@pytest.mark.parametrize("case", [
    # (N, C, H, W, out, kh, kw, stride, padding, output_padding, dilation, groups)
    (1, 4, 5, 6, 3, 3, 3, 2, 1, 1, 1, 1),
    (2, 6, 4, 7, 4, 4, 4, 2, 1, 0, 1, 2),
    (1, 17, 3, 3, 9, 3, 3, 1, 0, 0, 1, 1),
    (1, 8, 5, 4, 8, 3, 2, (3, 2), (1, 0), (2, 1), (2, 1), 1),
    (2, 9, 6, 5, 6, 5, 5, 2, 2, 1, 1, 3),
    (1, 16, 4, 4, 16, 3, 3, 2, 1, 1, 1, 16),
    (1, 5, 7, 7, 7, 2, 2, 2, 0, 0, 1, 1),
])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv_transpose2d(device, rng, case, layout):
    n, c, h, w, o, kh, kw, stride, padding, output_padding, dilation, groups = case
    x, wt, b = random(rng, n, c, h, w), random(rng, c, o // groups, kh, kw), random(rng, o)
    y, s = conv_transpose_ref(x, wt, b, _pair(stride), _pair(padding), _pair(output_padding),
                              _pair(dilation), groups)
    got = ops.conv_transpose2d(to_layout(x, layout), wt, b, stride, padding, output_padding,
                               groups, dilation, layout=layout, device=device)
    assert_within(from_layout(got, layout), y, 1e-5 * s)


def test_conv_isas(device, rng, isa):
    """The cached kernels serve every ISA (plans are made per ISA)."""
    x, wt = random(rng, 1, 20, 9, 9), random(rng, 12, 20, 3, 3)
    y, s = conv_ref(x, wt, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert_within(ops.conv2d(x, wt, padding=1, device=device), y, 1e-5 * s)
    xt = random(rng, 1, 12, 5, 5)
    y, s = conv_transpose_ref(xt, wt.reshape(12, 20, 3, 3)[:, :20], None, (2, 2), (1, 1), (0, 0), (1, 1), 1)
    assert_within(ops.conv_transpose2d(xt, wt.reshape(12, 20, 3, 3), stride=2, padding=1,
                                       device=device), y, 1e-5 * s)


def test_weights_cache(rng):
    """Packed once per weights array, and never stale: an in-place change of the weights or
    the bias is seen by the next call."""
    device = mk.Device(num_threads=1)
    x, wt, b = random(rng, 1, 8, 7, 7), random(rng, 8, 8, 3, 3), random(rng, 8)
    first = ops.conv2d(x, wt, b, padding=1, device=device)
    kernels = list(device._ops_kernels.values())
    assert len(kernels) == 1
    np.testing.assert_array_equal(ops.conv2d(x, wt, b, padding=1, device=device), first)
    assert list(device._ops_kernels.values())[0][0] is kernels[0][0]   # not repacked
    wt[2, 1, 0, 0] += 1.0
    y, s = conv_ref(x, wt, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert_within(ops.conv2d(x, wt, b, padding=1, device=device), y, 1e-5 * s)
    b[3] = -5.0
    y, s = conv_ref(x, wt, b, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert_within(ops.conv2d(x, wt, b, padding=1, device=device), y, 1e-5 * s)
    wt[0, 0, 0, 0] = np.nan   # NaN weights are compared by their bits: still cached
    ops.conv2d(x, wt, b, padding=1, device=device)
    kernel = list(device._ops_kernels.values())[-1][0]
    ops.conv2d(x, wt, b, padding=1, device=device)
    assert list(device._ops_kernels.values())[-1][0] is kernel
    weights = [random(rng, 8, 8, 1, 1) for _ in range(ops._CACHE_SIZE + 5)]
    for w in weights:   # all alive: distinct addresses, distinct entries
        ops.conv2d(x, w, device=device)
    assert len(device._ops_kernels) == ops._CACHE_SIZE
    weights[-1][...] = 0   # an array freed and another made at its address: the bits decide
    assert not ops.conv2d(x, weights[-1], device=device).any()
    ops.clear_cache(device)
    assert not device._ops_kernels


def test_cache_does_not_keep_the_device_alive(rng):
    import gc
    import weakref
    device = mk.Device(num_threads=2)
    ops.conv2d(random(rng, 1, 4, 5, 5), random(rng, 4, 4, 3, 3), device=device)
    ref = weakref.ref(device)
    del device
    gc.collect()
    assert ref() is None


# ---- pooling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("args", [
    # (N, C, H, W, kernel, stride, padding, dilation, ceil_mode, count_include_pad)
    (1, 3, 9, 9, 3, 2, 1, 1, False, True),
    (2, 17, 10, 7, 3, 2, 1, 1, True, True),
    (1, 5, 8, 11, (2, 3), (2, 1), (1, 1), 1, True, False),
    (1, 20, 7, 7, 2, None, 0, 1, False, True),
    (2, 4, 12, 9, 3, 1, 1, 2, False, False),
    (1, 33, 6, 6, 6, 1, 0, 1, False, True),      # global
])
def test_pools(device, rng, args, layout):
    n, c, h, w, k, stride, pad, dilation, ceil_mode, include = args
    x = random(rng, n, c, h, w)
    k2, s2 = _pair(k), _pair(k if stride is None else stride)
    got = ops.max_pool2d(to_layout(x, layout), k, stride, pad, dilation, ceil_mode,
                         layout=layout, device=device)
    np.testing.assert_array_equal(from_layout(got, layout), pool_ref(
        x, "max", k2, s2, _pair(pad), _pair(dilation), ceil_mode, True).astype(F32))
    if dilation == 1:
        got = ops.avg_pool2d(to_layout(x, layout), k, stride, pad, ceil_mode, include,
                             layout=layout, device=device)
        y = pool_ref(x, "avg", k2, s2, _pair(pad), (1, 1), ceil_mode, include)
        assert_within(from_layout(got, layout), y, 1e-6 * np.abs(y) + 1e-7)


# ---- matmul and linear ----------------------------------------------------------------------------

def product_ref(a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.matmul(a64, b64), np.matmul(np.abs(a64), np.abs(b64))


@pytest.mark.parametrize("sa, sb", [
    ((5, 7), (7, 3)), ((1, 33), (33, 65)), ((40, 17), (17, 1)), ((7,), (7, 9)), ((9, 7), (7,)),
    ((7,), (7,)), ((3, 4, 5), (5, 6)), ((2, 3, 4, 5), (3, 5, 2)), ((4, 5), (2, 3, 5, 6)),
    ((2, 1, 4, 5), (1, 3, 5, 2)), ((130, 70), (70, 50)), ((6, 1, 5), (6, 5, 1)),
])
def test_matmul(device, rng, sa, sb):
    a, b = random(rng, *sa), random(rng, *sb)
    y, s = product_ref(a, b)
    got = ops.matmul(a, b, device=device)
    assert got.shape == np.matmul(a, b).shape
    assert_within(got, y, 1e-5 * s + 1e-30)


def test_matmul_strided_and_out(device, rng, isa):
    a, b = random(rng, 3, 9, 6), random(rng, 3, 8, 9)
    at, bt = a.transpose(0, 2, 1), b.transpose(0, 2, 1)   # (3, 6, 9) @ (3, 9, 8), in place
    y, s = product_ref(at, bt)
    assert_within(ops.matmul(at, bt, device=device), y, 1e-5 * s)
    assert_within(ops.matmul(at[:, ::2], bt[..., ::-1], device=device),
                  *(lambda r: (r[0], 1e-5 * r[1]))(product_ref(at[:, ::2], bt[..., ::-1])))
    out = np.full((3, 6, 8), np.nan, F32)
    assert ops.matmul(at, bt, out=out, device=device) is out
    assert_within(out, y, 1e-5 * s)
    wide = np.zeros((3, 6, 16), F32)
    ops.matmul(at, bt, out=wide[..., ::2], device=device)
    assert_within(wide[..., ::2], y, 1e-5 * s)
    sq = random(rng, 6, 6)
    y, s = product_ref(sq, sq)
    ops.matmul(sq, sq, out=sq, device=device)   # out is an input: made aside
    assert_within(sq, y, 1e-5 * s)
    assert ops.matmul(random(rng, 4, 0), random(rng, 0, 3), device=device).tolist() == [[0] * 3] * 4
    assert ops.matmul(random(rng, 0, 4), random(rng, 4, 3), device=device).shape == (0, 3)


@pytest.mark.parametrize("activation", [None, "relu", "relu6", "sigmoid"])
@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 3, 33)])
def test_linear(device, rng, shape, activation):
    x, w, b = random(rng, *shape) * 4, random(rng, 11, shape[-1]), random(rng, 11)
    y, s = product_ref(x, w.T)
    y, s = y + b, s + np.abs(b)
    f = {None: lambda v: v, "relu": lambda v: np.maximum(v, 0),
         "relu6": lambda v: np.clip(v, 0, 6), "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[activation]
    e = 1e-5 * s
    tol = np.maximum(np.abs(f(y + e) - f(y)), np.abs(f(y - e) - f(y))) + 1e-6 * np.abs(f(y)) + 1e-7
    assert_within(ops.linear(x, w, b, activation=activation, device=device), f(y), tol)


# ---- reductions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [
    ((37,), None), ((37,), 0), ((5, 7), None), ((5, 7), 0), ((5, 7), 1), ((5, 7), -1),
    ((2, 3, 4, 5), (1, 3)), ((2, 3, 4, 5), (0, 2)), ((2, 3, 4, 5), (2, 3)), ((2, 3, 4, 5), ()),
    ((3, 1, 5), 1), ((4, 33, 17), (0, 1, 2)), ((300, 200), None), ((1, 1), None),
])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(device, rng, shape, axis, keepdims):
    x = random(rng, *shape)
    x64 = x.astype(np.float64)
    bound = np.sum(np.abs(x64), axis=axis, keepdims=keepdims)
    for ours, ref, tol in ((ops.sum, np.sum, 1e-6 * bound + 1e-30),
                           (ops.mean, np.mean, 1e-6 * bound / max(1, x.size // max(1, np.size(bound))) + 1e-30),
                           (ops.max, np.max, 0), (ops.min, np.min, 0)):
        got = ours(x, axis, keepdims, device=device)
        expected = ref(x64, axis=axis, keepdims=keepdims)
        assert got.dtype == F32 and got.shape == np.shape(expected), ours.__name__
        assert_within(np.asarray(got), np.asarray(expected), np.asarray(tol), f"{ours.__name__}: ")


@pytest.mark.parametrize("shape, axis", [((37,), None), ((6, 9), 1), ((6, 9), 0), ((2, 7, 3, 5), 2),
                                         ((2, 7, 3, 5), None), ((4, 1), 1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_arg_reductions(device, rng, shape, axis, keepdims):
    x = np.round(random(rng, *shape) * 4) / 4   # ties: the first index wins, as NumPy
    for ours, ref in ((ops.argmax, np.argmax), (ops.argmin, np.argmin)):
        got = ours(x, axis, keepdims, device=device)
        expected = ref(x, axis=axis, keepdims=keepdims)
        assert got.dtype == np.int64 and got.shape == np.shape(expected)
        np.testing.assert_array_equal(got, expected)


def test_reductions_strided_out_and_special(device, rng):
    x = random(rng, 8, 10)[::2, ::-1]
    assert_within(ops.sum(x, 1, device=device), x.astype(np.float64).sum(1),
                  1e-6 * np.abs(x).astype(np.float64).sum(1))
    out = np.zeros(4, F32)
    assert ops.max(x, 1, out=out, device=device) is out
    np.testing.assert_array_equal(out, x.max(1))
    idx = np.zeros(20, np.int64)
    assert ops.argmin(x, 0, out=idx[::2], device=device).base is idx
    np.testing.assert_array_equal(idx[::2], x.argmin(0))
    y = x.copy()
    y[1, 3], y[2, 5] = np.nan, np.nan
    assert np.isnan(ops.max(y, 1, device=device)[[1, 2]]).all()
    assert ops.argmax(y, 1, device=device)[1] == 3   # the first NaN, as NumPy
    assert ops.sum(np.zeros((3, 0), F32), 1, device=device).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="no identity"):
        ops.max(np.zeros((3, 0), F32), 1, device=device)
    assert ops.sum(np.array(2.5, F32), device=device) == 2.5
    assert ops.sum(np.float32(2.5), device=device) == 2.5   # NumPy scalars too


# ---- neurons ------------------------------------------------------------------------------------

def _erf(v):
    return np.vectorize(math.erf)(v)


NEURONS = [
    ("relu", (), lambda v: np.maximum(v, 0)),
    ("leaky_relu", (0.2,), lambda v: np.where(v >= 0, v, 0.2 * v)),
    ("relu6", (), lambda v: np.clip(v, 0, 6)),
    ("elu", (0.7,), lambda v: np.where(v >= 0, v, 0.7 * np.expm1(v))),
    ("gelu", (), lambda v: 0.5 * v * (1 + _erf(v / math.sqrt(2)))),
    ("sigmoid", (), lambda v: 1 / (1 + np.exp(-v))),
    ("hardsigmoid", (), lambda v: np.clip(v / 6 + 0.5, 0, 1)),
    ("tanh", (), np.tanh),
    ("softplus", (2.0,), lambda v: np.log1p(np.exp(2 * v)) / 2),
    ("softsign", (), lambda v: v / (1 + np.abs(v))),
    ("abs", (), np.abs),
    ("exp", (), np.exp),
    ("log", (), lambda v: np.log(np.abs(v))),
    ("power", (3.0,), lambda v: v ** 3),
]


@pytest.mark.parametrize("name, args, f", NEURONS, ids=[n[0] for n in NEURONS])
def test_neurons(device, rng, name, args, f):
    x = rng.uniform(-6, 6, (3, 5, 17)).astype(F32)
    if name == "log":
        x = np.abs(x) + F32(1e-3)
    for view in (x, x[:, ::2, ::-1], x.transpose(2, 0, 1)):
        got = getattr(ops, name)(view, *args, device=device)
        expected = f(view.astype(np.float64))
        assert got.shape == view.shape and got.dtype == F32
        assert_within(got, expected, 1e-6 * np.abs(expected) + 1e-7, f"{name}: ")


ROW_FUNCTIONS = [
    ("erf", {}, lambda v: _erf(v)),
    ("hardswish", {}, lambda v: v * np.clip((v + 3) / 6, 0, 1)),
    ("gelu", {"approximate": "tanh"},
     lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))),
]


@pytest.mark.parametrize("name, kwargs, f", ROW_FUNCTIONS, ids=[n[0] for n in ROW_FUNCTIONS])
def test_row_functions(device, rng, name, kwargs, f):
    """The src/nn elementwise row ops; 10007 elements: rows of 4096 and a tail."""
    x = rng.uniform(-5, 5, 10007).astype(F32)
    for view in (x, x.reshape(10007, 1)[::3], x[:9999].reshape(9, 1111).T):
        expected = f(view.astype(np.float64))
        got = getattr(ops, name)(view, **kwargs, device=device)
        assert_within(got, expected, 1e-6 * np.abs(expected) + 1e-7, f"{name}: ")


@pytest.mark.parametrize("shape, axis", [((7,), 0), ((4, 9), -1), ((4, 9), 0), ((2, 3, 5, 6), 1),
                                         ((3, 50), 1), ((1, 1), 0)])
def test_softmax(device, rng, shape, axis):
    """Tolerance: exp to a few ulps and a sum of n <= 50 terms: 1e-5 relative (n*u = 3e-6)."""
    x = rng.uniform(-8, 8, shape).astype(F32)
    for view in (x, np.asfortranarray(x)):
        e = np.exp(view.astype(np.float64) - view.max(axis, keepdims=True))
        expected = e / e.sum(axis, keepdims=True)
        got = ops.softmax(view, axis, device=device)
        assert_within(got, expected, 1e-5 * expected + 1e-9)


@pytest.mark.parametrize("shape, normalized, affine", [((4, 10), 10, True), ((2, 3, 4, 5), (4, 5), True),
                                                       ((6, 33), (33,), False), ((5, 1), 1, True)])
def test_layer_norm(device, rng, shape, normalized, affine):
    """Tolerance 1e-5 (absolute, results are O(1)): fp32 mean and variance of <= 33 terms."""
    x = rng.uniform(-3, 3, shape).astype(F32) + 2
    dims = (normalized,) if isinstance(normalized, int) else normalized
    w = rng.uniform(0.5, 2, dims).astype(F32) if affine else None
    b = rng.uniform(-1, 1, dims).astype(F32) if affine else None
    v = x.astype(np.float64).reshape(-1, math.prod(dims))
    y = ((v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + 1e-5)).reshape(shape)
    if affine:
        y = y * w + b
    got = ops.layer_norm(x, normalized, w, b, device=device)
    assert_within(got, y, 1e-5 * (1 + np.abs(y)))


def test_neuron_out_and_in_place(device, rng):
    x = random(rng, 4, 9)
    expected = np.maximum(x, 0)
    out = np.empty_like(x)
    assert ops.relu(x, out=out, device=device) is out
    np.testing.assert_array_equal(out, expected)
    assert ops.relu(x, out=x, device=device) is x   # in place
    np.testing.assert_array_equal(x, expected)
    y = random(rng, 10)
    expected = np.tanh(y[1:].astype(np.float64))
    ops.tanh(y[1:], out=y[:-1], device=device)   # shifted overlap: made aside
    assert_within(y[:-1], expected, 1e-6 * np.abs(expected) + 1e-7)
    assert ops.relu(np.zeros((0, 3), F32), device=device).shape == (0, 3)
    assert ops.sigmoid(np.zeros((), F32), device=device) == 0.5


def test_prelu(device, rng):
    x = random(rng, 2, 5, 3, 4)
    w = rng.uniform(0, 1, 5).astype(F32)
    np.testing.assert_array_equal(ops.prelu(x, w, device=device),
                                  np.where(x >= 0, x, w.reshape(1, 5, 1, 1) * x))
    np.testing.assert_array_equal(ops.prelu(x, w[:4], axis=-1, device=device),
                                  np.where(x >= 0, x, w[:4] * x))
    np.testing.assert_array_equal(ops.prelu(x, w[:1], device=device), np.where(x >= 0, x, w[0] * x))
    with pytest.raises(ValueError, match="5 slopes"):
        ops.prelu(x, w, axis=2, device=device)


def test_threads_bitwise_identical(rng):
    d1, d2 = mk.Device(num_threads=1), mk.Device(num_threads=2)
    x, w = random(rng, 2, 32, 30, 30), random(rng, 48, 32, 3, 3)
    a, b = random(rng, 300, 200), random(rng, 200, 150)
    for fn in (lambda d: ops.conv2d(x, w, padding=1, device=d),
               lambda d: ops.conv_transpose2d(x, w.transpose(1, 0, 2, 3), stride=2, device=d),
               lambda d: ops.matmul(a, b, device=d), lambda d: ops.sum(x, (0, 2, 3), device=d),
               lambda d: ops.gelu(x, device=d), lambda d: ops.avg_pool2d(x, 3, 2, 1, device=d)):
        np.testing.assert_array_equal(fn(d1), fn(d2))


# ---- bad input ----------------------------------------------------------------------------------

X = np.zeros((1, 4, 6, 6), F32)
W = np.zeros((8, 4, 3, 3), F32)


@pytest.mark.parametrize("call, error, words", [
    (lambda: ops.conv2d(X.astype(np.float64), W), TypeError, "x has dtype float64"),
    (lambda: ops.conv2d(X.tolist(), W), TypeError, "x must be a NumPy array"),
    (lambda: ops.conv2d(X[0], W), ValueError, "x must be 4-D"),
    (lambda: ops.conv2d(X, W[:, :3]), ValueError, "x has 4 channels"),
    (lambda: ops.conv2d(X, W, groups=3), ValueError, "x has 4 channels"),
    (lambda: ops.conv2d(X, W[:6, :1], groups=4), ValueError, "divide the 6 output channels"),
    (lambda: ops.conv2d(X, W, np.zeros(7, F32)), ValueError, "bias has 7 values"),
    (lambda: ops.conv2d(X, W, stride=0), ValueError, "stride must be an int >= 1"),
    (lambda: ops.conv2d(X, W, padding=-1), ValueError, "padding must be an int >= 0"),
    (lambda: ops.conv2d(X, W, padding="same", stride=2), ValueError, "needs stride 1"),
    (lambda: ops.conv2d(X, np.zeros((8, 4, 9, 9), F32)), ValueError, "smaller than the 9x9"),
    (lambda: ops.conv2d(X, W, layout="NCWH"), ValueError, "layout must be"),
    (lambda: ops.conv2d(X, W, activation="swish"), ValueError, "activation must be"),
    (lambda: ops.conv2d(X, W, out=np.zeros((1, 8, 4, 5), F32)), ValueError, "out has shape"),
    (lambda: ops.conv2d(X, W, out=np.zeros((1, 8, 4, 4))), TypeError, "out has dtype"),
    (lambda: ops.conv2d(X, W, out=np.broadcast_to(np.zeros(1, F32), (1, 8, 4, 4))),
     ValueError, "read-only"),
    (lambda: ops.conv2d(X, W, device="cpu"), TypeError, "device must be"),
    (lambda: ops.conv_transpose2d(X, W[:4], output_padding=1), ValueError, "output_padding"),
    (lambda: ops.conv_transpose2d(X, W[:4], groups=3), ValueError, "groups must be"),
    (lambda: ops.max_pool2d(X, 2, padding=2), ValueError, "at most half"),
    (lambda: ops.max_pool2d(X, 7), ValueError, "smaller than the window"),
    (lambda: ops.matmul(np.zeros((3, 4), F32), np.zeros((5, 2), F32)), ValueError, "4 columns"),
    (lambda: ops.matmul(np.zeros((2, 3, 4), F32), np.zeros((3, 4, 2), F32)), ValueError,
     "do not broadcast"),
    (lambda: ops.matmul(np.zeros((), F32), np.zeros(3, F32)), ValueError, "at least one"),
    (lambda: ops.matmul(np.zeros((2, 2), np.int32), np.zeros((2, 2), F32)), TypeError,
     "a has dtype int32"),
    (lambda: ops.linear(np.zeros((2, 5), F32), np.zeros((3, 4), F32)), ValueError, "5 features"),
    (lambda: ops.sum(X, axis=4), ValueError, "out of bounds"),
    (lambda: ops.sum(X, axis=(1, -3)), ValueError, "repeats"),
    (lambda: ops.sum(X, axis=1.0), TypeError, "axis must be"),
    (lambda: ops.argmax(X, axis=(1, 2)), ValueError, "one axis"),
    (lambda: ops.argmax(X, axis=1, out=np.zeros((1, 6, 6), F32)), TypeError, "int64"),
    (lambda: ops.relu(X.astype(np.float16)), TypeError, "float32"),
    (lambda: ops.neuron(X, "swish"), ValueError, "descriptor must be"),
    (lambda: ops.gelu(X, "erf"), ValueError, "approximate must be"),
    (lambda: ops.softmax(X, (1, 2)), TypeError, "one axis"),
    (lambda: ops.softmax(X, 4), ValueError, "out of bounds"),
    (lambda: ops.layer_norm(X, (6, 5)), ValueError, "last dimensions"),
    (lambda: ops.layer_norm(X, 6, np.ones(5, F32)), ValueError, "weight has shape"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_out_with_strides_no_kernel_takes(device, rng):
    """A negative-stride or misaligned out is filled too (the result made aside)."""
    x, wt = random(rng, 1, 3, 5, 5), random(rng, 4, 3, 3, 3)
    y, s = conv_ref(x, wt, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    out = np.zeros((1, 4, 5, 5), F32)
    ops.conv2d(x, wt, padding=1, out=out[:, :, ::-1], device=device)
    assert_within(out[:, :, ::-1], y, 1e-5 * s)
    raw = np.zeros(4 * 25 * 4 + 1, np.uint8)
    odd = raw[1:].view(F32).reshape(1, 4, 5, 5)
    ops.conv2d(x, wt, padding=1, out=odd, device=device)
    assert_within(odd, y, 1e-5 * s)
    r = np.zeros(8, F32)
    ops.relu(np.arange(-4, 4, dtype=F32), out=r[::-1], device=device)
    np.testing.assert_array_equal(r[::-1], np.maximum(np.arange(-4, 4), 0))
    m = np.zeros((3, 3), F32)
    a = random(rng, 3, 3)
    ops.matmul(a, a, out=m[::-1], device=device)
    np.testing.assert_allclose(m[::-1], a.astype(np.float64) @ a, rtol=1e-5, atol=1e-6)


def test_concurrent_calls_share_device_and_cache(rng):
    """Four Python threads calling ops on one device with the same weights: every result
    right (the pool runs a second caller's work inline; cached kernels and plans are shared)."""
    import threading
    device = mk.Device(num_threads=2)
    x, wt, b = random(rng, 2, 16, 12, 12), random(rng, 24, 16, 3, 3), random(rng, 24)
    expected = ops.conv2d(x, wt, b, padding=1, device=device)
    a = random(rng, 40, 30)
    expected_mm = ops.matmul(a, a.T, device=device)
    failures = []

    def work():
        try:
            for _ in range(20):
                np.testing.assert_array_equal(ops.conv2d(x, wt, b, padding=1, device=device), expected)
                np.testing.assert_array_equal(ops.matmul(a, a.T, device=device), expected_mm)
        except Exception as exc:   # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
