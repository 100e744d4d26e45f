"""Arithmetic (CNNAdd, CNNSubtract, CNNMultiply, CNNDivide) against the float64 references of
reference.py: the four ops with scales / bias / clamp, IEEE special values and division by
zero, broadcasting, geometry, storage formats, validation, thread determinism, ISAs."""
import itertools

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ImageEdgeMode as EDGE
from mpskernels import ImageFeatureChannelFormat as FMT

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from . import reference as ref

F32 = np.float32
OPS = [(mk.CNNAdd, ref.ADD), (mk.CNNSubtract, ref.SUB), (mk.CNNMultiply, ref.MUL),
       (mk.CNNDivide, ref.DIV)]
OP_IDS = ["add", "sub", "mul", "div"]

PARAMS = {
    "plain": {},
    "scaled": dict(primary_scale=1.5, secondary_scale=-0.75, bias=0.25),
    "clamped": dict(primary_scale=2.0, secondary_scale=0.5, bias=-0.1, minimum_value=-1.0,
                    maximum_value=2.0),
}
_NAMES = {"primary_scale": "primary_scale", "secondary_scale": "secondary_scale", "bias": "bias",
          "minimum_value": "minimum", "maximum_value": "maximum"}


def reference_kwargs(params):
    return {_NAMES[k]: v for k, v in params.items()}


def make_kernel(device, cls, params=None, **attrs):
    kernel = cls(device)
    for key, value in {**(params or {}), **attrs}.items():
        setattr(kernel, key, value)
    return kernel


def tolerance(op, x, y, params):
    """Plain (scales 1, bias 0): one correctly rounded float32 operation, so bitwise equal to
    the float64 reference rounded to float32 (double rounding is innocuous for + - * /).
    With scales and bias up to four float32 roundings (ps*x, ss*y, OP, + bias; an FMA may
    merge two): |error| <= 4u*(M + |bias|), M = |u|+|v| for + and -, |u*v| for *, |u/v| for /
    (u = ps*x, v = ss*y); the clamp adds none. Plus FTZ_ATOL (denormals flush to 0)."""
    if not params:
        return np.full(np.broadcast(x, y).shape, ref.FTZ_ATOL)
    ps, ss = ref.f32(params.get("primary_scale", 1.0)), ref.f32(params.get("secondary_scale", 1.0))
    bias = ref.f32(params.get("bias", 0.0))
    with np.errstate(all="ignore"):
        u, v = ps * np.asarray(x), ss * np.asarray(y)
        m = {ref.ADD: np.abs(u) + np.abs(v), ref.SUB: np.abs(u) + np.abs(v),
             ref.MUL: np.abs(u * v), ref.DIV: np.abs(u / v)}[op]
        tol = 2.0 ** -22 * (m + abs(bias)) + ref.FTZ_ATOL
    return np.nan_to_num(tol, nan=0.0, posinf=np.inf)


def references(op, x, y, params):
    kw = reference_kwargs(params)
    return [ref.arithmetic(op, x, y, **kw), ref.arithmetic_f32_steps(op, x, y, **kw)]


def check(got, refs, tol, what):
    bad = ref.mismatches(got, refs, tol)
    if bad.any():
        idx = [tuple(i) for i in np.argwhere(bad)[:8]]
        lines = [f"at {i}: got={got[i]!r} ref={refs[0][i]!r} tol={tol[i] if np.ndim(tol) else tol!r}"
                 for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} wrong, e.g.\n" + "\n".join(lines))


def run_op(run, device, kernel, primary, secondary, dst=None, fmt=None):
    if dst is None:
        d = primary.descriptor()
        if fmt is not None:
            d.channel_format = fmt
        dst = mk.Image(device, d)
    run(device, lambda cb: kernel.encode(cb, primary, secondary, dst))
    return dst


def uniform(rng, shape, lo=-10.0, hi=10.0, min_abs=0.0):
    x = rng.uniform(lo, hi, shape)
    if min_abs:
        x = np.where(x < 0, -1, 1) * np.maximum(np.abs(x), min_abs)
    return x.astype(F32).astype(np.float64)


# ---- the ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_ops_random(cls, op, params, isa, device, run, make_image, read_image, rng):
    x = uniform(rng, (2, 5, 7, 19))
    y = uniform(rng, (2, 5, 7, 19), min_abs=0.1 if op == ref.DIV else 0.0)
    dst = run_op(run, device, make_kernel(device, cls, params), make_image(device, x),
                 make_image(device, y))
    check(read_image(dst), references(op, x, y, params), tolerance(op, x, y, params),
          f"{cls.__name__} {params} on {isa}")


SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, np.inf, -np.inf, np.nan, 1e30, -1e30,
            ref.FLT_MAX, -ref.FLT_MAX, ref.FLT_MIN]


@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_special_values(cls, op, params, isa, device, run, make_image, read_image, rng):
    """Every pair of special values (IEEE: x/±0 = ±inf, 0/0 = inf-inf = 0*inf = NaN, overflow
    to ±inf; NaN stays NaN through scales, bias and clamp), at every SIMD lane."""
    pairs = np.array(list(itertools.product(SPECIALS, repeat=2)))
    pairs = pairs[rng.permutation(len(pairs))]
    pairs = np.resize(pairs, (16 * 15, 2))
    pairs = ref.round_to_format(pairs, ref.FLOAT32)
    x, y = pairs[:, 0].reshape(1, 3, 5, 16), pairs[:, 1].reshape(1, 3, 5, 16)
    dst = run_op(run, device, make_kernel(device, cls, params), make_image(device, x),
                 make_image(device, y))
    check(read_image(dst), references(op, x, y, params), tolerance(op, x, y, params),
          f"{cls.__name__} {params} on {isa}")


def test_division_by_zero(isa, device, run, make_image, read_image):
    x = np.array([1.0, -1.0, 1.0, -1.0, 0.0, -0.0, np.inf, 0.0] * 3).reshape(1, 1, 3, 8)
    y = np.array([0.0, 0.0, -0.0, -0.0, 0.0, 0.0, 0.0, np.inf] * 3).reshape(1, 1, 3, 8)
    got = read_image(run_op(run, device, mk.CNNDivide(device), make_image(device, x),
                            make_image(device, y)))
    expected = [np.inf, -np.inf, -np.inf, np.inf, np.nan, np.nan, np.inf, 0.0] * 3
    np.testing.assert_array_equal(got.reshape(-1), expected)
    # and a broadcast zero: every x / 0
    zero = make_image(device, np.zeros((1, 1, 1, 1)))
    kernel = make_kernel(device, mk.CNNDivide, secondary_stride_in_pixels_x=0,
                         secondary_stride_in_pixels_y=0, secondary_stride_in_feature_channels=0)
    got = read_image(run_op(run, device, kernel, make_image(device, x), zero))
    np.testing.assert_array_equal(got, np.where(x == 0, np.nan, np.copysign(np.inf, x)))


@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_denormals_flush(cls, op, isa, device, run, make_image, read_image):
    """FTZ/DAZ: denormal operands act as ±0 (or as themselves), results below FLT_MIN are
    ±0: e.g. 2^-70 * 2^-70 = 0, 2^-130 + 0 = 0. No result is denormal."""
    tiny = [2.0 ** -130, -(2.0 ** -130), 2.0 ** -149, 2.0 ** -70, 2.0 ** -100, 1.0]
    pairs = ref.round_to_format(np.array(list(itertools.product(tiny, repeat=2))), ref.FLOAT32)
    x, y = pairs[:, 0].reshape(1, 1, -1, 1), pairs[:, 1].reshape(1, 1, -1, 1)
    got = read_image(run_op(run, device, make_kernel(device, cls), make_image(device, x),
                            make_image(device, y)))
    daz = lambda v: np.where(np.abs(v) < ref.FLT_MIN, 0.0 * v, v)   # noqa: E731
    refs = references(op, x, y, {}) + references(op, daz(x), daz(y), {})
    check(got, refs, np.full(got.shape, ref.FTZ_ATOL), f"{cls.__name__} denormals")
    assert not ((got != 0) & (np.abs(got) < ref.FLT_MIN)).any(), got


# ---- broadcasting ---------------------------------------------------------------------------

BROADCASTS = {  # id: (secondary shape given primary (n, h, w, c), kernel settings, reference)
    "1x1": (lambda n, h, w, c: (n, 1, 1, c),
            dict(secondary_stride_in_pixels_x=0, secondary_stride_in_pixels_y=0)),
    "row": (lambda n, h, w, c: (n, 1, w, c), dict(secondary_stride_in_pixels_y=0)),
    "column": (lambda n, h, w, c: (n, h, 1, c), dict(secondary_stride_in_pixels_x=0)),
    "one_channel": (lambda n, h, w, c: (n, h, w, 1), dict(secondary_stride_in_feature_channels=0)),
    "scalar": (lambda n, h, w, c: (n, 1, 1, 1),
               dict(secondary_stride_in_pixels_x=0, secondary_stride_in_pixels_y=0,
                    secondary_stride_in_feature_channels=0)),
    "primary_first_channel": (lambda n, h, w, c: (n, h, w, c),
                              dict(primary_stride_in_feature_channels=0)),
}


def settings_to_reference(attrs):
    """Kernel attributes → keyword arguments of ref.binary_pointwise."""
    a = dict(attrs)
    kw = {}
    kw["primary_offset"] = tuple(a.pop("primary_offset", (0, 0, 0)))
    kw["secondary_offset"] = tuple(a.pop("secondary_offset", (0, 0, 0)))
    kw["primary_stride"] = (a.pop("primary_stride_in_pixels_x", 1), a.pop("primary_stride_in_pixels_y", 1))
    kw["secondary_stride"] = (a.pop("secondary_stride_in_pixels_x", 1), a.pop("secondary_stride_in_pixels_y", 1))
    kw["primary_edge"] = int(a.pop("primary_edge_mode", EDGE.ZERO))
    kw["secondary_edge"] = int(a.pop("secondary_edge_mode", EDGE.ZERO))
    kw["primary_c0"] = a.pop("primary_source_feature_channel_offset", 0)
    kw["secondary_c0"] = a.pop("secondary_source_feature_channel_offset", 0)
    kw["primary_max"] = a.pop("primary_source_feature_channel_max_count", 2 ** 64 - 1)
    kw["primary_channel_stride"] = a.pop("primary_stride_in_feature_channels", 1)
    kw["secondary_channel_stride"] = a.pop("secondary_stride_in_feature_channels", 1)
    kw["dst_c0"] = a.pop("destination_feature_channel_offset", 0)
    clip = a.pop("clip_rect", ((0, 0, 0), (1 << 62,) * 3))
    kw["clip"] = ((clip[0], clip[1], 0), (clip[2], clip[3], 1)) if len(clip) == 4 else clip
    assert not a, f"no reference for {a}"
    return kw


@pytest.mark.parametrize("shape", [(1, 5, 7, 3), (3, 4, 9, 17)], ids=["c3", "n3c17"])
@pytest.mark.parametrize("kind", BROADCASTS, ids=list(BROADCASTS))
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_broadcast(cls, op, kind, shape, isa, device, run, make_image, read_image, rng):
    """Stride 0 repeats one column / row of the secondary; a channel stride of 0 repeats its
    first channel: a 1x1 secondary is a per-channel vector, 1x1x1 a scalar."""
    secondary_shape, attrs = BROADCASTS[kind]
    x = uniform(rng, shape)
    y = uniform(rng, secondary_shape(*shape), min_abs=0.1)
    kernel = make_kernel(device, cls, **attrs)
    dst = run_op(run, device, kernel, make_image(device, x), make_image(device, y))
    expected = ref.binary_pointwise(lambda p, s: ref.arithmetic(op, p, s), x, y,
                                    np.zeros(shape), **settings_to_reference(attrs))
    check(read_image(dst), [expected], np.full(shape, ref.FTZ_ATOL), f"{kind} {cls.__name__}")


# ---- geometry -------------------------------------------------------------------------------

GEOMETRIES = [  # (id, primary shape, secondary shape, destination shape, kernel settings)
    ("same", (2, 5, 7, 6), (2, 5, 7, 6), (2, 5, 7, 6), {}),
    ("secondary_offset_zero", (2, 5, 7, 6), (2, 4, 5, 6), (2, 5, 7, 6),
     dict(secondary_offset=(-1, 2, 0))),
    ("secondary_offset_clamp", (2, 5, 7, 6), (2, 4, 5, 6), (2, 5, 7, 6),
     dict(secondary_offset=(-1, 2, 0), secondary_edge_mode=EDGE.CLAMP)),
    ("primary_offset_zero", (2, 5, 7, 6), (2, 5, 7, 6), (2, 5, 7, 6),
     dict(primary_offset=(3, -2, 0))),
    ("primary_offset_clamp", (2, 5, 7, 6), (2, 5, 7, 6), (2, 5, 7, 6),
     dict(primary_offset=(3, -2, 0), primary_edge_mode=EDGE.CLAMP)),
    ("clip", (2, 5, 7, 6), (2, 5, 7, 6), (2, 5, 7, 6),
     dict(clip_rect=((1, 2, 1), (4, 2, 1)), primary_offset=(1, 2, 1), secondary_offset=(0, 0, 1))),
    ("clip_xywh", (1, 5, 7, 6), (1, 5, 7, 6), (1, 6, 8, 6), dict(clip_rect=(2, 1, 9, 9))),
    ("batch_offset_z", (3, 4, 5, 6), (3, 4, 5, 6), (2, 4, 5, 6),
     dict(primary_offset=(0, 0, 1), secondary_offset=(0, 0, 0))),
    ("channel_offsets", (2, 3, 4, 9), (2, 3, 4, 12), (2, 3, 4, 21),
     dict(primary_source_feature_channel_offset=2, secondary_source_feature_channel_offset=5,
          primary_source_feature_channel_max_count=4, destination_feature_channel_offset=16)),
    ("channel_offsets_17", (1, 3, 4, 20), (1, 3, 4, 20), (1, 3, 4, 40),
     dict(primary_source_feature_channel_offset=3, secondary_source_feature_channel_offset=1,
          destination_feature_channel_offset=19)),
    ("primary_stride_2", (2, 10, 14, 6), (2, 5, 7, 6), (2, 5, 7, 6),
     dict(primary_stride_in_pixels_x=2, primary_stride_in_pixels_y=2)),
    ("secondary_stride_2_clamp", (1, 5, 7, 6), (1, 6, 6, 6), (1, 5, 7, 6),
     dict(secondary_stride_in_pixels_x=2, secondary_stride_in_pixels_y=3,
          secondary_offset=(1, -1, 0), secondary_edge_mode=EDGE.CLAMP)),
    ("destination_bigger", (1, 3, 4, 5), (1, 3, 4, 5), (1, 6, 7, 5),
     dict(primary_offset=(-1, -1, 0), secondary_offset=(-2, 0, 0))),
]


@pytest.mark.parametrize("cls,op", [OPS[1], OPS[3]], ids=["sub", "div"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_geometry(geometry, cls, op, device, run, make_image, read_image, rng):
    """Offsets, edge modes (ZERO reads 0: x - 0, x / 0 = ±inf), clip rects, batches with
    offset.z, channel offsets, pixel strides; pixels and channels outside stay untouched."""
    _, p_shape, s_shape, d_shape, attrs = geometry
    x, y = uniform(rng, p_shape), uniform(rng, s_shape, min_abs=0.1)
    d0 = np.full(d_shape, 1234.5)
    dst = run_op(run, device, make_kernel(device, cls, **attrs), make_image(device, x),
                 make_image(device, y), make_image(device, d0))
    expected = ref.binary_pointwise(lambda p, s: ref.arithmetic(op, p, s), x, y, d0,
                                    **settings_to_reference(attrs))
    check(read_image(dst), [expected], np.full(d_shape, ref.FTZ_ATOL), geometry[0])


def test_image_returning_encode(device, run, make_image, read_image, rng):
    x, y = uniform(rng, (2, 4, 5, 7)), uniform(rng, (2, 4, 5, 7))
    kernel = make_kernel(device, mk.CNNMultiply, destination_image_allocator=mk.Image.default_allocator())
    dst = run(device, lambda cb: kernel.encode(cb, make_image(device, x), make_image(device, y)))
    assert isinstance(dst, mk.Image)
    assert (dst.number_of_images, dst.height, dst.width, dst.feature_channels) == (2, 4, 5, 7)
    check(read_image(dst), [ref.arithmetic(ref.MUL, x, y)], np.full(x.shape, ref.FTZ_ATOL), "encode")


@pytest.mark.parametrize("with_destinations", [True, False])
def test_encode_batch(with_destinations, device, run, make_image, read_image, rng):
    xs = [uniform(rng, (1, 3, 4, 6)) for _ in range(3)]
    ys = [uniform(rng, (1, 3, 4, 6)) for _ in range(3)]
    kernel = make_kernel(device, mk.CNNSubtract, PARAMS["clamped"],
                         destination_image_allocator=mk.Image.default_allocator())
    primaries = [make_image(device, x) for x in xs]
    secondaries = [make_image(device, y) for y in ys]
    dsts = [mk.Image(device, p.descriptor()) for p in primaries] if with_destinations else None
    out = run(device, lambda cb: kernel.encode_batch(cb, primaries, secondaries, dsts))
    assert len(out) == 3
    for o, x, y in zip(out, xs, ys):
        check(read_image(o), references(ref.SUB, x, y, PARAMS["clamped"]),
              tolerance(ref.SUB, x, y, PARAMS["clamped"]), "encode_batch")


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    @st.composite
    def binary_geometries(draw):
        n = draw(st.integers(1, 3))
        p = (n, draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 19)))
        attrs = {}
        p_c0 = draw(st.integers(0, p[3] - 1))
        channels = p[3] - p_c0
        attrs["primary_source_feature_channel_offset"] = p_c0
        s_cs = draw(st.sampled_from([0, 1]))
        s_c0 = draw(st.integers(0, 3))
        s = (n, draw(st.integers(1, 6)), draw(st.integers(1, 6)),
             s_c0 + (1 if s_cs == 0 else channels) + draw(st.integers(0, 2)))
        attrs.update(secondary_source_feature_channel_offset=s_c0,
                     secondary_stride_in_feature_channels=s_cs)
        for who in ("primary", "secondary"):
            attrs[f"{who}_offset"] = (draw(st.integers(-3, 6)), draw(st.integers(-3, 6)), 0)
            attrs[f"{who}_stride_in_pixels_x"] = draw(st.integers(0, 2))
            attrs[f"{who}_stride_in_pixels_y"] = draw(st.integers(0, 2))
            attrs[f"{who}_edge_mode"] = draw(st.sampled_from([EDGE.ZERO, EDGE.CLAMP]))
        dst_c0 = draw(st.integers(0, 3))
        attrs["destination_feature_channel_offset"] = dst_c0
        d = (n, draw(st.integers(1, 7)), draw(st.integers(1, 7)), dst_c0 + channels + draw(st.integers(0, 2)))
        attrs["clip_rect"] = ((draw(st.integers(0, 3)), draw(st.integers(0, 3)), 0),
                              (draw(st.integers(0, 8)), draw(st.integers(0, 8)), 3))
        return p, s, d, attrs

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(binary_geometries(), st.sampled_from(OPS))
    def test_geometry_hypothesis(device, run, make_image, read_image, geometry, cls_op):
        cls, op = cls_op
        p_shape, s_shape, d_shape, attrs = geometry
        rng = np.random.default_rng(0)
        x, y = uniform(rng, p_shape), uniform(rng, s_shape, min_abs=0.1)
        d0 = np.full(d_shape, 1234.5)
        dst = run_op(run, device, make_kernel(device, cls, **attrs), make_image(device, x),
                     make_image(device, y), make_image(device, d0))
        expected = ref.binary_pointwise(lambda p, s: ref.arithmetic(op, p, s), x, y, d0,
                                        **settings_to_reference(attrs))
        check(read_image(dst), [expected], np.full(d_shape, ref.FTZ_ATOL), str(attrs))


# ---- storage formats ------------------------------------------------------------------------

STORAGE = [FMT.FLOAT16, FMT.UNORM8, FMT.UNORM16, FMT.BFLOAT16]


def storage_inputs(rng, fmt, shape):
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape) / 255.0
    if fmt == FMT.UNORM16:
        return rng.integers(0, 65536, shape) / 65535.0
    return ref.round_to_format(uniform(rng, shape), int(fmt))


@pytest.mark.parametrize("params", [PARAMS["plain"], PARAMS["scaled"]], ids=["plain", "scaled"])
@pytest.mark.parametrize("fmt", STORAGE, ids=[f.name for f in STORAGE])
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_storage_format(cls, op, fmt, params, isa, device, run, make_image, read_image, rng):
    """All operands in fmt: the float32 result rounded to fmt (unorm: NaN → 0, clamped to
    [0, 1]; x / 0 → inf → 1), within 1 unit in the last place of fmt."""
    x, y = storage_inputs(rng, fmt, (1, 3, 5, 17)), storage_inputs(rng, fmt, (1, 3, 5, 17))
    dst = run_op(run, device, make_kernel(device, cls, params), make_image(device, x, fmt),
                 make_image(device, y, fmt))
    assert dst.feature_channel_format == fmt
    got = read_image(dst)
    expected = ref.round_to_format(ref.round_to_format(
        ref.arithmetic(op, x, y, **reference_kwargs(params)), ref.FLOAT32), int(fmt))
    ug, ue = ref.format_units(got, int(fmt)), ref.format_units(expected, int(fmt))
    bad = (np.isnan(ug) != np.isnan(ue)) | (np.abs(ug - ue) > 1)
    assert not bad.any(), f"got {got[bad][:6]} expected {expected[bad][:6]}"


def test_mixed_formats(device, run, make_image, read_image, rng):
    """FLOAT16 primary, UNORM8 secondary, FLOAT32 destination: each read exactly."""
    x, y = storage_inputs(rng, FMT.FLOAT16, (1, 3, 4, 5)), storage_inputs(rng, FMT.UNORM8, (1, 3, 4, 5))
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 4, 3, 5, 1))
    run_op(run, device, mk.CNNAdd(device), make_image(device, x, FMT.FLOAT16),
           make_image(device, y, FMT.UNORM8), dst)
    y32 = ref.round_to_format(y, ref.FLOAT32)       # unorm k/255 is decoded to float32
    check(read_image(dst), [ref.arithmetic(ref.ADD, x, y32)], np.full(x.shape, ref.FTZ_ATOL), "mixed")


# ---- validation ---------------------------------------------------------------------------

def _image(device, shape=(1, 3, 4, 5)):
    n, h, w, c = shape
    return mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, w, h, c, n))


BAD = [  # (id, primary shape, secondary shape, destination shape, settings, message)
    ("negative_primary_stride_x", None, None, None, dict(primary_stride_in_pixels_x=-1), "stride"),
    ("negative_primary_stride_y", None, None, None, dict(primary_stride_in_pixels_y=-1), "stride"),
    ("negative_secondary_stride_x", None, None, None, dict(secondary_stride_in_pixels_x=-1), "stride"),
    ("negative_secondary_stride_y", None, None, None, dict(secondary_stride_in_pixels_y=-2), "stride"),
    ("secondary_channel_stride_2", None, None, None, dict(secondary_stride_in_feature_channels=2), "stride"),
    ("primary_channel_stride_neg", None, None, None, dict(primary_stride_in_feature_channels=-1), "stride"),
    ("min_above_max", None, None, None, dict(minimum_value=1.0, maximum_value=0.0), "minimum"),
    ("secondary_too_few_channels", None, (1, 3, 4, 3), None, {}, "channel"),
    ("secondary_channel_offset_outside", None, None, None,
     dict(secondary_source_feature_channel_offset=5), "channel offset"),
    ("primary_channel_offset_outside", None, None, None,
     dict(primary_source_feature_channel_offset=7), "channel offset"),
    ("too_few_dst_channels", None, None, (1, 3, 4, 4), {}, "channel"),
    ("dst_channel_offset", None, None, None, dict(destination_feature_channel_offset=2), "channel"),
    ("primary_edge_mirror", None, None, None, dict(primary_edge_mode=EDGE.MIRROR), "edge mode"),
    ("secondary_edge_mirror", None, None, None, dict(secondary_edge_mode=EDGE.MIRROR_WITH_EDGE), "edge mode"),
    ("primary_offset_z", None, None, None, dict(primary_offset=(0, 0, 1)), "images"),
    ("secondary_offset_z", None, None, None, dict(secondary_offset=(0, 0, 3)), "images"),
    ("secondary_fewer_images", (2, 3, 4, 5), (1, 3, 4, 5), (2, 3, 4, 5), {}, "images"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_encode_raises(bad, device):
    """A ValidationError (a ValueError) naming the problem; nothing recorded, the command
    buffer still runs, the destination is untouched."""
    _, p, s, d, attrs, message = bad
    default = (1, 3, 4, 5)
    primary, secondary, dst = _image(device, p or default), _image(device, s or default), _image(device, d or default)
    kernel = make_kernel(device, mk.CNNAdd, bias=1.0, **attrs)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match=f"(?i){message}") as info:
        kernel.encode(cb, primary, secondary, dst)
    assert isinstance(info.value, ValueError)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None
    assert np.all(dst.to_numpy() == 0)


def test_bad_batches_raise(device):
    cb = device.make_command_queue().make_command_buffer()
    kernel = mk.CNNAdd(device)
    with pytest.raises(mk.ValidationError):
        kernel.encode_batch(cb, [_image(device)] * 2, [_image(device)])
    with pytest.raises(mk.ValidationError, match="(?i)one image"):
        kernel.encode_batch(cb, [_image(device, (2, 3, 4, 5))], [_image(device, (2, 3, 4, 5))])


def test_same_temporary_twice_needs_read_count_2(device):
    cb = device.make_command_queue().make_command_buffer()
    temporary = mk.TemporaryImage(cb, mk.ImageDescriptor(FMT.FLOAT32, 4, 3, 5, 1))
    with pytest.raises(mk.ValidationError, match="(?i)read_count"):
        mk.CNNAdd(device).encode(cb, temporary, temporary, _image(device))
    temporary.read_count = 0


def test_destination_aliasing_raises(device):
    image = _image(device)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match="(?i)alias|share"):
        mk.CNNAdd(device).encode(cb, _image(device), image, image)


# ---- determinism: threads and ISAs ----------------------------------------------------------

BIG = (2, 37, 41, 67)


def bits(image):
    return image.to_numpy().view(np.uint32)


@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "1x1"])
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_threads_bitwise(cls, op, broadcast, isa, device, device1, run, make_image, rng):
    """1 and 2 threads: bitwise identical results (NaN payloads included) on a big image."""
    x = uniform(rng, BIG)
    x.reshape(-1)[rng.choice(x.size, 150, replace=False)] = np.resize(SPECIALS, 150)
    x = ref.round_to_format(x, ref.FLOAT32)
    attrs = {}
    if broadcast:
        y = uniform(rng, (2, 1, 1, 67))
        attrs = dict(secondary_stride_in_pixels_x=0, secondary_stride_in_pixels_y=0)
    else:
        y = uniform(rng, BIG)
    images = [run_op(run, dev, make_kernel(dev, cls, PARAMS["scaled"], **attrs),
                     make_image(dev, x), make_image(dev, y)) for dev in (device1, device)]
    assert np.array_equal(bits(images[0]), bits(images[1]))
    if broadcast:                                       # and right, not just reproducible
        y = np.broadcast_to(y, BIG)
    check(images[1].to_numpy().astype(np.float64), references(op, x, y, PARAMS["scaled"]),
          tolerance(op, x, y, PARAMS["scaled"]), cls.__name__)


@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("cls,op", OPS, ids=OP_IDS)
def test_isa_agreement(cls, op, params, select_isa, device, run, make_image, read_image, rng):
    """generic, avx2, avx512: each within the tolerance (plain ops: bitwise equal)."""
    x, y = uniform(rng, (1, 13, 17, 33)), uniform(rng, (1, 13, 17, 33), min_abs=0.01)
    x.reshape(-1)[:len(SPECIALS)] = SPECIALS
    y.reshape(-1)[1:len(SPECIALS) + 1] = SPECIALS
    x, y = ref.round_to_format(x, ref.FLOAT32), ref.round_to_format(y, ref.FLOAT32)
    refs, tol = references(op, x, y, params), tolerance(op, x, y, params)
    outs = {}
    for name in ("generic", "avx2", "avx512"):
        try:
            select_isa(name)
        except pytest.skip.Exception:
            continue
        outs[name] = read_image(run_op(run, device, make_kernel(device, cls, params),
                                       make_image(device, x), make_image(device, y)))
        check(outs[name], refs, tol, f"{cls.__name__} on {name}")
    for (na, a), (nb, b) in itertools.combinations(outs.items(), 2):
        with np.errstate(invalid="ignore"):
            same = (a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= 2 * tol)
        assert same.all(), f"{na} vs {nb}: {a[~same][:5]} vs {b[~same][:5]}"


def test_non_integer_stride_raises(device, run, make_image):
    x = np.arange(1, 61, dtype=np.float64).reshape(1, 3, 4, 5)
    kernel = make_kernel(device, mk.CNNAdd, primary_stride_in_pixels_x=1.5)
    with pytest.raises(mk.ValidationError):
        run_op(run, device, kernel, make_image(device, x), make_image(device, 0 * x))


def test_huge_stride_raises_validation_error(device):
    kernel = make_kernel(device, mk.CNNAdd, secondary_stride_in_pixels_x=2 ** 62)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError):
        kernel.encode(cb, _image(device), _image(device), _image(device))
