"""The convolution family against the float64 references of conv_reference.py: random
configurations (kernel 1-7, stride 1-3, dilation 1-3, groups, depthwise multipliers, sub-pixel,
batches, edge modes, offsets, clip rects, channel offsets, formats, every neuron) on every ISA,
padding policies, concatenation by channel offsets, batches, transposed convolution against
ONNX ConvTranspose, fully connected, the data-source protocol, weights export/reload,
validation, and bitwise equality for 1 and 2 threads.

Tolerance (fp32 path): |ours - ref| <= 1e-5 * S before the neuron, S = sum |w*x| + |b| over
the window: the error of an fp32 sum of K terms is bounded by ~K*u*S (u = 2^-24) and behaves
like sqrt(K)*u*S for these data; 1e-5*S covers K up to ~170 terms at the worst-case rate and
all our K (<= 7*7*40) at the typical rate, and is <= 1e-5 of the largest term sum. The neuron f
then maps that interval: tol = max |f(y +- e) - f(y)| + 1e-6 |f(y)|; FLOAT16 destinations add
half an fp16 ulp (2^-11 relative, 2^-25 absolute)."""
import math

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import CNNNeuronType as T
from mpskernels import ImageFeatureChannelFormat as FMT
from mpskernels import NNPaddingMethod as PM

try:
    import conv_reference as cref
    import reference as ref
except ImportError:  # tests/ made a package
    from . import conv_reference as cref
    from . import reference as ref

NEURONS = [  # (type, a, b, c): parameters that keep f defined for |y| < ~200
    (T.NONE, 0, 0, 0), (T.RELU, 0, 0, 0), (T.RELU, 0.1, 0, 0), (T.LINEAR, 1.5, -0.25, 0),
    (T.SIGMOID, 0, 0, 0), (T.HARD_SIGMOID, 0.2, 0.5, 0), (T.TANH, 1.2, 0.5, 0),
    (T.ABSOLUTE, 0, 0, 0), (T.SOFT_PLUS, 1.0, 0.7, 0), (T.SOFT_SIGN, 0, 0, 0),
    (T.ELU, 0.8, 0, 0), (T.PRELU, 0, 0, 0), (T.RELUN, 0, 2.0, 0), (T.RELUN, 0.1, 3.0, 0),
    (T.POWER, 0.1, 0.5, 2.0), (T.EXPONENTIAL, 0.05, 0.1, -1.0), (T.LOGARITHM, 0.01, 8.0, -1.0),
    (T.GELU, 0, 0, 0),
]


def _values(rng, shape, fmt):
    """Random values exactly representable in fmt."""
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape) / 255.0
    v = rng.standard_normal(shape)
    return v.astype(np.float16).astype(np.float64) if fmt == FMT.FLOAT16 else v.astype(np.float32).astype(np.float64)


def _storage(values, fmt):
    if fmt == FMT.UNORM8:
        return np.rint(values * 255).astype(np.uint8)
    return values.astype(np.float16 if fmt == FMT.FLOAT16 else np.float32)


def _neuron_descriptor(neuron, cout, rng):
    t, a, b, c = neuron
    if t == T.PRELU:
        return mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(rng.uniform(-1, 1, cout).astype(np.float32))
    return mk.NNNeuronDescriptor.cnn_neuron_descriptor(t, a, b, c)


def _apply_neuron(descriptor, y):
    d = descriptor
    return ref.neuron(d.neuron_type, y, d.a, d.b, d.c, slopes=d.data)


def _tolerance(descriptor, y, scale, dst_format):
    e = 1e-5 * scale
    f = _apply_neuron(descriptor, y)
    tol = np.maximum(np.abs(_apply_neuron(descriptor, y + e) - f),
                     np.abs(_apply_neuron(descriptor, y - e) - f)) + 1e-6 * np.abs(f) + 1e-30
    if dst_format == FMT.FLOAT16:
        tol += np.abs(f) * 2.0 ** -11 + 2.0 ** -25
    return f, tol


def _assert_close(got, expected, tol, what=""):
    bad = ~(np.abs(got - expected) <= tol)
    bad &= ~(np.isnan(got) & np.isnan(expected))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}{bad.sum()} of {bad.size} values differ; first at {i}: "
                             f"got {got[i]!r}, expected {expected[i]!r} +- {tol[i]!r}")


def _run(device, encode):
    cb = device.make_command_queue().make_command_buffer()
    result = encode(cb)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None, cb.error
    return result


def draw_case(rng):
    """A random configuration: everything the encode-with-destination path can be given."""
    kind = rng.choice(["regular", "regular", "grouped", "depthwise", "subpixel"])
    kw, kh = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    sx, sy = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    dx, dy = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    if rng.random() < 0.4:
        dx = dy = 1
    groups, mult, r = 1, 0, 1
    if kind == "grouped":
        groups = int(rng.integers(2, 5))
        cin, cout = groups * int(rng.integers(1, 7)), groups * int(rng.integers(1, 9))
    elif kind == "depthwise":
        cin, mult = int(rng.integers(1, 20)), int(rng.integers(1, 4))
        cout = cin * mult
    else:
        cin, cout = int(rng.integers(1, 40)), int(rng.integers(1, 45))
        if kind == "subpixel":
            r = int(rng.integers(2, 4))
            cout = r * r * int(rng.integers(1, 5))
    depth = int(rng.integers(1, 5)) if rng.random() < 0.3 else 1
    fmt_in = rng.choice([FMT.FLOAT32] * 6 + [FMT.FLOAT16, FMT.UNORM8])
    fmt_out = FMT.FLOAT16 if rng.random() < 0.15 else FMT.FLOAT32
    src_h, src_w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
    c_extra = int(rng.integers(0, 3)) * int(rng.integers(0, 9))
    c0 = int(rng.integers(0, c_extra + 1))
    oz = int(rng.integers(0, 2))
    dst_w, dst_h = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    if rng.random() < 0.5:
        clip = None
        region = (0, 0, 0, dst_w, dst_h, depth)
    else:
        x0, y0 = int(rng.integers(0, dst_w)), int(rng.integers(0, dst_h))
        w, h = int(rng.integers(1, dst_w - x0 + 2)), int(rng.integers(1, dst_h - y0 + 2))
        clip = ((x0, y0, 0), (w, h, depth))
        region = (x0, y0, 0, min(w, dst_w - x0), min(h, dst_h - y0), depth)
    kwd, khd = (kw - 1) * dx + 1, (kh - 1) * dy + 1
    return dict(kind=kind, kw=kw, kh=kh, sx=sx, sy=sy, dx=dx, dy=dy, groups=groups, mult=mult,
                r=r, cin=cin, cout=cout, depth=depth, fmt_in=fmt_in, fmt_out=fmt_out,
                src=(depth + oz, src_h, src_w, cin + c_extra), c0=c0, oz=oz,
                dst=(depth, dst_h, dst_w, cout // (r * r) + int(rng.integers(0, 5))),
                dst_c0=None, clip=clip, region=region,
                offset=(int(rng.integers(-kwd, src_w + 2)), int(rng.integers(-khd, src_h + 2)), oz),
                edge=int(rng.integers(0, 2)), neuron=NEURONS[int(rng.integers(len(NEURONS)))],
                bias=rng.random() < 0.8, weights_f16=rng.random() < 0.15)


def make_convolution(device, case, rng):
    c = case
    if c["kind"] == "depthwise":
        d = mk.CNNDepthWiseConvolutionDescriptor(c["kw"], c["kh"], c["cin"], c["cout"])
        shape = (c["cout"], c["kh"], c["kw"])
    else:
        d = (mk.CNNSubPixelConvolutionDescriptor if c["kind"] == "subpixel" else mk.CNNConvolutionDescriptor)(
            c["kw"], c["kh"], c["cin"], c["cout"])
        d.groups = c["groups"]
        if c["kind"] == "subpixel":
            d.sub_pixel_scale_factor = c["r"]
        shape = (c["cout"], c["kh"], c["kw"], c["cin"] // c["groups"])
    d.stride_in_pixels_x, d.stride_in_pixels_y = c["sx"], c["sy"]
    d.dilation_rate_x, d.dilation_rate_y = c["dx"], c["dy"]
    d.fused_neuron_descriptor = _neuron_descriptor(c["neuron"], c["cout"], rng)
    w = rng.standard_normal(shape).astype(np.float16 if c["weights_f16"] else np.float32)
    b = rng.standard_normal(c["cout"]).astype(np.float32) if c["bias"] else None
    conv = mk.CNNConvolution.from_arrays(device, d, w, b)
    return conv, d, w.astype(np.float64), b


def expected_output(case, d, w, b, x):
    """(expected, tolerance) of the destination region, from the float64 reference."""
    c = case
    x0, y0, z0, rw, rh, depth = c["region"]
    r = c["r"]
    ow, oh = -(-rw // r), -(-rh // r)
    src = x[c["oz"]:c["oz"] + depth, :, :, c["c0"]:c["c0"] + c["cin"]]
    weights, groups = w, c["groups"]
    if c["kind"] == "depthwise":
        weights, groups = cref.depthwise_weights(w, c["mult"]), c["cin"]
    args = dict(groups=groups, offset=c["offset"][:2], count=(ow, oh), stride=(c["sx"], c["sy"]),
                dilation=(c["dx"], c["dy"]), edge=c["edge"])
    y = cref.convolution(src, weights, b, **args)
    scale = cref.convolution(np.abs(src), np.abs(weights), None if b is None else np.abs(b), **args)
    f, tol = _tolerance(d.fused_neuron_descriptor, y, scale, c["fmt_out"])
    if r > 1:
        f, tol = cref.depth_to_space(f, r), cref.depth_to_space(tol, r)
    return f[:, :rh, :rw], tol[:, :rh, :rw]


def check_case(device, case, rng):
    c = case
    conv, d, w, b = make_convolution(device, c, rng)
    x = _values(rng, c["src"], c["fmt_in"])
    source = mk.Image.from_numpy(device, _storage(x, c["fmt_in"]))
    sentinel = np.full(c["dst"], 7.0)
    destination = mk.Image.from_numpy(device, _storage(sentinel, c["fmt_out"]))
    dst_c0 = c["dst"][3] - c["cout"] // (c["r"] ** 2)
    dst_c0 = int(rng.integers(0, dst_c0 + 1))
    conv.offset = c["offset"]
    conv.edge_mode = c["edge"]
    conv.source_feature_channel_offset = c["c0"]
    conv.source_feature_channel_max_count = c["cin"]
    conv.destination_feature_channel_offset = dst_c0
    if c["clip"] is not None:
        conv.clip_rect = c["clip"]
    _run(device, lambda cb: conv.encode(cb, source, destination))
    got = destination.to_numpy().astype(np.float64)
    expected, tol = expected_output(c, d, w, b, x)
    x0, y0, z0, rw, rh, depth = c["region"]
    nch = c["cout"] // (c["r"] ** 2)
    window = (slice(z0, z0 + depth), slice(y0, y0 + rh), slice(x0, x0 + rw), slice(dst_c0, dst_c0 + nch))
    _assert_close(got[window], expected, tol, f"{case}: ")
    untouched = np.ones(got.shape, bool)
    untouched[window] = False
    assert (got[untouched] == 7.0).all(), "the convolution wrote outside its region"
    return got


@pytest.mark.parametrize("seed", range(100))
def test_random_configurations(device, isa, seed):
    rng = np.random.default_rng(1000 + seed)
    check_case(device, draw_case(rng), rng)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2000))
def test_random_configurations_sweep(device, seed):
    rng = np.random.default_rng(50000 + seed)
    check_case(device, draw_case(rng), rng)


@pytest.mark.parametrize("seed", range(12))
def test_one_and_two_threads_bitwise(device, device1, seed):
    rng = np.random.default_rng(9000 + seed)
    case = draw_case(rng)
    case.update(src=(case["depth"] + case["oz"], 23, 29, case["src"][3]), dst=(case["depth"], 21, 27, case["dst"][3]),
                clip=None, region=(0, 0, 0, 27, 21, case["depth"]))
    outs = [check_case(dev, case, np.random.default_rng(seed)) for dev in (device1, device)]
    assert outs[0].tobytes() == outs[1].tobytes()


def test_larger_layer_against_reference(device, isa):
    """Channels past one panel (cout > 32), K > 256 taps x channels, many tiles."""
    rng = np.random.default_rng(5)
    d = mk.CNNConvolutionDescriptor(3, 3, 37, 70)
    w = rng.standard_normal((70, 3, 3, 37)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w, b)
    x = rng.standard_normal((2, 17, 19, 37)).astype(np.float32)
    conv.destination_image_allocator = mk.Image.default_allocator()
    out = _run(device, lambda cb: conv.encode_batch(cb, [mk.Image.from_numpy(device, x[i:i + 1]) for i in range(2)]))
    got = np.concatenate([o.to_numpy() for o in out])
    y = cref.convolution(x, w, b, offset=(0, 0), count=(19, 17))
    s = cref.convolution(np.abs(x), np.abs(w), np.abs(b), offset=(0, 0), count=(19, 17))
    _assert_close(got, y, 1e-5 * s)


# ---- padding policies (§4.4) -------------------------------------------------------------------

def mps_size_and_offset(n, k, s, method, axis):
    """§4.4 written out independently: destination size and offset (window centre)."""
    size = int(method) & 0x7F0
    style = {0: -1, 16: 0, 32: 1}[size]
    dest = (n + style * (k - 1) + s - 1) // s
    read = (dest - 1) * s + k
    extra = read - n
    align = int(method) & 3
    if align == 1:
        left = extra
    elif align == 2:
        left = 0
    else:
        bit = 4 if axis == "x" else 8
        p = 0 if int(method) & bit else 1
        left = (extra + p) // 2
    return dest, k // 2 - left


def test_padding_worked_examples():
    same, valid, full = PM.SIZE_SAME, PM.SIZE_VALID_ONLY, PM.SIZE_FULL
    assert mps_size_and_offset(5, 3, 1, same, "x") == (5, 0)
    assert mps_size_and_offset(5, 3, 1, valid, "x") == (3, 1)
    assert mps_size_and_offset(5, 3, 2, same, "x") == (3, 0)
    assert mps_size_and_offset(5, 3, 1, full, "x") == (7, -1)
    assert mps_size_and_offset(4, 2, 1, same, "x") == (4, 0)
    assert mps_size_and_offset(4, 2, 1, same | PM.ADD_REMAINDER_TO_BOTTOM_RIGHT, "x") == (4, 1)


PADDINGS = [size | align | rem for size in (PM.SIZE_VALID_ONLY, PM.SIZE_SAME, PM.SIZE_FULL)
            for align in (PM.ALIGN_CENTERED, PM.ALIGN_TOP_LEFT, PM.ALIGN_BOTTOM_RIGHT)
            for rem in (PM.ADD_REMAINDER_TO_TOP_LEFT, PM.ADD_REMAINDER_TO_TOP_RIGHT,
                        PM.ADD_REMAINDER_TO_BOTTOM_LEFT, PM.ADD_REMAINDER_TO_BOTTOM_RIGHT)]


@pytest.mark.parametrize("method", PADDINGS, ids=lambda m: f"m{int(m)}")
def test_every_padding_method(device, method):
    rng = np.random.default_rng(int(method))
    for kw, kh, s, dil in ((3, 3, 1, 1), (2, 4, 2, 1), (5, 2, 3, 2), (4, 4, 2, 2)):
        d = mk.CNNConvolutionDescriptor(kw, kh, 3, 5)
        d.stride_in_pixels_x = d.stride_in_pixels_y = s
        d.dilation_rate_x = d.dilation_rate_y = dil
        w = rng.standard_normal((5, kh, kw, 3)).astype(np.float32)
        conv = mk.CNNConvolution.from_arrays(device, d, w)
        conv.padding = mk.NNDefaultPadding(method)
        conv.destination_image_allocator = mk.Image.default_allocator()
        x = rng.standard_normal((1, 11, 10, 3)).astype(np.float32)
        out = _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x)))
        kwd, khd = (kw - 1) * dil + 1, (kh - 1) * dil + 1
        ew, ox = mps_size_and_offset(10, kwd, s, method, "x")
        eh, oy = mps_size_and_offset(11, khd, s, method, "y")
        assert (out.width, out.height) == (ew, eh)
        assert tuple(conv.offset) == (ox, oy, 0)
        y = cref.convolution(x, w, None, offset=(ox, oy), count=(ew, eh), stride=(s, s), dilation=(dil, dil))
        sc = cref.convolution(np.abs(x), np.abs(w), None, offset=(ox, oy), count=(ew, eh), stride=(s, s), dilation=(dil, dil))
        _assert_close(out.to_numpy(), y, 1e-5 * sc + 1e-30)


def test_custom_padding(device):
    class Grow(mk.NNPadding):
        def padding_method(self):
            return PM.CUSTOM | PM.SIZE_SAME

        def destination_image_descriptor(self, source_images, source_states, kernel, suggested):
            suggested.width += 2
            kernel.offset = (-1, 0, 0)
            return suggested

    d = mk.CNNConvolutionDescriptor(3, 3, 2, 2)
    w = np.ones((2, 3, 3, 2), np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w)
    conv.padding = Grow()
    conv.destination_image_allocator = mk.Image.default_allocator()
    x = np.ones((1, 4, 4, 2), np.float32)
    out = _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x)))
    assert (out.width, out.height) == (6, 4) and tuple(conv.offset) == (-1, 0, 0)
    np.testing.assert_allclose(out.to_numpy(), cref.convolution(x, w, None, offset=(-1, 0), count=(6, 4)))


def test_image_returning_encode_gives_temporary(device):
    d = mk.CNNConvolutionDescriptor(1, 1, 4, 4)
    conv = mk.CNNConvolution.from_arrays(device, d, np.eye(4, dtype=np.float32).reshape(4, 1, 1, 4))
    ident = mk.CNNNeuronLinear(device, 1.0, 0.0)
    x = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    src = mk.Image.from_numpy(device, x)
    dst = mk.Image.from_numpy(device, np.zeros_like(x))

    def encode(cb):
        t = conv.encode(cb, src)
        assert isinstance(t, mk.TemporaryImage)
        ident.encode(cb, t, dst)
    _run(device, encode)
    np.testing.assert_array_equal(dst.to_numpy(), x)


# ---- channel slices, batches -------------------------------------------------------------------

def test_two_convolutions_concatenate_by_channel_offset(device):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 7, 5)).astype(np.float32)
    src = mk.Image.from_numpy(device, x)
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 7, 6, 11))
    parts = []
    for cout, first in ((4, 0), (7, 4)):
        w = rng.standard_normal((cout, 3, 3, 5)).astype(np.float32)
        conv = mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(3, 3, 5, cout), w)
        conv.destination_feature_channel_offset = first
        _run(device, lambda cb: conv.encode(cb, src, dst))
        parts.append(cref.convolution(x, w, None, offset=(0, 0), count=(7, 6)))
    np.testing.assert_allclose(dst.to_numpy(), np.concatenate(parts, axis=-1), rtol=1e-5, atol=1e-5)


def test_batch_by_offset_z_and_clip_depth(device):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5, 6, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(3, 3, 3, 2), w)
    conv.offset = (0, 0, 1)
    conv.clip_rect = ((0, 0, 1), (6, 5, 3))
    dst = mk.Image.from_numpy(device, np.zeros((4, 5, 6, 2), np.float32))
    _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x), dst))
    got = dst.to_numpy()
    assert (got[0] == 0).all()
    np.testing.assert_allclose(got[1:4], cref.convolution(x[1:4], w, None, count=(6, 5)), rtol=1e-5, atol=1e-5)
    conv.offset = (0, 0, 2)   # source images 2..4 of 4
    with pytest.raises(mk.ValidationError, match="images"):
        _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x), dst))


def test_encode_batch_of_temporaries(device):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(3, 3, 2, 3), w)
    back = mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(1, 1, 3, 3),
                                         np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3))
    xs = [rng.standard_normal((1, 4, 5, 2)).astype(np.float32) for _ in range(3)]
    outs = [mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 5, 4, 3)) for _ in xs]

    def encode(cb):
        temps = conv.encode_batch(cb, [mk.Image.from_numpy(device, x) for x in xs])
        back.encode_batch(cb, temps, outs)
    _run(device, encode)
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(o.to_numpy(), cref.convolution(x, w, None, count=(5, 4)), rtol=1e-5, atol=1e-5)


# ---- weights: BN, data source, export / reload, fp16 ---------------------------------------------

class Source(mk.CNNConvolutionDataSource):
    def __init__(self, descriptor, weights, bias, data_type=mk.DataType.FLOAT32):
        self.d, self.w, self.b, self.t = descriptor, weights, bias, data_type
        self.loads = self.purges = 0

    def data_type(self):
        return self.t

    def descriptor(self):
        return self.d

    def weights(self):
        assert self.loads > self.purges, "weights() read outside load()/purge()"
        return self.w

    def bias_terms(self):
        return self.b

    def load(self):
        self.loads += 1
        return True

    def purge(self):
        self.purges += 1

    def label(self):
        return "source"


def _conv_output(device, conv, x):
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, x.shape[2], x.shape[1], conv.output_feature_channels))
    _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x), dst))
    return dst.to_numpy()


def test_data_source_protocol_and_reload(device):
    rng = np.random.default_rng(7)
    d = mk.CNNConvolutionDescriptor(3, 3, 4, 6)
    w = rng.standard_normal((6, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    source = Source(d, w, b)
    conv = mk.CNNConvolution(device, source)
    assert (source.loads, source.purges) == (1, 1)
    assert conv.data_source is source and conv.label == "source"
    assert (conv.input_feature_channels, conv.output_feature_channels, conv.groups) == (4, 6, 1)
    assert conv.channel_multiplier == 0 and conv.sub_pixel_scale_factor == 1
    assert conv.neuron_type == T.NONE and conv.neuron is None
    assert conv.accumulator_precision_option == mk.NNConvolutionAccumulatorPrecisionOption.FLOAT
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_conv_output(device, conv, x), cref.convolution(x, w, b, count=(5, 5)), rtol=1e-5, atol=1e-5)
    source.w = (2 * w).astype(np.float32)
    conv.reload_weights_and_biases_from_data_source()
    assert (source.loads, source.purges) == (2, 2)
    np.testing.assert_allclose(_conv_output(device, conv, x), cref.convolution(x, 2 * w, b, count=(5, 5)), rtol=1e-5, atol=1e-5)

    class Failing(Source):
        def load(self):
            return False
    with pytest.raises(mk.ValidationError, match="load"):
        mk.CNNConvolution(device, Failing(d, w, b))


def test_export_and_reload_state(device):
    rng = np.random.default_rng(8)
    d = mk.CNNConvolutionDescriptor(2, 3, 4, 5)
    d.groups = 1
    w = rng.standard_normal((5, 3, 2, 4)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w, b)
    cb = device.make_command_queue().make_command_buffer()
    state = conv.export_weights_and_biases(cb, False)
    np.testing.assert_array_equal(state.weights, w)
    np.testing.assert_array_equal(state.biases, b)
    temp = conv.export_weights_and_biases(cb, True)
    with pytest.raises(mk.TemporaryImageError):
        temp.weights
    other = mk.CNNConvolution.from_arrays(device, d, np.zeros_like(w))
    other.reload_weights_and_biases(cb, temp)
    assert temp.read_count == 0
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
    np.testing.assert_array_equal(_conv_output(device, other, x), _conv_output(device, conv, x))


def test_batch_normalization_folded(device):
    rng = np.random.default_rng(9)
    d = mk.CNNConvolutionDescriptor(3, 3, 3, 4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    d.set_batch_normalization_parameters_for_inference(mean, var, gamma, beta, 1e-3)
    d.fused_neuron_descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(T.RELU)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w, b)
    x = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
    y = cref.convolution(x, w, b, count=(6, 5))
    y = np.maximum(gamma * (y - mean) / np.sqrt(var + 1e-3) + beta, 0)
    np.testing.assert_allclose(_conv_output(device, conv, x), y, rtol=1e-5, atol=1e-5)


def test_float16_weights_and_quantized_uint8(device):
    rng = np.random.default_rng(10)
    d = mk.CNNConvolutionDescriptor(3, 1, 4, 3)
    w16 = rng.standard_normal((3, 1, 3, 4)).astype(np.float16)
    conv = mk.CNNConvolution(device, Source(d, w16, None, mk.DataType.FLOAT16))
    x = rng.standard_normal((1, 4, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_conv_output(device, conv, x), cref.convolution(x, w16, None, count=(5, 4)), rtol=1e-5, atol=1e-5)

    class Quantized(Source):
        def weights_quantization_type(self):
            return mk.CNNWeightsQuantizationType.LOOKUP_TABLE

        def lookup_table_for_uint8_kernel(self):
            return np.linspace(-1, 1, 256, dtype=np.float32)
    u = rng.integers(0, 256, (3, 1, 3, 4)).astype(np.uint8)
    conv = mk.CNNConvolution(device, Quantized(d, u, None, mk.DataType.UINT8))
    wq = np.linspace(-1, 1, 256, dtype=np.float32)[u]
    np.testing.assert_allclose(_conv_output(device, conv, x), cref.convolution(x, wq, None, count=(5, 4)), rtol=1e-5, atol=1e-5)


def test_properties_of_depthwise_and_subpixel(device):
    d = mk.CNNDepthWiseConvolutionDescriptor(3, 3, 4, 12)
    assert d.channel_multiplier == 3
    conv = mk.CNNConvolution.from_arrays(device, d, np.ones((12, 3, 3), np.float32))
    assert conv.channel_multiplier == 3
    s = mk.CNNSubPixelConvolutionDescriptor(3, 3, 4, 8)
    s.sub_pixel_scale_factor = 2
    conv = mk.CNNConvolution.from_arrays(device, s, np.ones((8, 3, 3, 4), np.float32))
    assert conv.sub_pixel_scale_factor == 2
    conv.destination_image_allocator = mk.Image.default_allocator()
    out = _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, np.ones((1, 5, 6, 4), np.float32))))
    assert (out.width, out.height, out.feature_channels) == (12, 10, 2)
    assert conv.implementation.startswith("igemm_")


# ---- transpose, fully connected ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(16))
def test_transpose_against_onnx(device, seed):
    """out[x] = sum_p W[p] * E[offset.x*stride + kernel_offset_x + x + p*dilation] (E: the
    zero-stuffed source) equals ONNX ConvTranspose with the kernel flipped in both axes,
    weights transposed to [in][out], pad_begin = that start + (k-1)*dilation."""
    rng = np.random.default_rng(300 + seed)
    kw, kh = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    s, dil = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    groups = int(rng.integers(1, 3))
    cin, cout = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 5))
    h, w = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    d = mk.CNNConvolutionDescriptor(kw, kh, cin, cout)
    d.stride_in_pixels_x = d.stride_in_pixels_y = s
    d.dilation_rate_x = d.dilation_rate_y = dil
    d.groups = groups
    wt = rng.standard_normal((cout, kh, kw, cin // groups)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    conv = mk.CNNConvolutionTranspose(device, Source(d, wt, b))
    assert conv.is_backwards
    conv.offset = (int(rng.integers(-1, 2)), int(rng.integers(-1, 2)), 0)
    conv.kernel_offset_x, conv.kernel_offset_y = int(rng.integers(-kw, 2)), int(rng.integers(-kh, 2))
    ow, oh = int(rng.integers(1, 3 * w + 4)), int(rng.integers(1, 3 * h + 4))
    x = rng.standard_normal((1, h, w, cin)).astype(np.float32)
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, ow, oh, cout))
    _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x), dst))
    start_x = conv.offset.x * s + conv.kernel_offset_x
    start_y = conv.offset.y * s + conv.kernel_offset_y
    pad_t, pad_l = start_y + (kh - 1) * dil, start_x + (kw - 1) * dil
    full_h, full_w = s * (h - 1) + (kh - 1) * dil + 1, s * (w - 1) + (kw - 1) * dil + 1
    w_onnx = wt[:, ::-1, ::-1, :].reshape(groups, cout // groups, kh, kw, cin // groups)
    w_onnx = w_onnx.transpose(0, 4, 1, 2, 3).reshape(cin, cout // groups, kh, kw)
    y = cref.onnx_conv_transpose(x.transpose(0, 3, 1, 2), w_onnx, b, (s, s),
                                 (pad_t, pad_l, full_h - pad_t - oh, full_w - pad_l - ow), (dil, dil), groups)
    np.testing.assert_allclose(dst.to_numpy(), y.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_transpose_image_returning_size(device):
    d = mk.CNNConvolutionDescriptor(4, 4, 3, 2)
    d.stride_in_pixels_x = d.stride_in_pixels_y = 2
    conv = mk.CNNConvolutionTranspose(device, Source(d, np.ones((2, 4, 4, 3), np.float32), None))
    conv.destination_image_allocator = mk.Image.default_allocator()
    for method, size in ((PM.SIZE_SAME, 9), (PM.SIZE_VALID_ONLY, 6), (PM.SIZE_FULL, 12)):
        conv.padding = mk.NNDefaultPadding(method)
        out = _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, np.ones((1, 5, 5, 3), np.float32))))
        assert (out.width, out.height) == (size, size)   # (n-1)*s + 1 + style*(k-1)


def test_fully_connected(device):
    rng = np.random.default_rng(11)
    d = mk.CNNConvolutionDescriptor(5, 4, 6, 9)
    w = rng.standard_normal((9, 4, 5, 6)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    fc = mk.CNNFullyConnected.from_arrays(device, d, w, b)
    fc.destination_image_allocator = mk.Image.default_allocator()
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    out = _run(device, lambda cb: fc.encode(cb, mk.Image.from_numpy(device, x)))
    assert (out.width, out.height, out.feature_channels, out.number_of_images) == (1, 1, 9, 3)
    np.testing.assert_allclose(out.to_numpy().reshape(3, 9), x.reshape(3, -1) @ w.reshape(9, -1).T + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(mk.ValidationError, match="5x4 source"):
        _run(device, lambda cb: fc.encode(cb, mk.Image.from_numpy(device, x[:, :3])))


# ---- bad input ---------------------------------------------------------------------------------

def test_validation(device):
    d = mk.CNNConvolutionDescriptor(3, 3, 4, 6)
    w = np.zeros((6, 3, 3, 4), np.float32)
    with pytest.raises(mk.ValidationError, match=r"\(6, 3, 3, 4\)"):
        mk.CNNConvolution.from_arrays(device, d, np.zeros((6, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="float64"):
        mk.CNNConvolution.from_arrays(device, d, w.astype(np.float64))
    with pytest.raises(mk.ValidationError, match="contiguous"):
        mk.CNNConvolution.from_arrays(device, d, np.zeros((6, 3, 3, 8), np.float32)[..., ::2])
    with pytest.raises(TypeError, match="float32"):
        mk.CNNConvolution.from_arrays(device, d, w, np.zeros(6))
    with pytest.raises(mk.ValidationError, match=r"\(6,\)"):
        mk.CNNConvolution.from_arrays(device, d, w, np.zeros(5, np.float32))
    g = mk.CNNConvolutionDescriptor(3, 3, 4, 6)
    g.groups = 4
    with pytest.raises(mk.ValidationError, match="groups 4 must divide"):
        mk.CNNConvolution.from_arrays(device, g, w)
    for bad in (0, -1):
        with pytest.raises(mk.ValidationError, match="kernel_width"):
            mk.CNNConvolution.from_arrays(device, mk.CNNConvolutionDescriptor(bad, 3, 4, 6), w)
    with pytest.raises(mk.ValidationError, match="multiple"):
        mk.CNNConvolution.from_arrays(device, mk.CNNDepthWiseConvolutionDescriptor(3, 3, 4, 6),
                                      np.zeros((6, 3, 3), np.float32))
    conv = mk.CNNConvolution.from_arrays(device, d, w)
    src = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 5, 5, 3))
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 5, 5, 6))
    with pytest.raises(mk.ValidationError, match="takes 4 input channels but reads 3"):
        _run(device, lambda cb: conv.encode(cb, src, dst))
    src = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 5, 5, 4))
    conv.destination_feature_channel_offset = 2
    with pytest.raises(mk.ValidationError, match="writes 6 channels at destination_feature_channel_offset 2"):
        _run(device, lambda cb: conv.encode(cb, src, dst))
    conv.destination_feature_channel_offset = 0
    conv.edge_mode = mk.ImageEdgeMode.MIRROR
    with pytest.raises(mk.ValidationError, match="ZERO or CLAMP"):
        _run(device, lambda cb: conv.encode(cb, src, dst))
    with pytest.raises(TypeError):
        mk.CNNConvolution(device, "not a data source")


@pytest.mark.parametrize("seed", range(6))
def test_depthwise_register_blocks(device, isa, seed):
    """Multiplier 1 with 32- and 16-channel blocks plus a remainder (the per-ISA rows)."""
    rng = np.random.default_rng(700 + seed)
    case = draw_case(rng)
    cin = (53, 144, 32, 16, 48, 70)[seed]
    case.update(kind="depthwise", mult=1, cin=cin, cout=cin, groups=1, r=1,
                src=(case["depth"] + case["oz"], 9, 10, cin + 3), c0=3,
                dst=(case["depth"], 8, 9, cin + 2))
    case.update(region=(0, 0, 0, 9, 8, case["depth"]), clip=None)
    check_case(device, case, rng)
    conv, *_ = make_convolution(device, case, rng)
    assert conv.implementation == f"dwconv__{isa}"


@pytest.mark.parametrize("edge", [0, 1])
def test_transpose_against_stuffed_reference(device, edge):
    """The same rule on the zero-stuffed source directly (CLAMP: out-of-range taps read the
    nearest real edge pixel; ZERO runs the per-phase decomposition)."""
    rng = np.random.default_rng(40 + edge)
    for k, s, dil, size in ((4, 2, 1, 5), (3, 3, 2, 4), (1, 2, 1, 3), (5, 2, 3, 6)):
        d = mk.CNNConvolutionDescriptor(k, k, 6, 5)
        d.stride_in_pixels_x = d.stride_in_pixels_y = s
        d.dilation_rate_x = d.dilation_rate_y = dil
        d.fused_neuron_descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(T.TANH, 1.0, 0.5)
        w = rng.standard_normal((5, k, k, 6)).astype(np.float32)
        b = rng.standard_normal(5).astype(np.float32)
        conv = mk.CNNConvolutionTranspose(device, Source(d, w, b))
        conv.edge_mode = edge
        conv.kernel_offset_x, conv.kernel_offset_y = -k, 1 - k
        conv.offset = (1, 0, 0)
        x = rng.standard_normal((2, size, size + 1, 6)).astype(np.float32)
        dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 3 * size, 2 * size + 1, 5, 2))
        _run(device, lambda cb: conv.encode(cb, mk.Image.from_numpy(device, x), dst))
        y = cref.correlate(x, w, b, 1, (s - k, 1 - k), (3 * size, 2 * size + 1), (1, 1), (dil, dil), edge, up=(s, s))
        np.testing.assert_allclose(dst.to_numpy(), np.tanh(0.5 * y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_small_groups(device, isa, seed):
    """Groups of <= 16 outputs dividing 16 with no more inputs than outputs: the gconv rows
    (blocks of 16 outputs spanning several groups, partial last block)."""
    rng = np.random.default_rng(800 + seed)
    case = draw_case(rng)
    cin_g, cout_g, groups = ((4, 4, 32), (2, 8, 5), (8, 16, 3), (3, 4, 7), (2, 2, 9), (16, 16, 2))[seed]
    case.update(kind="grouped", groups=groups, cin=cin_g * groups, cout=cout_g * groups, r=1,
                src=(case["depth"] + case["oz"], 9, 10, cin_g * groups + 3), c0=2,
                dst=(case["depth"], 8, 9, cout_g * groups + 1), region=(0, 0, 0, 9, 8, case["depth"]),
                clip=None)
    check_case(device, case, rng)
    conv, *_ = make_convolution(device, case, rng)
    assert conv.implementation == ("gconv__avx512" if isa == "avx512" else "gconv__generic")
