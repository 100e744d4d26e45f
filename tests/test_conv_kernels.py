"""The specialised convolution kernels (Winograd F(4,3), conv_winograd*.c; direct for few input
channels, conv_direct*.c; the paths inside igemm, conv_igemm*.c) through the public API against the float64 reference of
conv_reference.py, on every ISA, asserting `conv.implementation` names the kernel that ran.

Tolerance: |ours - ref| <= TOL[kernel] * S (before the neuron; FLOAT16 destinations add half an
fp16 ulp), with S = sum |w*x| + |b| over the output's window, or the tile's S for Winograd (see
WINOGRAD_TOL). Direct sums the K = kh*kw*cin products one by one in fp32: error <= K*u*S
(u = 2^-24) in the worst case, 8.8e-6*S for the 3-channel 7x7 layer (K = 147); the typical
sqrt(K)*u*S is ~1e-6*S even for this file's largest K (7*7*4 = 196). So the general kernels'
1e-5."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import CNNNeuronType as T
from mpskernels import ImageFeatureChannelFormat as FMT

try:
    import conv_reference as cref
    import reference as ref
except ImportError:  # tests/ made a package
    from . import conv_reference as cref
    from . import reference as ref

# Winograd F(4,3) computes a whole 4x4 output tile at once as Y = A^T [sum_c (G g G^T) *
# (B^T d B)] A: rounding happens on transformed values that mix the tile's 6x6 inputs, with
# magnitudes bounded by the transforms' absolute row sums (B^T rows up to 10, G rows up to 1/2,
# A^T rows up to 18), so an output's error is a few hundred u times the sums of its *tile*,
# not K*u times its own S: an output whose window reads only zero padding (S = |bias|) next to
# outputs that read real pixels still carries their rounding. The bound is therefore stated
# against S_tile = the largest S in the output's tile. Measured worst |err| / S_tile: 1.1e-6 in
# an fp32 simulation of the algorithm (cin 16..512, normal and unorm data) and 1.7e-6 (~29 u)
# for this kernel on every ISA (cin 16..512, zero-padded borders); 1e-5 leaves a 6x margin.
WINOGRAD_TOL = 1e-5
TOL = {"depthwise": 1e-5, "dwconv": 1e-5, "gconv": 1e-5, "direct": 1e-5, "igemm": 1e-5, "winograd": WINOGRAD_TOL}

NEURONS = [(T.NONE, 0, 0, 0), (T.RELU, 0, 0, 0), (T.RELUN, 0, 6.0, 0), (T.RELU, 0.1, 0, 0),
           (T.SIGMOID, 0, 0, 0), (T.PRELU, 0, 0, 0)]


def _run(device, encode):
    cb = device.make_command_queue().make_command_buffer()
    result = encode(cb)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None, cb.error
    return result


def _values(rng, shape, fmt):
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape) / 255.0
    v = rng.standard_normal(shape)
    return v.astype(np.float16 if fmt == FMT.FLOAT16 else np.float32).astype(np.float64)


def _storage(values, fmt):
    if fmt == FMT.UNORM8:
        return np.rint(values * 255).astype(np.uint8)
    return values.astype(np.float16 if fmt == FMT.FLOAT16 else np.float32)


def _tile_max(s):
    """Each output's S replaced by the largest S of its 4x4 Winograd tile (tiles start at the
    region's first pixel)."""
    n, h, w, c = s.shape
    hp, wp = -(-h // 4) * 4, -(-w // 4) * 4
    padded = np.zeros((n, hp, wp, c))
    padded[:, :h, :w] = s
    t = padded.reshape(n, hp // 4, 4, wp // 4, 4, c).max(axis=(2, 4))
    return np.repeat(np.repeat(t, 4, axis=1), 4, axis=2)[:, :h, :w]


def check(device, rng, kernel, *, cin, cout, k, groups=1, depthwise=False, stride=(1, 1),
          dilation=(1, 1), n=1, size=(9, 11), edge=0, offset=None, neuron=(T.NONE, 0, 0, 0),
          fmt_in=FMT.FLOAT32, fmt_out=FMT.FLOAT32, c0=0, c_extra=0, dst_c0=0, clip=None,
          dst_size=None, weights_f16=False, accumulate=False):
    """One convolution with a destination through the public API; asserts the kernel chosen
    and every destination value (inside the region: the reference; outside: untouched).
    accumulate: the region holds a residual r first and gets neuron(conv + bias + r) (the
    fused residual add of ML pipelines, CNNConvolution._encode(..., accumulate=True))."""
    kw, kh = k if isinstance(k, tuple) else (k, k)
    if depthwise:
        d = mk.CNNDepthWiseConvolutionDescriptor(kw, kh, cin, cout)
        wshape, groups = (cout, kh, kw), cin
    else:
        d = mk.CNNConvolutionDescriptor(kw, kh, cin, cout)
        d.groups = groups
        wshape = (cout, kh, kw, cin // groups)
    d.stride_in_pixels_x, d.stride_in_pixels_y = stride
    d.dilation_rate_x, d.dilation_rate_y = dilation
    t, a, b, c = neuron
    d.fused_neuron_descriptor = (
        mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(rng.uniform(-1, 1, cout).astype(np.float32))
        if t == T.PRELU else mk.NNNeuronDescriptor.cnn_neuron_descriptor(t, a, b, c))
    w = rng.standard_normal(wshape).astype(np.float16 if weights_f16 else np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w, bias)
    assert conv.implementation.startswith(kernel + "_"), conv.implementation
    h, wd = size
    x = _values(rng, (n, h, wd, cin + c_extra), fmt_in)
    src = mk.Image.from_numpy(device, _storage(x, fmt_in))
    oh, ow = dst_size or (-(-h // stride[1]), -(-wd // stride[0]))
    dst_c = cout + dst_c0 + 2
    initial = np.full((n, oh, ow, dst_c), 7.0)
    if offset is None:
        offset = (kw // 2, kh // 2)
    conv.offset = (offset[0], offset[1], 0)
    conv.edge_mode = edge
    conv.source_feature_channel_offset = c0
    conv.source_feature_channel_max_count = cin
    conv.destination_feature_channel_offset = dst_c0
    x0, y0, rw, rh = 0, 0, ow, oh
    if clip is not None:
        (x0, y0), (rw, rh) = clip
        conv.clip_rect = ((x0, y0, 0), (rw, rh, n))
        rw, rh = min(rw, ow - x0), min(rh, oh - y0)
    window = (slice(None), slice(y0, y0 + rh), slice(x0, x0 + rw), slice(dst_c0, dst_c0 + cout))
    residual = 0.0
    if accumulate:
        initial[window] = residual = _values(rng, initial[window].shape, fmt_out)
    dst = mk.Image.from_numpy(device, _storage(initial, fmt_out))
    if accumulate:
        _run(device, lambda cb: conv._encode(cb, src, dst, accumulate=True))
    else:
        _run(device, lambda cb: conv.encode(cb, src, dst))
    got = dst.to_numpy().astype(np.float64)
    wf = w.astype(np.float64)
    if depthwise:
        wf = cref.depthwise_weights(wf, cout // cin)
    args = dict(groups=groups, offset=offset, count=(rw, rh), stride=stride, dilation=dilation, edge=edge)
    xs = x[..., c0:c0 + cin]
    y = cref.convolution(xs, wf, bias, **args)
    s = cref.convolution(np.abs(xs), np.abs(wf), np.abs(bias), **args)
    if kernel == "winograd":
        s = _tile_max(s)
    dn = d.fused_neuron_descriptor
    y = y + residual   # the sum rounds once more: 1e-6 * |r| more error at most (u = 6e-8)
    s = s + 1e-6 / TOL[kernel] * np.abs(residual)
    f = ref.neuron(dn.neuron_type, y, dn.a, dn.b, dn.c, slopes=dn.data)
    e = TOL[kernel] * s
    tol = np.maximum(np.abs(ref.neuron(dn.neuron_type, y + e, dn.a, dn.b, dn.c, slopes=dn.data) - f),
                     np.abs(ref.neuron(dn.neuron_type, y - e, dn.a, dn.b, dn.c, slopes=dn.data) - f))
    tol += 1e-6 * np.abs(f) + 1e-30
    if fmt_out == FMT.FLOAT16:
        tol += np.abs(f) * 2.0 ** -11 + 2.0 ** -25
    bad = ~(np.abs(got[window] - f) <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{bad.sum()} of {bad.size} differ; first at {i}: got {got[window][i]!r}, "
                             f"expected {f[i]!r} +- {tol[i]!r}; max err/S "
                             f"{np.max(np.abs(got[window] - f) / s)!r}")
    outside = np.ones(got.shape, bool)
    outside[window] = False
    assert (got[outside] == 7.0).all(), "wrote outside the region"
    return got


# ---- Winograd F(4,3) ----------------------------------------------------------------------------

WINOGRAD = [  # cin, cout, size, n
    (16, 16, (4, 4), 1), (16, 17, (9, 11), 2), (33, 40, (13, 7), 1), (64, 64, (8, 8), 1),
    (20, 70, (1, 5), 3), (100, 36, (17, 18), 1), (47, 16, (6, 23), 2),
]


@pytest.mark.parametrize("case", range(len(WINOGRAD)))
@pytest.mark.parametrize("edge", [0, 1])
def test_winograd(device, isa, case, edge):
    cin, cout, size, n = WINOGRAD[case]
    rng = np.random.default_rng(300 + case * 2 + edge)
    check(device, rng, "winograd", cin=cin, cout=cout, k=3, size=size, n=n, edge=edge,
          neuron=NEURONS[case % len(NEURONS)])


@pytest.mark.parametrize("seed", range(8))
def test_winograd_placement(device, isa, seed):
    """Offsets, clip rects, channel offsets, formats, sub-pixel-free stores via the tile."""
    rng = np.random.default_rng(400 + seed)
    cin, cout = int(rng.integers(16, 40)), int(rng.integers(16, 50))
    check(device, rng, "winograd", cin=cin, cout=cout, k=3, size=(10, 13), n=2, edge=seed % 2,
          offset=(int(rng.integers(-3, 6)), int(rng.integers(-3, 6))),
          neuron=NEURONS[seed % len(NEURONS)], fmt_in=[FMT.FLOAT32, FMT.FLOAT16, FMT.UNORM8][seed % 3],
          fmt_out=FMT.FLOAT16 if seed % 4 == 3 else FMT.FLOAT32, c0=seed % 3, c_extra=3,
          dst_c0=seed % 2, clip=((1, 2), (9, 7)) if seed % 2 else None, weights_f16=seed == 5)


@pytest.mark.parametrize("fmt_out", [FMT.FLOAT32, FMT.FLOAT16])
@pytest.mark.parametrize("neuron", [NEURONS[2], NEURONS[5]])
def test_winograd_channel_groups(device, isa, fmt_out, neuron):
    """Work items split the output channels (in 128s past 128): PReLU slopes, stores."""
    check(device, np.random.default_rng(9), "winograd", cin=20, cout=290, k=3, size=(7, 9), n=2,
          neuron=neuron, fmt_out=fmt_out, dst_c0=1, edge=1)


def test_winograd_large_channels_error(device):
    """The stated bound on a layer-sized reduction (cin = 256: the GEMM sums 256 terms)."""
    check(device, np.random.default_rng(7), "winograd", cin=256, cout=64, k=3, size=(12, 12))


def test_winograd_switch(device, monkeypatch):
    """MPSKERNELS_CONV_WINOGRAD=0 at creation hands these shapes to igemm; declined shapes."""
    d = mk.CNNConvolutionDescriptor(3, 3, 32, 32)
    w = np.ones((32, 3, 3, 32), np.float32)
    assert mk.CNNConvolution.from_arrays(device, d, w).implementation.startswith("winograd_f4x3_")
    monkeypatch.setenv("MPSKERNELS_CONV_WINOGRAD", "0")
    assert mk.CNNConvolution.from_arrays(device, d, w).implementation.startswith("igemm_")
    monkeypatch.delenv("MPSKERNELS_CONV_WINOGRAD")
    for cin, cout, stride in [(8, 32, 1), (32, 32, 2), (512, 512, 1)]:
        d = mk.CNNConvolutionDescriptor(3, 3, cin, cout)
        d.stride_in_pixels_x = stride
        conv = mk.CNNConvolution.from_arrays(device, d, np.ones((cout, 3, 3, cin), np.float32))
        assert not conv.implementation.startswith("winograd"), (cin, cout, stride)


def test_weights_export_exact(device, run):
    """Kernels packing transformed weights still export the weights exactly as given."""
    rng = np.random.default_rng(8)
    for d, shape in [(mk.CNNConvolutionDescriptor(3, 3, 16, 24), (24, 3, 3, 16))]:
        w = rng.standard_normal(shape).astype(np.float32)
        conv = mk.CNNConvolution.from_arrays(device, d, w)
        cb = device.make_command_queue().make_command_buffer()
        state = conv.export_weights_and_biases(cb, False)
        cb.commit()
        cb.wait_until_completed()
        assert np.array_equal(np.asarray(state.weights).reshape(w.shape), w), conv.implementation


# ---- direct, few input channels -----------------------------------------------------------------

DIRECT = [  # cin, cout, k, stride, dilation, size, n
    (3, 64, 7, (2, 2), (1, 1), (23, 21), 1), (3, 17, 3, (1, 1), (1, 1), (9, 11), 2),
    (1, 8, 5, (1, 2), (2, 1), (12, 10), 1), (4, 100, 3, (2, 2), (1, 1), (13, 17), 1),
    (2, 33, (1, 4), (3, 1), (1, 2), (10, 14), 3), (3, 70, 7, (2, 2), (2, 2), (19, 20), 1),
    (4, 5, (6, 2), (1, 1), (1, 3), (8, 9), 1), (3, 32, 3, (2, 2), (1, 1), (27, 30), 2),
    (3, 48, 3, (1, 1), (1, 1), (9, 29), 1),
]


@pytest.mark.parametrize("case", range(len(DIRECT)))
@pytest.mark.parametrize("edge", [0, 1])
def test_direct(device, isa, case, edge):
    cin, cout, k, stride, dilation, size, n = DIRECT[case]
    rng = np.random.default_rng(500 + case * 2 + edge)
    check(device, rng, "direct", cin=cin, cout=cout, k=k, stride=stride, dilation=dilation,
          size=size, n=n, edge=edge, neuron=NEURONS[case % len(NEURONS)])


@pytest.mark.parametrize("seed", range(8))
def test_direct_placement(device, isa, seed):
    """Offsets, clip rects, channel offsets, formats (UNORM8 first layers) through the kernel."""
    rng = np.random.default_rng(600 + seed)
    check(device, rng, "direct", cin=int(rng.integers(1, 5)), cout=int(rng.integers(1, 80)),
          k=int(rng.integers(1, 8)), stride=(int(rng.integers(1, 4)), int(rng.integers(1, 3))),
          size=(11, 14), n=2, edge=seed % 2, offset=(int(rng.integers(-4, 8)), int(rng.integers(-4, 8))),
          neuron=NEURONS[seed % len(NEURONS)], fmt_in=[FMT.FLOAT32, FMT.FLOAT16, FMT.UNORM8][seed % 3],
          fmt_out=FMT.FLOAT16 if seed % 4 == 3 else FMT.FLOAT32, c0=seed % 3, c_extra=3,
          dst_c0=seed % 2, clip=((1, 2), (6, 5)) if seed % 2 else None, weights_f16=seed == 5)


@pytest.mark.parametrize("seed", range(4))
def test_one_and_two_threads_bitwise(device, device1, seed):
    """Both kernels split work over outputs only: identical bits for 1 and 2 threads."""
    kernel, cin, cout, k, stride = [("winograd", 24, 40, 3, 1), ("direct", 3, 64, 7, 2),
                                    ("winograd", 64, 16, 3, 1), ("direct", 4, 20, 3, 1)][seed]
    outs = [check(dev, np.random.default_rng(seed), kernel, cin=cin, cout=cout, k=k,
                  stride=(stride, stride), size=(37, 45), n=2) for dev in (device1, device)]
    assert outs[0].tobytes() == outs[1].tobytes()


# ---- igemm: narrow panels (a last panel of <= 16 output channels: the half-width AVX-512 tile) --

NARROW = [  # cin, cout, k, stride, size, n
    (32, 16, 1, (1, 1), (13, 11), 1), (17, 5, 1, (1, 1), (7, 9), 3), (24, 40, 1, (2, 1), (12, 15), 2),
    (20, 48, 3, (2, 2), (11, 9), 2), (16, 144, 1, (1, 1), (6, 5), 1), (40, 13, 5, (1, 2), (10, 12), 1),
]


@pytest.mark.parametrize("case", range(len(NARROW)))
@pytest.mark.parametrize("edge", [0, 1])
def test_igemm_narrow_panels(device, isa, case, edge):
    cin, cout, k, stride, size, n = NARROW[case]
    rng = np.random.default_rng(700 + case * 2 + edge)
    check(device, rng, "igemm", cin=cin, cout=cout, k=k, stride=stride, size=size, n=n, edge=edge,
          neuron=NEURONS[case % len(NEURONS)], dilation=(1, 2) if case == 5 else (1, 1))


@pytest.mark.parametrize("seed", range(4))
def test_igemm_narrow_placement(device, isa, seed):
    """Offsets, clip rects, channel offsets, formats: tiles through the L1 buffer and in place."""
    rng = np.random.default_rng(800 + seed)
    check(device, rng, "igemm", cin=int(rng.integers(16, 40)), cout=int(rng.integers(1, 17)) + 32 * (seed % 2),
          k=1, size=(10, 13), n=2, edge=seed % 2, offset=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))),
          neuron=NEURONS[seed % len(NEURONS)], fmt_in=[FMT.FLOAT32, FMT.FLOAT16][seed % 2],
          fmt_out=FMT.FLOAT16 if seed == 3 else FMT.FLOAT32, c0=seed % 3, c_extra=3, dst_c0=seed % 2,
          clip=((1, 2), (9, 7)) if seed % 2 else None)


def test_igemm_narrow_one_and_two_threads_bitwise(device, device1):
    outs = [check(dev, np.random.default_rng(3), "igemm", cin=24, cout=48, k=1, size=(37, 45), n=2)
            for dev in (device1, device)]
    assert outs[0].tobytes() == outs[1].tobytes()


# ---- depthwise: few output rows split the channel blocks too -----------------------------------

@pytest.mark.parametrize("case", [(100, (5, 7), (1, 1), 1), (144, (7, 7), (2, 2), 2), (40, (3, 4), (1, 1), 1)])
def test_depthwise_few_rows_channel_parts(device, device1, isa, case):
    """Rows < 16: items are (row, part of the channel blocks); same bits for 1 and 2 threads."""
    c, size, stride, n = case
    outs = [check(dev, np.random.default_rng(c), "dwconv", cin=c, cout=c, k=3, depthwise=True,
                  stride=stride, size=size, n=n, edge=c % 2, neuron=NEURONS[2]) for dev in (device1, device)]
    assert outs[0].tobytes() == outs[1].tobytes()


# ---- accumulate: neuron(conv + bias + destination), the fused residual add -------------------

ACCUMULATE = [  # kernel, cin, cout, k, stride, size, n, groups ("dw": depthwise)
    ("igemm", 17, 23, 1, (1, 1), (7, 9), 2, 1), ("igemm", 24, 40, 1, (2, 2), (12, 15), 3, 1),
    ("igemm", 40, 13, 3, (1, 1), (6, 5), 2, 1), ("igemm", 20, 48, 3, (2, 1), (11, 9), 2, 1),
    ("igemm", 5, 33, 3, (1, 1), (9, 7), 2, 1), ("winograd", 33, 40, 3, (1, 1), (13, 7), 2, 1),
    ("winograd", 16, 17, 3, (1, 1), (9, 11), 1, 1), ("direct", 3, 37, 7, (2, 2), (19, 17), 2, 1),
    ("dwconv", 37, 37, 3, (1, 1), (9, 8), 2, "dw"), ("dwconv", 40, 40, 3, (2, 2), (11, 9), 1, "dw"),
    ("gconv", 24, 48, 3, (1, 1), (7, 9), 2, 12),
]


def _accumulate_case(case):
    kernel, cin, cout, k, stride, size, n, groups = ACCUMULATE[case]
    return kernel, dict(cin=cin, cout=cout, k=k, stride=stride, size=size, n=n, depthwise=groups == "dw",
                        groups=1 if groups == "dw" else groups)


@pytest.mark.parametrize("neuron", [NEURONS[0], NEURONS[1], NEURONS[4]])
@pytest.mark.parametrize("case", range(len(ACCUMULATE)))
def test_accumulate(device, isa, case, neuron):
    """Every kernel, in place (float32) and through its tile buffer (float16 destination, a
    clip rect): odd channel counts, batches, strides, padding; ReLU and sigmoid after the add."""
    kernel, shape = _accumulate_case(case)
    rng = np.random.default_rng(900 + case)
    check(device, rng, kernel, **shape, edge=case % 2, neuron=neuron, accumulate=True)
    check(device, rng, kernel, **shape, neuron=neuron, fmt_out=FMT.FLOAT16, dst_c0=1,
          clip=((1, 1), (4, 5)), accumulate=True)


@pytest.mark.parametrize("case", range(len(ACCUMULATE)))
def test_accumulate_one_and_two_threads_bitwise(device, device1, case):
    kernel, shape = _accumulate_case(case)
    shape.update(size=(37, 45), n=2)
    outs = [check(dev, np.random.default_rng(case), kernel, **shape, neuron=NEURONS[1], accumulate=True)
            for dev in (device1, device)]
    assert outs[0].tobytes() == outs[1].tobytes()


# ---- depthwise 3x3: regular runs (each source column loaded once per kernel row) --------------

DW_RUNS = [  # channels, (h, w), stride (x, y), edge, n, extra check() arguments
    (32, (5, 40), (1, 1), 0, 1, {}), (16, (4, 33), (1, 1), 1, 2, {}), (48, (6, 33), (2, 2), 0, 1, {}),
    (144, (4, 30), (1, 1), 0, 1, {}), (37, (5, 27), (2, 1), 1, 1, {}), (32, (3, 300), (1, 1), 0, 1, {}),
    (24, (3, 531), (2, 2), 0, 1, {}), (32, (4, 26), (1, 1), 0, 1, {"offset": (0, 0)}),
    (40, (5, 37), (1, 1), 0, 2, {"clip": ((3, 1), (21, 3))}), (32, (4, 30), (1, 1), 0, 1, {"dilation": (2, 1)})]


@pytest.mark.parametrize("case", DW_RUNS)
@pytest.mark.parametrize("neuron", [NEURONS[0], NEURONS[2]])
def test_depthwise_runs(device, isa, case, neuron):
    """Output pixels whose 3x3 taps are all inside and evenly spaced (stride 1 or 2) go through
    8-pixel blocks that load each source column once: widths leave 0-7 pixel tails, rows wider
    than 256 are split into pieces, the offset (0, 0) moves every tap, clip rects start mid-row,
    and a dilated row has no run at all."""
    c, size, stride, edge, n, extra = case
    check(device, np.random.default_rng(c), "dwconv", cin=c, cout=c, k=3, depthwise=True,
          stride=stride, size=size, n=n, edge=edge, neuron=neuron, **extra)
