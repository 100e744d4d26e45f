"""Neurons (CNNNeuron and its subclasses) against the float64 references of reference.py:
every type on FLOAT32 (random inputs, special values, denormals), the storage formats, the
pointwise geometry, validation, thread determinism and ISA agreement."""
import itertools
import math
from typing import NamedTuple

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import CNNNeuronType as T
from mpskernels import ImageEdgeMode as EDGE
from mpskernels import ImageFeatureChannelFormat as FMT

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from . import reference as ref

U = 2.0 ** -24        # float32 unit roundoff
RTOL = 1e-6           # about 8 float32 ulps
FTZ_ATOL = ref.FTZ_ATOL
F32 = np.float32


class Case(NamedTuple):
    id: str
    type: int
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    lo: float = -10.0     # random inputs are uniform in [lo, hi] ...
    hi: float = 10.0
    min_abs: float = 0.0  # ... with |x| >= min_abs
    tol: str = "rel"      # see tolerance()


# Tolerance kinds (tolerance() below computes them):
#  exact  - at most one float32 multiply (correctly rounded), so bitwise equal to the float64
#           reference rounded to float32: NONE, RELU, ABSOLUTE, PRELU, RELUN.
#  rel    - rtol 1e-6 (~8 ulp) for a well-conditioned transcendental formula: SIGMOID, TANH,
#           SOFT_PLUS, SOFT_SIGN, ELU, GELU.
#  affine - LINEAR, HARD_SIGMOID: t = a*x + b in float32 may cancel near t = 0, so the error
#           is relative to the terms, not the result: + 2u*(|a*x| + |b|) (one rounding for the
#           product, one for the sum; an FMA rounds once).
#  exp    - EXPONENTIAL c^t: the float32 rounding of t = a*x + b alone is a relative error of
#           |ln c|*|dt| in the result, dt <= 2u*(|a*x| + |b|): rtol 1e-6 + |ln c|*dt.
#  pow    - POWER t^c: the same rounding of t is a relative error |c|*dt/|t|.
#  log    - LOGARITHM log_c(t): the rounding of t is an absolute error dt/(|t|*|ln c|)
#           (large relative error where log_c(t) ~ 0, i.e. t ~ 1: that is the formula's
#           conditioning, not the kernel's).
# Every kind also allows FTZ_ATOL = 2^-120 (64 * FLT_MIN) absolutely: the kernels flush
# denormal results and intermediates to zero (FTZ/DAZ), so a result within a few FLT_MIN of
# zero may be ±0 (e.g. TANH(FLT_MIN) = a*tanh(b*FLT_MIN), where b*FLT_MIN flushes to 0).
CASES = [
    Case("none", T.NONE, lo=-100, hi=100, tol="exact"),
    Case("relu", T.RELU, 0.1, lo=-50, hi=50, tol="exact"),
    Case("relu_a0", T.RELU, 0.0, lo=-50, hi=50, tol="exact"),
    Case("linear", T.LINEAR, 1.7, -0.3, lo=-50, hi=50, tol="affine"),
    Case("sigmoid", T.SIGMOID, lo=-20, hi=20),
    Case("hard_sigmoid", T.HARD_SIGMOID, 0.2, 0.5, lo=-6, hi=6, tol="affine"),
    Case("tanh", T.TANH, 1.5, 0.7, lo=-10, hi=10),
    Case("absolute", T.ABSOLUTE, lo=-100, hi=100, tol="exact"),
    Case("soft_plus", T.SOFT_PLUS, 1.3, 0.8, lo=-30, hi=30),
    Case("soft_sign", T.SOFT_SIGN, lo=-100, hi=100),
    Case("elu", T.ELU, 0.9, lo=-20, hi=20),
    Case("prelu", T.PRELU, lo=-50, hi=50, tol="exact"),
    Case("relun", T.RELUN, 0.1, 6.0, lo=-20, hi=20, tol="exact"),
    # POWER: fractional c needs a positive base (t in [0.05, 6]); integer c takes negative bases
    Case("power_frac", T.POWER, 0.5, 1.0, 2.5, lo=-1.9, hi=10, tol="pow"),
    Case("power_sqrt", T.POWER, 1.0, 0.0, 0.5, lo=0.0, hi=100, tol="pow"),
    Case("power_odd", T.POWER, 1.0, 0.0, 3.0, lo=-20, hi=20, tol="pow"),
    Case("power_even", T.POWER, 0.5, -1.0, 2.0, lo=-20, hi=20, tol="pow"),
    Case("power_neg", T.POWER, 1.0, 0.0, -3.0, lo=-8, hi=8, min_abs=0.05, tol="pow"),
    # EXPONENTIAL: c == -1 is base e
    Case("exp_e", T.EXPONENTIAL, 1.0, 0.5, -1.0, lo=-20, hi=20, tol="exp"),
    Case("exp_2", T.EXPONENTIAL, 0.7, -1.0, 2.0, lo=-30, hi=30, tol="exp"),
    Case("exp_10", T.EXPONENTIAL, 0.5, 0.0, 10.0, lo=-15, hi=15, tol="exp"),
    Case("exp_half", T.EXPONENTIAL, 1.0, 0.0, 0.5, lo=-20, hi=20, tol="exp"),
    # LOGARITHM: c == -1 is the natural log; positive arguments
    Case("log_e", T.LOGARITHM, 1.0, 0.0, -1.0, lo=0.01, hi=1000, tol="log"),
    Case("log_2", T.LOGARITHM, 2.0, 1.0, 2.0, lo=0.0, hi=50, tol="log"),
    Case("log_10", T.LOGARITHM, 0.5, 3.0, 10.0, lo=-5.9, hi=100, tol="log"),
    Case("gelu", T.GELU, lo=-10, hi=10),
]
CASE_IDS = [c.id for c in CASES]
assert {c.type for c in CASES} == set(range(16))   # every neuron type is covered

SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, ref.FLT_MAX, -ref.FLT_MAX,
            1e4, -1e4, 100.0, -100.0, 88.5, -88.5, 1.0, -1.0, 0.5, 1e-30, -1e-30,
            ref.FLT_MIN, -ref.FLT_MIN]
DENORMALS = [2.0 ** -130, -(2.0 ** -130), 2.0 ** -149, -(2.0 ** -149), 1e-39, -1e-39]


def slopes_for(channels):
    """PReLU slopes, one per channel: negative, zero, fractional and > 1."""
    return np.linspace(-0.5, 2.0, channels).astype(F32)


def make_neuron(device, case, slopes=None):
    if case.type == T.PRELU:
        descriptor = mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes)
    else:
        descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(case.type, case.a, case.b, case.c)
    return mk.CNNNeuron(device, descriptor)


def reference(case, x, slopes=None, channels=None):
    return ref.neuron(case.type, x, case.a, case.b, case.c, slopes, channels)


def random_inputs(rng, case, shape):
    x = rng.uniform(case.lo, case.hi, shape)
    if case.min_abs:
        x = np.where(x < 0, -1, 1) * np.maximum(np.abs(x), case.min_abs)
    return x.astype(F32).astype(np.float64)


def tolerance(case, x, r):
    """Absolute tolerance per element for a float32 result against the float64 reference r."""
    a, b, c = ref.f32(case.a), ref.f32(case.b), ref.f32(case.c)
    with np.errstate(all="ignore"):
        t = np.abs(a * x + b)
        dt = 2 * U * (np.abs(a * x) + abs(b))
        ar = np.abs(r)
        ln_c = 1.0 if c == -1 else abs(math.log(c)) if c > 0 else 0.0
        tol = {
            "exact": lambda: np.zeros_like(r),
            "rel": lambda: RTOL * ar,
            "affine": lambda: RTOL * ar + dt,
            "exp": lambda: ar * (RTOL + ln_c * dt),
            "pow": lambda: ar * (RTOL + abs(c) * dt / t),
            "log": lambda: RTOL * ar + dt / (t * ln_c),
        }[case.tol]()
        tol = np.nan_to_num(tol, nan=0.0, posinf=np.inf)
    return tol + FTZ_ATOL


T_TYPES = {T.LINEAR, T.HARD_SIGMOID, T.POWER, T.EXPONENTIAL, T.LOGARITHM}


def references(case, x, slopes=None, channels=None):
    """The float64 reference and, for the types of t = a*x + b, also the formula applied to
    float32(t): where t overflows float32 (or cancels) the kernel honestly sees that t."""
    r = reference(case, x, slopes, channels)
    if case.type not in T_TYPES:
        return [r]
    with np.errstate(all="ignore"):
        t32 = ref.round_to_format(ref.f32(case.a) * x + ref.f32(case.b), ref.FLOAT32)
    return [r, ref.neuron(case.type, t32, 1.0, 0.0, case.c)]


def check(got, x, refs, tol, what=""):
    if not isinstance(refs, list):
        refs = [refs]
    bad = ref.mismatches(got, refs, tol)
    if bad.any():
        idx = [tuple(i) for i in np.argwhere(bad)[:8]]
        tol = np.broadcast_to(tol, got.shape)
        lines = [f"x={x[i]!r} got={got[i]!r} ref={refs[0][i]!r} tol={tol[i]!r}" for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} wrong, e.g.\n" + "\n".join(lines))


def run_neuron(run, device, kernel, src, dst=None, fmt=None):
    """Encode kernel from src into dst (a new Image like src, or in format fmt) and run it."""
    if dst is None:
        d = src.descriptor()
        if fmt is not None:
            d.channel_format = fmt
        dst = mk.Image(device, d)
    run(device, lambda cb: kernel.encode(cb, src, dst))
    return dst


def neuron_on(run, device, make_image, read_image, case, x, fmt=FMT.FLOAT32, slopes=None):
    src = make_image(device, x, fmt)
    return read_image(run_neuron(run, device, make_neuron(device, case, slopes), src))


# ---- FLOAT32 accuracy ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_random(case, isa, device, run, make_image, read_image, rng):
    x = random_inputs(rng, case, (2, 5, 7, 17))
    slopes = slopes_for(17)
    got = neuron_on(run, device, make_image, read_image, case, x, slopes=slopes)
    refs = references(case, x, slopes)
    check(got, x, refs, tolerance(case, x, refs[0]), f"{case.id} on {isa}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_special_values(case, isa, device, run, make_image, read_image, rng):
    """±0, ±inf, NaN, huge and overflowing magnitudes: the IEEE / limit values of the formula
    (e.g. SOFT_SIGN(±inf) = ±1, GELU(-inf) = -0, TANH(±1e30) = ±a, LOGARITHM(0) = -inf,
    LOGARITHM(<0) = NaN, NaN in gives NaN out), at every position of a SIMD vector."""
    values = np.array(SPECIALS * 24)[:16 * 33]
    x = ref.round_to_format(rng.permutation(values).reshape(1, 3, 11, 16), ref.FLOAT32)
    slopes = np.array([0.25], F32)                       # one slope, broadcast
    got = neuron_on(run, device, make_image, read_image, case, x, slopes=slopes)
    refs = references(case, x, slopes)
    check(got, x, refs, tolerance(case, x, refs[0]), f"{case.id} on {isa}")


# Types whose result may be the input's own bits (a selection, sign change or copy, no
# arithmetic): with DAZ a negative denormal compares as 0 and may pass through unchanged.
COPYING = {T.NONE, T.RELU, T.ABSOLUTE, T.PRELU, T.RELUN, T.ELU}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_denormal_inputs(case, isa, device, run, make_image, read_image):
    """Kernels run with FTZ/DAZ. Expected for a denormal input d: f(±0) (DAZ: read as zero)
    or f(d); either within the usual tolerance (FTZ_ATOL included), never garbage. E.g. LOGARITHM of a
    denormal may be -inf (DAZ) or ~-103 (exact), nothing else. Computed results are never
    denormal (FTZ); only a type that may return the input's bits can return a denormal."""
    x = ref.round_to_format(np.array(DENORMALS * 6).reshape(1, 2, 18, 1), ref.FLOAT32)
    slopes = np.array([0.25], F32)
    got = neuron_on(run, device, make_image, read_image, case, x, slopes=slopes)
    zeros = np.copysign(0.0, x)
    refs = references(case, x, slopes) + references(case, zeros, slopes)
    tol = np.maximum(tolerance(case, x, refs[0]), tolerance(case, zeros, refs[-1]))
    check(got, x, refs, tol, f"{case.id} on {isa}, denormal inputs")
    if case.type not in COPYING:
        denormal = (got != 0) & (np.abs(got) < ref.FLT_MIN)
        assert not denormal.any(), f"{case.id}: denormal results {got[denormal]} (FTZ expected)"


def test_results_below_flt_min_are_flushed(isa, device, run, make_image, read_image):
    """FTZ: LINEAR(a = 2^-10) of inputs around 2^-120 gives ~2^-130, a denormal: stored as ±0."""
    x = np.array([2.0 ** -120, -(2.0 ** -120), 1.5 * 2.0 ** -120, 2.0 ** -117] * 8).reshape(1, 1, 2, 16)
    case = Case("linear_tiny", T.LINEAR, 2.0 ** -10, 0.0)
    got = neuron_on(run, device, make_image, read_image, case, x)
    assert np.all(got == 0), got[got != 0]


# ---- the subclasses ------------------------------------------------------------------------

SUBCLASSES = [
    (mk.CNNNeuronReLU, (0.1,), Case("relu", T.RELU, 0.1)),
    (mk.CNNNeuronLinear, (1.7, -0.3), Case("linear", T.LINEAR, 1.7, -0.3, tol="affine")),
    (mk.CNNNeuronSigmoid, (), Case("sigmoid", T.SIGMOID)),
    (mk.CNNNeuronHardSigmoid, (0.2, 0.5), Case("hard_sigmoid", T.HARD_SIGMOID, 0.2, 0.5, tol="affine")),
    (mk.CNNNeuronTanH, (1.5, 0.7), Case("tanh", T.TANH, 1.5, 0.7)),
    (mk.CNNNeuronAbsolute, (), Case("absolute", T.ABSOLUTE)),
    (mk.CNNNeuronSoftPlus, (1.3, 0.8), Case("soft_plus", T.SOFT_PLUS, 1.3, 0.8)),
    (mk.CNNNeuronSoftSign, (), Case("soft_sign", T.SOFT_SIGN)),
    (mk.CNNNeuronELU, (0.9,), Case("elu", T.ELU, 0.9)),
    (mk.CNNNeuronPReLU, (slopes_for(5),), Case("prelu", T.PRELU)),
    (mk.CNNNeuronReLUN, (0.1, 6.0), Case("relun", T.RELUN, 0.1, 6.0)),
    (mk.CNNNeuronPower, (0.5, 1.0, 2.0), Case("power", T.POWER, 0.5, 1.0, 2.0, tol="pow")),
    (mk.CNNNeuronExponential, (0.5, 0.0, -1.0), Case("exp", T.EXPONENTIAL, 0.5, 0.0, -1.0, tol="exp")),
    (mk.CNNNeuronLogarithm, (0.5, 6.0, 10.0), Case("log", T.LOGARITHM, 0.5, 6.0, 10.0, tol="log")),
    (mk.CNNNeuronGeLU, (), Case("gelu", T.GELU)),
]


@pytest.mark.parametrize("cls,args,case", SUBCLASSES, ids=[s[0].__name__ for s in SUBCLASSES])
def test_subclass(cls, args, case, device, run, make_image, read_image, rng):
    x = rng.uniform(-10, 10, (1, 3, 4, 5)).astype(F32).astype(np.float64)
    kernel = cls(device, *args)
    assert kernel.neuron_type == case.type
    got = read_image(run_neuron(run, device, kernel, make_image(device, x)))
    refs = references(case, x, slopes_for(5))
    check(got, x, refs, tolerance(case, x, refs[0]), cls.__name__)


# ---- storage formats ---------------------------------------------------------------------

STORAGE = [FMT.FLOAT16, FMT.UNORM8, FMT.UNORM16, FMT.BFLOAT16]


def storage_inputs(rng, case, fmt, shape):
    """Random inputs representable in fmt: the case's domain for floats, [0, 1] for unorm."""
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape) / 255.0
    if fmt == FMT.UNORM16:
        return rng.integers(0, 65536, shape) / 65535.0
    x = random_inputs(rng, case, shape)
    return ref.round_to_format(x, int(fmt))


def assert_within_one_unit(got, r, fmt, what):
    """got (read from an image of format fmt) is float32(r) rounded to fmt, give or take one
    unit in the last place of fmt (the float32 result may itself be off by a few float32
    ulps, which can move a value across a rounding boundary of the narrower format)."""
    expected = ref.round_to_format(ref.round_to_format(r, ref.FLOAT32), int(fmt))
    ug, ue = ref.format_units(got, int(fmt)), ref.format_units(expected, int(fmt))
    bad = (np.isnan(ug) != np.isnan(ue)) | (np.abs(ug - ue) > 1)
    assert not bad.any(), (f"{what}: {int(bad.sum())} wrong, e.g. got {got[bad][:6]} "
                           f"expected {expected[bad][:6]}")


@pytest.mark.parametrize("fmt", STORAGE, ids=[f.name for f in STORAGE])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_storage_format(case, fmt, isa, device, run, make_image, read_image, rng):
    """Source and destination in fmt: the result is the float32 result rounded to fmt
    (nearest even; unorm: NaN → 0, clamped to [0, 1]), within 1 unit of fmt."""
    x = storage_inputs(rng, case, fmt, (1, 3, 5, 17))
    src = make_image(device, x, fmt)
    assert np.array_equal(read_image(src), x)          # the inputs are exact in fmt
    slopes = slopes_for(17)
    got = read_image(run_neuron(run, device, make_neuron(device, case, slopes), src))
    assert_within_one_unit(got, reference(case, x, slopes), fmt, f"{case.id} {fmt.name} {isa}")


STORE_SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, ref.FLT_MAX, 1.0, -0.1,
                  1.0000001, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.4999 / 255, 0.5 / 65535,
                  1e-5, -1e-5, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 65504.0, 65519.0,
                  65520.0, 1e5, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -9, 3.0e38]


@pytest.mark.parametrize("fmt", STORAGE, ids=[f.name for f in STORAGE])
def test_store_special_values(fmt, isa, device, run, make_image, read_image, rng):
    """FLOAT32 → fmt through NONE: rounding to nearest even, ties included; unorm clamps to
    [0, 1] and stores NaN as 0; float16 overflows to ±inf from 65520 up and keeps subnormals;
    NaN stays NaN in float16 / bfloat16. Exact: no tolerance here."""
    x = rng.permutation(np.resize(STORE_SPECIALS, 16 * 12)).reshape(1, 2, 6, 16)
    x = ref.round_to_format(x, ref.FLOAT32)
    dst = run_neuron(run, device, make_neuron(device, CASES[0]), make_image(device, x), fmt=fmt)
    got, expected = read_image(dst), ref.round_to_format(x, int(fmt))
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    assert same.all(), f"x={x[~same]} got={got[~same]} expected={expected[~same]}"


MIXED = [(FMT.FLOAT16, FMT.FLOAT32), (FMT.FLOAT32, FMT.FLOAT16), (FMT.UNORM8, FMT.FLOAT32),
         (FMT.FLOAT32, FMT.UNORM8), (FMT.BFLOAT16, FMT.UNORM16), (FMT.FLOAT32, FMT.BFLOAT16)]


@pytest.mark.parametrize("src_fmt,dst_fmt", MIXED, ids=[f"{a.name}-{b.name}" for a, b in MIXED])
def test_mixed_formats(src_fmt, dst_fmt, device, run, make_image, read_image, rng):
    case = Case("linear", T.LINEAR, 0.8, 0.1, lo=-0.2, hi=1.2, tol="affine")
    x = storage_inputs(rng, case, src_fmt, (2, 3, 5, 7))
    dst = run_neuron(run, device, make_neuron(device, case), make_image(device, x, src_fmt),
                     fmt=dst_fmt)
    assert dst.feature_channel_format == dst_fmt
    if dst_fmt == FMT.FLOAT32:
        refs = references(case, x)
        check(read_image(dst), x, refs, tolerance(case, x, refs[0]), "mixed")
    else:
        assert_within_one_unit(read_image(dst), reference(case, x), dst_fmt, "mixed")


# ---- shapes and geometry ------------------------------------------------------------------

LINEAR_EXACT = Case("linear2", T.LINEAR, 2.0, 0.5, tol="exact")  # 2x exact, + 0.5 rounds once
GEOMETRY_CASES = [LINEAR_EXACT, Case("prelu", T.PRELU, tol="exact")]
SENTINEL = 1234.5


def filled(shape, value=SENTINEL):
    return np.full(shape, value)


@pytest.mark.parametrize("channels", [1, 3, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: c.id)
def test_channel_counts(case, channels, isa, device, run, make_image, read_image, rng):
    """Odd sizes, a batch of 3, channel counts that are and are not multiples of 16."""
    x = rng.uniform(-5, 5, (3, 7, 9, channels)).astype(F32).astype(np.float64)
    slopes = slopes_for(channels)
    got = neuron_on(run, device, make_image, read_image, case, x, slopes=slopes)
    assert np.array_equal(got, ref.round_to_format(reference(case, x, slopes), ref.FLOAT32))


# (offset, clip_rect, number of destination images) on a 3x6x7x5 source and a Nx8x9x5
# destination prefilled with a sentinel
REGIONS = [
    ((0, 0, 0), mk.RECT_NO_CLIP, 3),
    ((2, 1, 0), ((1, 2, 0), (4, 3, 3)), 3),           # inside both
    ((-3, -2, 0), ((0, 0, 0), (6, 5, 3)), 3),         # starts before the source
    ((4, 3, 0), ((2, 1, 0), (7, 7, 3)), 3),           # runs past the source's right / bottom
    ((-1, -1, 0), mk.RECT_NO_CLIP, 3),                # a border all around
    ((0, 0, 0), ((5, 6, 1), (100, 100, 100)), 3),     # clip_rect larger than the destination
    ((0, 0, 1), ((0, 0, 0), (9, 8, 2)), 2),           # offset.z: source images 1..2 → 0..1
    ((1, 0, 0), ((0, 0, 2), (9, 8, 1)), 3),           # clip z: source image 0 → image 2
    ((-20, 30, 0), ((1, 1, 0), (3, 3, 1)), 1),        # entirely outside the source
    ((0, 0, 0), ((0, 0, 0), (0, 5, 1)), 3),           # empty clip: nothing written
    ((0, 0, 0), ((9, 0, 0), (4, 4, 1)), 3),           # clip beyond the destination
    ((0, 0, 0), (2, 3, 4, 2), 3),                     # (x, y, w, h) form
]


@pytest.mark.parametrize("edge", [EDGE.ZERO, EDGE.CLAMP], ids=["ZERO", "CLAMP"])
@pytest.mark.parametrize("offset,clip,n_dst", REGIONS, ids=[f"r{i}" for i in range(len(REGIONS))])
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: c.id)
def test_offset_clip_edge(case, offset, clip, n_dst, edge, device, run, make_image, read_image, rng):
    """MPS geometry: offset is the source position of clip_rect's origin; ZERO reads 0 outside
    the source (so the neuron writes f(0), e.g. 0.5 for LINEAR(2, 0.5)), CLAMP the nearest
    edge pixel; destination pixels outside clip_rect keep their values."""
    x = rng.uniform(-5, 5, (3, 6, 7, 5)).astype(F32).astype(np.float64)
    d0 = filled((n_dst, 8, 9, 5))
    slopes = slopes_for(5)
    kernel = make_neuron(device, case, slopes)
    kernel.offset, kernel.clip_rect, kernel.edge_mode = offset, clip, edge
    dst = run_neuron(run, device, kernel, make_image(device, x), make_image(device, d0))
    if len(clip) == 4:                                  # (x, y, w, h)
        clip = ((clip[0], clip[1], 0), (clip[2], clip[3], 1))
    expected = ref.unary_pointwise(lambda v, ch: reference(case, v, slopes, ch), x, d0,
                                   offset, clip, int(edge))
    assert np.array_equal(read_image(dst), ref.round_to_format(expected, ref.FLOAT32))


@pytest.mark.parametrize("src_c0,max_count,dst_c0,dst_channels", [
    (0, 3, 0, 3), (2, 2**64 - 1, 0, 5), (2, 3, 1, 6), (6, 1, 4, 5), (0, 2**64 - 1, 16, 33),
    (1, 16, 17, 40),
])
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: c.id)
def test_channel_offsets(case, src_c0, max_count, dst_c0, dst_channels, isa, device, run,
                         make_image, read_image, rng):
    """source_feature_channel_offset / _max_count pick the source channels (PReLU slopes go
    by SOURCE channel), destination_feature_channel_offset places them; other destination
    channels are untouched."""
    x = rng.uniform(-5, 5, (2, 3, 5, 17 if dst_channels > 6 else 7)).astype(F32).astype(np.float64)
    slopes = slopes_for(x.shape[3])
    d0 = filled((2, 3, 5, dst_channels))
    kernel = make_neuron(device, case, slopes)
    kernel.source_feature_channel_offset = src_c0
    kernel.source_feature_channel_max_count = max_count
    kernel.destination_feature_channel_offset = dst_c0
    dst = run_neuron(run, device, kernel, make_image(device, x), make_image(device, d0))
    expected = ref.unary_pointwise(lambda v, ch: reference(case, v, slopes, ch), x, d0,
                                   src_c0=src_c0, src_max=max_count, dst_c0=dst_c0)
    assert np.array_equal(read_image(dst), ref.round_to_format(expected, ref.FLOAT32))


@pytest.mark.parametrize("split", [5, 16, 19])
def test_concatenation(split, device, run, make_image, read_image, rng):
    """Two neurons writing two channel slices of one destination in one command buffer."""
    xa = rng.uniform(-5, 5, (2, 4, 5, split)).astype(F32).astype(np.float64)
    xb = rng.uniform(-5, 5, (2, 4, 5, 7)).astype(F32).astype(np.float64)
    relu = mk.CNNNeuronReLU(device, 0.25)
    linear = mk.CNNNeuronLinear(device, 2.0, 0.5)
    linear.destination_feature_channel_offset = split
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 5, 4, split + 7, 2))
    a, b = make_image(device, xa), make_image(device, xb)

    def encode(cb):
        relu.encode(cb, a, dst)
        linear.encode(cb, b, dst)
    run(device, encode)
    expected = np.concatenate([ref.neuron(ref.RELU, xa, 0.25), ref.neuron(ref.LINEAR, xb, 2.0, 0.5)], axis=3)
    assert np.array_equal(read_image(dst), ref.round_to_format(expected, ref.FLOAT32))


@pytest.mark.parametrize("dst_c0", [0, 3])
def test_image_returning_encode(dst_c0, device, run, make_image, read_image, rng):
    """encode(cb, src) sizes the result like the source (1x1 kernel, SIZE_SAME), with
    destination_feature_channel_offset + channels channels, made by the allocator."""
    x = rng.uniform(-3, 3, (2, 5, 6, 4)).astype(F32).astype(np.float64)
    kernel = mk.CNNNeuronSigmoid(device)
    kernel.destination_feature_channel_offset = dst_c0
    kernel.destination_image_allocator = mk.Image.default_allocator()
    dst = run(device, lambda cb: kernel.encode(cb, make_image(device, x)))
    assert isinstance(dst, mk.Image)
    assert (dst.number_of_images, dst.height, dst.width, dst.feature_channels) == (2, 5, 6, 4 + dst_c0)
    assert dst.feature_channel_format == FMT.FLOAT32
    got = read_image(dst)[..., dst_c0:]
    r = ref.neuron(ref.SIGMOID, x)
    check(got, x, r, RTOL * np.abs(r) + FTZ_ATOL, "image-returning encode")


def test_temporary_chain(device, run, make_image, read_image, rng):
    """The default allocator gives a TemporaryImage another kernel can read in the buffer."""
    x = rng.uniform(-3, 3, (1, 5, 6, 20)).astype(F32).astype(np.float64)
    first, second = mk.CNNNeuronLinear(device, 2.0, 0.5), mk.CNNNeuronAbsolute(device)
    dst = mk.Image(device, mk.ImageDescriptor(FMT.FLOAT32, 6, 5, 20, 1))

    def encode(cb):
        temporary = first.encode(cb, make_image(device, x))
        assert isinstance(temporary, mk.TemporaryImage)
        second.encode(cb, temporary, dst)
    run(device, encode)
    expected = np.abs(ref.round_to_format(2 * x + 0.5, ref.FLOAT32))
    assert np.array_equal(read_image(dst), expected)


@pytest.mark.parametrize("with_destinations", [True, False])
def test_encode_batch(with_destinations, device, run, make_image, read_image, rng):
    xs = [rng.uniform(-5, 5, (1, 3, 4, 6)).astype(F32).astype(np.float64) for _ in range(3)]
    kernel = mk.CNNNeuronReLUN(device, 0.1, 2.0)
    kernel.destination_image_allocator = mk.Image.default_allocator()
    sources = [make_image(device, x) for x in xs]
    dsts = [mk.Image(device, s.descriptor()) for s in sources] if with_destinations else None
    out = run(device, lambda cb: kernel.encode_batch(cb, sources, dsts))
    assert len(out) == 3 and (dsts is None or all(o is d for o, d in zip(out, dsts)))
    for o, x in zip(out, xs):
        assert np.array_equal(read_image(o), ref.round_to_format(ref.neuron(ref.RELUN, x, 0.1, 2.0), ref.FLOAT32))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


if given is not None:
    @st.composite
    def geometries(draw):
        n = draw(st.integers(1, 3))
        src = (n, draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 20)))
        src_c0 = draw(st.integers(0, src[3] - 1))
        max_count = draw(st.sampled_from([2 ** 64 - 1, 1, 2, 5, 17]))
        channels = min(src[3] - src_c0, max_count)
        dst_c0 = draw(st.integers(0, 4))
        dst = (draw(st.integers(1, n)), draw(st.integers(1, 7)), draw(st.integers(1, 7)),
               dst_c0 + channels + draw(st.integers(0, 3)))
        clip = ((draw(st.integers(0, 7)), draw(st.integers(0, 7)), draw(st.integers(0, dst[0] - 1))),
                (draw(st.integers(0, 8)), draw(st.integers(0, 8)), draw(st.integers(1, 3))))
        depth = max(min(clip[0][2] + clip[1][2], dst[0]) - clip[0][2], 0)
        offset = (draw(st.integers(-4, 7)), draw(st.integers(-4, 7)),
                  draw(st.integers(0, n - depth)))
        edge = draw(st.sampled_from([EDGE.ZERO, EDGE.CLAMP]))
        return src, dst, src_c0, max_count, dst_c0, clip, offset, edge

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(geometries(), st.sampled_from(GEOMETRY_CASES))
    def test_geometry_hypothesis(device, run, make_image, read_image, geometry, case):
        src_shape, dst_shape, src_c0, max_count, dst_c0, clip, offset, edge = geometry
        rng = np.random.default_rng(0)
        x = rng.uniform(-5, 5, src_shape).astype(F32).astype(np.float64)
        d0 = filled(dst_shape)
        slopes = slopes_for(src_shape[3])
        kernel = make_neuron(device, case, slopes)
        kernel.offset, kernel.clip_rect, kernel.edge_mode = offset, clip, edge
        kernel.source_feature_channel_offset = src_c0
        kernel.source_feature_channel_max_count = max_count
        kernel.destination_feature_channel_offset = dst_c0
        dst = run_neuron(run, device, kernel, make_image(device, x), make_image(device, d0))
        expected = ref.unary_pointwise(lambda v, ch: reference(case, v, slopes, ch), x, d0,
                                       offset, clip, int(edge), src_c0, max_count, dst_c0)
        assert np.array_equal(read_image(dst), ref.round_to_format(expected, ref.FLOAT32))


# ---- validation ---------------------------------------------------------------------------

def _image(device, n=1, h=3, w=4, c=5, fmt=FMT.FLOAT32):
    return mk.Image(device, mk.ImageDescriptor(fmt, w, h, c, n))


def _set(**attrs):
    def apply(kernel):
        for k, v in attrs.items():
            setattr(kernel, k, v)
    return apply


BAD_ENCODES = [  # (id, source shape (n,h,w,c), destination shape, kernel settings, message)
    ("too_few_dst_channels", (1, 3, 4, 5), (1, 3, 4, 3), _set(), r"channel"),
    ("dst_offset_overflows", (1, 3, 4, 5), (1, 3, 4, 5), _set(destination_feature_channel_offset=1), r"channel"),
    ("dst_offset_negative", (1, 3, 4, 5), (1, 3, 4, 8), _set(destination_feature_channel_offset=-1), r"channel"),
    ("src_offset_outside", (1, 3, 4, 5), (1, 3, 4, 5), _set(source_feature_channel_offset=5), r"channel offset"),
    ("src_offset_negative", (1, 3, 4, 5), (1, 3, 4, 5), _set(source_feature_channel_offset=-1), r"channel offset"),
    ("src_max_count_zero", (1, 3, 4, 5), (1, 3, 4, 5), _set(source_feature_channel_max_count=0), r"max count"),
    ("edge_mirror", (1, 3, 4, 5), (1, 3, 4, 5), _set(edge_mode=EDGE.MIRROR), r"edge mode"),
    ("edge_mirror_with_edge", (1, 3, 4, 5), (1, 3, 4, 5), _set(edge_mode=EDGE.MIRROR_WITH_EDGE), r"edge mode"),
    ("edge_constant", (1, 3, 4, 5), (1, 3, 4, 5), _set(edge_mode=EDGE.CONSTANT), r"edge mode"),
    ("offset_z_beyond", (1, 3, 4, 5), (1, 3, 4, 5), _set(offset=(0, 0, 1)), r"images"),
    ("offset_z_negative", (2, 3, 4, 5), (1, 3, 4, 5), _set(offset=(0, 0, -1)), r"images"),
    ("fewer_source_images", (1, 3, 4, 5), (2, 3, 4, 5), _set(), r"images"),
    ("clip_depth_beyond_source", (2, 3, 4, 5), (3, 3, 4, 5), _set(offset=(0, 0, 1), clip_rect=((0, 0, 1), (4, 3, 2))), r"images"),
]


@pytest.mark.parametrize("bad", BAD_ENCODES, ids=[b[0] for b in BAD_ENCODES])
def test_bad_encode_raises(bad, device):
    """A ValidationError (a ValueError) that names the problem; nothing is recorded, the
    command buffer still runs and the destination is untouched."""
    _, src_shape, dst_shape, configure, message = bad
    src, dst = _image(device, *src_shape), _image(device, *dst_shape)
    kernel = mk.CNNNeuronLinear(device, 2.0, 0.5)
    configure(kernel)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match=f"(?i){message}") as info:
        kernel.encode(cb, src, dst)
    assert isinstance(info.value, ValueError)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None
    assert np.all(dst.to_numpy() == 0)


@pytest.mark.parametrize("n_slopes,src_c0", [(3, 0), (4, 1), (2, 4)])
def test_prelu_too_few_slopes(n_slopes, src_c0, device):
    kernel = mk.CNNNeuronPReLU(device, np.ones(n_slopes, F32))
    kernel.source_feature_channel_offset = src_c0
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match="(?i)slope"):
        kernel.encode(cb, _image(device), _image(device))


def test_prelu_enough_slopes_past_an_offset(device, run, make_image, read_image):
    """Slopes 2..4 serve source channels 2..4: enough, even though only 3 channels are read."""
    x = -np.ones((1, 1, 2, 5))
    kernel = mk.CNNNeuronPReLU(device, np.arange(5, dtype=F32))
    kernel.source_feature_channel_offset = 2
    dst = run_neuron(run, device, kernel, make_image(device, x), _image(device, 1, 1, 2, 3))
    assert np.array_equal(read_image(dst)[0, 0, 0], [-2.0, -3.0, -4.0])


@pytest.mark.parametrize("make", [
    lambda d: mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor([]),
    lambda d: mk.NNNeuronDescriptor.cnn_neuron_descriptor(99),
    lambda d: mk.NNNeuronDescriptor.cnn_neuron_descriptor(T.COUNT),
    lambda d: mk.CNNNeuron(d, "relu"),
    lambda d: mk.CNNNeuron(d, mk.NNNeuronDescriptor(T.PRELU)),          # PRELU without slopes
], ids=["prelu_no_slopes", "unknown_type", "count", "not_a_descriptor", "prelu_no_data"])
def test_bad_neuron_raises(make, device):
    with pytest.raises(mk.ValidationError):
        make(device)


def test_destination_aliasing_source_raises(device):
    image = _image(device)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match="(?i)alias|share"):
        mk.CNNNeuronSigmoid(device).encode(cb, image, image)


def test_encode_batch_mismatch_raises(device):
    cb = device.make_command_queue().make_command_buffer()
    kernel = mk.CNNNeuronSigmoid(device)
    with pytest.raises(mk.ValidationError):
        kernel.encode_batch(cb, [_image(device), _image(device)], [_image(device)])
    with pytest.raises(mk.ValidationError, match="(?i)one image"):
        kernel.encode_batch(cb, [_image(device, n=2)], [_image(device, n=2)])


# ---- determinism: threads and ISAs ----------------------------------------------------------

BIG = (2, 37, 41, 67)


def big_inputs(rng, case):
    x = random_inputs(rng, case, BIG)
    flat = x.reshape(-1)
    positions = rng.choice(flat.size, 200, replace=False)
    flat[positions] = np.resize(SPECIALS, 200)        # special values here and there
    return ref.round_to_format(x, ref.FLOAT32)


def bits(image):
    out = image.to_numpy()
    return out.view(np.uint32 if out.dtype == np.float32 else np.uint16 if out.itemsize == 2 else np.uint8)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_threads_bitwise(case, isa, device, device1, run, make_image, rng):
    """1 thread and 2 threads give bitwise identical results (NaN payloads included) on an
    image big enough for both threads to take part."""
    x = big_inputs(rng, case)
    slopes = slopes_for(BIG[3])
    images = [run_neuron(run, dev, make_neuron(dev, case, slopes), make_image(dev, x))
              for dev in (device1, device)]
    assert np.array_equal(bits(images[0]), bits(images[1]))
    refs = references(case, x, slopes)                  # and right, not just reproducible
    check(images[1].to_numpy().astype(np.float64), x, refs, tolerance(case, x, refs[0]), case.id)


@pytest.mark.parametrize("fmt", STORAGE, ids=[f.name for f in STORAGE])
def test_threads_bitwise_storage(fmt, isa, device, device1, run, make_image, rng):
    case = Case("gelu", T.GELU, lo=-3, hi=3)
    x = storage_inputs(rng, case, fmt, BIG)
    outs = [bits(run_neuron(run, dev, make_neuron(dev, case), make_image(dev, x, fmt)))
            for dev in (device1, device)]
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_isa_agreement(case, select_isa, device, run, make_image, read_image, rng):
    """generic, avx2 and avx512 each meet the tolerance, so any two differ by at most twice
    it; exact types agree bitwise; NaN in the same places."""
    x = random_inputs(rng, case, (1, 13, 17, 33))
    x.reshape(-1)[:len(SPECIALS)] = SPECIALS
    x = ref.round_to_format(x, ref.FLOAT32)
    slopes = slopes_for(33)
    refs = references(case, x, slopes)
    tol = tolerance(case, x, refs[0])
    outs = {}
    for name in ("generic", "avx2", "avx512"):
        try:
            select_isa(name)
        except pytest.skip.Exception:
            continue
        outs[name] = neuron_on(run, device, make_image, read_image, case, x, slopes=slopes)
        check(outs[name], x, refs, tol, f"{case.id} on {name}")
    # where float32(a*x + b) overflows but a*x + b does not, a kernel evaluating t in double
    # and one evaluating it in float32 may both be right (references() accepts both)
    with np.errstate(all="ignore"):
        t = ref.f32(case.a) * x + ref.f32(case.b)
        t_overflows = (case.type in T_TYPES) & np.isfinite(t) & ~(np.abs(t) <= ref.FLT_MAX)
    for (na, a), (nb, b) in itertools.combinations(outs.items(), 2):
        with np.errstate(invalid="ignore"):
            same = ((a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= 2 * tol)
                    | t_overflows)
        assert same.all(), f"{case.id}: {na} and {nb} differ at x={x[~same][:5]}: {a[~same][:5]} vs {b[~same][:5]}"


# ---- bad values of the right kind of attribute ------------------------------------------------

@pytest.mark.parametrize("attrs", [
    dict(clip_rect=(-1, 0, 3, 3)),                   # negative clip origin
    dict(offset=(1, 2, 3, 4)),                       # four offset components
    dict(edge_mode=7),                               # not an ImageEdgeMode
], ids=["negative_clip_origin", "offset_4d", "edge_mode_7"])
def test_bad_attribute_raises_value_error(attrs, device):
    """Rejected when set or at encode: a ValueError, never a crash."""
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(ValueError):
        kernel = mk.CNNNeuronSigmoid(device)
        for key, value in attrs.items():
            setattr(kernel, key, value)
        kernel.encode(cb, _image(device), _image(device))


def test_non_integer_channel_offset_raises(device, run, make_image, read_image):
    x = np.arange(1, 61, dtype=np.float64).reshape(1, 3, 4, 5)
    kernel = mk.CNNNeuronLinear(device, 1.0, 0.0)
    kernel.source_feature_channel_offset = 1.5
    with pytest.raises(mk.ValidationError):
        run_neuron(run, device, kernel, make_image(device, x), _image(device))
