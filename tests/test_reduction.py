"""Reductions (NNReduce*) against plain float64 NumPy references written here: every kernel
on odd shapes and batches, clip rects and channel offsets, ties and NaN, storage formats,
weighted channel sums, image-returning encode, validation, 1 vs 2 threads and the ISAs."""
import itertools

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ImageFeatureChannelFormat as FMT

try:
    import reference as ref
except ImportError:  # tests/ made a package
    from . import reference as ref

U = 2.0 ** -24        # float32 unit roundoff
BIG = 1 << 40   # the largest region size geometry accepts
FC, ROW, COLUMN = "channels", "row", "column"

# (class, axis, op)
KERNELS = [
    (mk.NNReduceRowMin, ROW, "min"), (mk.NNReduceRowMax, ROW, "max"),
    (mk.NNReduceRowMean, ROW, "mean"), (mk.NNReduceRowSum, ROW, "sum"),
    (mk.NNReduceColumnMin, COLUMN, "min"), (mk.NNReduceColumnMax, COLUMN, "max"),
    (mk.NNReduceColumnMean, COLUMN, "mean"), (mk.NNReduceColumnSum, COLUMN, "sum"),
    (mk.NNReduceFeatureChannelsMin, FC, "min"), (mk.NNReduceFeatureChannelsMax, FC, "max"),
    (mk.NNReduceFeatureChannelsMean, FC, "mean"), (mk.NNReduceFeatureChannelsSum, FC, "sum"),
    (mk.NNReduceFeatureChannelsArgumentMin, FC, "argmin"),
    (mk.NNReduceFeatureChannelsArgumentMax, FC, "argmax"),
]
IDS = [k[0].__name__[len("NNReduce"):] for k in KERNELS]
AXIS = {FC: 3, ROW: 2, COLUMN: 1}
# the last two: columns over 3 equal spans of merged (x, c) elements; rows and columns over 2
# spans of channels
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 7, 3, 16), (3, 5, 4, 33), (1, 2, 9, 257), (1, 4, 37, 17),
          (1, 3, 131, 80), (2, 3, 2, 4103)]


# ---- the reference -------------------------------------------------------------------------

def reduce_reference(op, axis, x, weight=1.0):
    """The reduction of the float64 region x (N, H, W, C), keeping the reduced axis (size 1).
    NaN: min / max / sum / mean give NaN; argmin / argmax the first NaN (NumPy's rules)."""
    ax = AXIS[axis]
    with np.errstate(all="ignore"):
        if op == "sum":
            return x.sum(ax, keepdims=True) * ref.f32(weight)
        if op == "mean":
            return x.mean(ax, keepdims=True)
        if op == "min":
            return x.min(ax, keepdims=True)
        if op == "max":
            return x.max(ax, keepdims=True)
        f = np.argmin if op == "argmin" else np.argmax
        return f(x, axis=ax, keepdims=True).astype(np.float64)


def tolerance(op, axis, x, weight=1.0):
    """fp32 accumulation of L terms in any order errs by at most (L-1)*u*sum|x|; the result
    is then rounded (and divided for a mean, multiplied for a weight): (L+2)*u*sum|x|. Min,
    max and the indices are exact."""
    if op not in ("sum", "mean"):
        return np.zeros(reduce_reference("max", axis, x).shape)
    ax = AXIS[axis]
    terms = x.shape[ax]
    with np.errstate(all="ignore"):
        magnitude = np.abs(x).sum(ax, keepdims=True) * (abs(weight) if op == "sum" else 1.0)
        if op == "mean":
            magnitude = magnitude / terms
        return np.nan_to_num((terms + 2) * U * magnitude, nan=0.0, posinf=np.inf) + ref.FTZ_ATOL


def place(result, dst, clip=((0, 0, 0), (BIG, BIG, BIG)), dst_c0=0):
    """dst (a new float64 array) with the result written at the clip origin, cut to the clip
    size and the destination."""
    out = np.array(dst, dtype=np.float64)
    (x, y, z), (w, h, d) = clip
    n_, h_, w_ = (min(result.shape[0], d, out.shape[0] - z), min(result.shape[1], h, out.shape[1] - y),
                  min(result.shape[2], w, out.shape[2] - x))
    if min(n_, h_, w_) > 0:
        out[z:z + n_, y:y + h_, x:x + w_, dst_c0:dst_c0 + result.shape[3]] = result[:n_, :h_, :w_]
    return out


def region(x, clip_source=((0, 0, 0), (BIG, BIG, BIG)), c0=0, max_count=BIG):
    (sx, sy, sz), (sw, sh, sd) = clip_source
    return x[sz:sz + sd, sy:sy + sh, sx:sx + sw, c0:c0 + max_count]


def result_shape(axis, n, h, w, c):
    return {ROW: (n, h, 1, c), COLUMN: (n, 1, w, c), FC: (n, h, w, 1)}[axis]


def check(got, expected, tol, what):
    with np.errstate(invalid="ignore"):
        ok = (got == expected) | (np.isnan(got) & np.isnan(expected)) | (np.abs(got - expected) <= tol)
    if not ok.all():
        idx = [tuple(i) for i in np.argwhere(~ok)[:6]]
        lines = [f"at {i}: got={got[i]!r} expected={expected[i]!r} tol={np.broadcast_to(tol, got.shape)[i]!r}"
                 for i in idx]
        pytest.fail(f"{what}: {int((~ok).sum())} of {ok.size} wrong, e.g.\n" + "\n".join(lines))


def encode_run(run, device, kernel, src, dst, secondary=None):
    def encode(cb):
        if secondary is None:
            return kernel.encode(cb, src, dst)
        return kernel.encode(cb, src, secondary, dst)
    return run(device, encode)


def random_values(rng, shape, fmt=FMT.FLOAT32, ties=False):
    """Values representable in fmt; with ties, few distinct values (many equal channels)."""
    if ties:
        return rng.integers(-3, 4, shape).astype(np.float64) / 4 + (0.5 if fmt in (FMT.UNORM8, FMT.UNORM16) else 0)
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape) / 255.0
    if fmt == FMT.UNORM16:
        return rng.integers(0, 65536, shape) / 65535.0
    x = rng.uniform(-4, 4, shape)
    if fmt == FMT.FLOAT16:
        return x.astype(np.float16).astype(np.float64)
    if fmt == FMT.BFLOAT16:
        return ref.round_bf16(x)
    return x.astype(np.float32).astype(np.float64)


def run_kernel(run, device, make_image, read_image, cls, x, fmt=FMT.FLOAT32, dst_fmt=None,
               dst_shape=None, dst_fill=None, configure=None):
    kernel = cls(device)
    if configure:
        configure(kernel)
    src = make_image(device, x, fmt)
    if dst_shape is None:
        axis = next(a for c, a, _ in KERNELS if c is cls)
        dst_shape = result_shape(axis, *x.shape)
    dst_fmt = dst_fmt or (FMT.FLOAT32 if cls in ARG else fmt)
    d0 = np.zeros(dst_shape) if dst_fill is None else dst_fill
    dst = make_image(device, d0, dst_fmt)
    encode_run(run, device, kernel, src, dst)
    return read_image(dst), d0


ARG = (mk.NNReduceFeatureChannelsArgumentMin, mk.NNReduceFeatureChannelsArgumentMax)


# ---- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_float32(kernel, shape, isa, device, run, make_image, read_image, rng):
    cls, axis, op = kernel
    x = random_values(rng, shape)
    got, _ = run_kernel(run, device, make_image, read_image, cls, x)
    expected = ref.round_to_format(reduce_reference(op, axis, x), ref.FLOAT32)
    check(got, expected, tolerance(op, axis, x), f"{cls.__name__} {shape}")


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_ties_take_the_first_index(kernel, isa, device, run, make_image, read_image, rng):
    """Few distinct values: argmin / argmax return the lowest index among equal channels
    (np.argmin's rule); -0 and +0 are equal."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 5, 6, 45), ties=True)
    x[0, 0, 0, :] = 0.0
    x[0, 0, 0, 3] = -0.0
    got, _ = run_kernel(run, device, make_image, read_image, cls, x)
    check(got, reduce_reference(op, axis, x), tolerance(op, axis, x), cls.__name__)


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_nan_and_inf(kernel, isa, device, run, make_image, read_image, rng):
    """A NaN anywhere in a reduction gives NaN (min, max, sum, mean) or its first index
    (argmin, argmax); infinities reduce as IEEE says (inf - inf = NaN in a sum)."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 6, 7, 35))
    flat = x.reshape(-1)
    spots = rng.choice(flat.size, 60, replace=False)
    flat[spots] = np.resize([np.nan, np.inf, -np.inf, np.nan, 1e30, -1e30], 60)
    x[1, 2, 3, 20:] = np.nan       # NaN at the end of a pixel, and in its tail
    x[1, 3, :, :] = np.inf         # a whole row of +inf
    got, _ = run_kernel(run, device, make_image, read_image, cls, x)
    check(got, ref.round_to_format(reduce_reference(op, axis, x), ref.FLOAT32),
          tolerance(op, axis, x), cls.__name__)


@pytest.mark.parametrize("cls", ARG, ids=["ArgumentMin", "ArgumentMax"])
def test_argument_extremes_over_many_channels(cls, isa, device, run, make_image, read_image, rng):
    """Argmin / argmax keep 64 candidates (4 vectors of 16 channels): ties, NaNs and
    infinities spread over all of them, and pixels that are all one value."""
    x = random_values(rng, (1, 4, 5, 150), ties=True)
    special = x.reshape(-1, 150)
    special[0] = -np.inf
    special[1] = np.inf
    special[2] = np.nan
    special[3, [100, 130]] = np.nan               # the first NaN is in a later vector group
    special[4, [20, 70]] = 9.0                    # the first of two maxima in the second vector
    special[5, [20, 70]] = -9.0
    special[6, 149] = np.inf                      # in the last, partial vector
    special[7, 149] = -np.inf
    special[8, :] = 0.0
    special[8, 1::3] = -0.0
    got, _ = run_kernel(run, device, make_image, read_image, cls, x)
    op = "argmin" if cls is mk.NNReduceFeatureChannelsArgumentMin else "argmax"
    check(got, reduce_reference(op, FC, x), 0.0, cls.__name__)


def test_sum_weight(isa, device, run, make_image, read_image, rng):
    x = random_values(rng, (2, 3, 4, 21))
    for weight in (1.0, -0.375, 3.0):
        got, _ = run_kernel(run, device, make_image, read_image, mk.NNReduceFeatureChannelsSum, x,
                            configure=lambda k: setattr(k, "weight", weight))
        check(got, ref.round_to_format(reduce_reference("sum", FC, x, weight), ref.FLOAT32),
              tolerance("sum", FC, x, weight), f"weight {weight}")


STORAGE = [FMT.FLOAT16, FMT.BFLOAT16, FMT.UNORM8, FMT.UNORM16]
# relative size of half a unit in the last place of a result stored in the format
_HALF_ULP = {FMT.FLOAT32: U, FMT.FLOAT16: 2.0 ** -11, FMT.BFLOAT16: 2.0 ** -8}


@pytest.mark.parametrize("fmt", STORAGE, ids=[f.name for f in STORAGE])
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_storage_formats(kernel, fmt, isa, device, run, make_image, read_image, rng):
    """Sources decode exactly; results round once into the destination's format."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 5, 9, 19), fmt)
    got, _ = run_kernel(run, device, make_image, read_image, cls, x, fmt)
    r = reduce_reference(op, axis, x)
    dst_fmt = FMT.FLOAT32 if cls in ARG else fmt
    tol = tolerance(op, axis, x)
    if dst_fmt in _HALF_ULP:
        tol = tol * 2 + _HALF_ULP[dst_fmt] * 2 * np.abs(r)
    else:
        tol = tol * 255 + 0.5 / (255.0 if dst_fmt == FMT.UNORM8 else 65535.0)
    check(got, ref.round_to_format(r, int(dst_fmt)), tol, f"{cls.__name__} {fmt.name}")


def test_many_channels_in_a_narrow_format(device, run, make_image, read_image, rng):
    """More channels than one decoded block holds (the heap scratch path)."""
    x = random_values(rng, (1, 2, 3, 5000), FMT.FLOAT16)
    for cls, axis, op in [KERNELS[3], KERNELS[11], KERNELS[13], KERNELS[6]]:
        got, _ = run_kernel(run, device, make_image, read_image, cls, x, FMT.FLOAT16,
                            dst_fmt=FMT.FLOAT32)
        check(got, reduce_reference(op, axis, x), tolerance(op, axis, x), cls.__name__)


# ---- geometry ------------------------------------------------------------------------------

GEOMETRIES = [  # (source shape, clip_rect_source, destination shape (n, h, w) extra, clip_rect)
    ((1, 6, 7, 9), ((1, 2, 0), (4, 3, 1)), None, None),
    ((2, 6, 7, 9), ((0, 0, 1), (BIG, BIG, BIG)), None, None),
    ((3, 6, 7, 9), ((5, 4, 1), (10, 10, 5)), None, None),                 # cut by the source
    ((2, 5, 6, 9), None, (3, 8, 9), ((2, 1, 1), (BIG, BIG, BIG))),        # placed in a larger one
    ((2, 5, 6, 9), None, (2, 8, 9), ((1, 2, 0), (2, 2, 1))),              # cut by the clip rect
    ((2, 5, 6, 9), None, (1, 3, 3), ((1, 1, 0), (BIG, BIG, BIG))),        # cut by the destination
    ((1, 5, 6, 9), None, (1, 5, 6), ((7, 0, 0), (BIG, BIG, BIG))),        # nothing written
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_clip_rects(kernel, geometry, device, run, make_image, read_image, rng):
    cls, axis, op = kernel
    shape, clip_source, dst_nhw, clip = geometry
    x = random_values(rng, shape)
    r = reduce_reference(op, axis, region(x, clip_source) if clip_source else x)
    dst_shape = r.shape if dst_nhw is None else dst_nhw + (r.shape[3],)
    d0 = np.full(dst_shape, 0.25)

    def configure(k):
        if clip_source:
            k.clip_rect_source = clip_source
        if clip:
            k.clip_rect = clip
        k.offset = (3, 3, 0)             # ignored by reductions
    got, _ = run_kernel(run, device, make_image, read_image, cls, x, dst_shape=dst_shape,
                        dst_fill=d0, configure=configure)
    expected = place(ref.round_to_format(r, ref.FLOAT32), d0, clip or ((0, 0, 0), (BIG,) * 3))
    tol = place(tolerance(op, axis, region(x, clip_source) if clip_source else x), np.zeros(dst_shape),
                clip or ((0, 0, 0), (BIG,) * 3))
    check(got, expected, tol, f"{cls.__name__} {geometry}")


@pytest.mark.parametrize("c0,max_count,dst_c0", [(0, 5, 0), (3, BIG, 2), (7, 4, 1), (10, BIG, 0)])
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_channel_offsets(kernel, c0, max_count, dst_c0, device, run, make_image, read_image, rng):
    """Reduce channels [c0, c0 + count); argmin / argmax count from c0; results go to
    destination channels from destination_feature_channel_offset."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 4, 5, 21))
    part = x[..., c0:c0 + max_count]
    r = reduce_reference(op, axis, part)
    dst_shape = r.shape[:3] + (dst_c0 + r.shape[3] + 1,)
    d0 = np.full(dst_shape, -0.5)

    def configure(k):
        k.source_feature_channel_offset = c0
        k.source_feature_channel_max_count = max_count if max_count != BIG else 2 ** 64 - 1
        k.destination_feature_channel_offset = dst_c0
    got, _ = run_kernel(run, device, make_image, read_image, cls, x, dst_shape=dst_shape,
                        dst_fill=d0, configure=configure)
    expected = place(ref.round_to_format(r, ref.FLOAT32), d0, dst_c0=dst_c0)
    tol = place(tolerance(op, axis, part), np.zeros(dst_shape), dst_c0=dst_c0)
    check(got, expected, tol, cls.__name__)


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_image_returning_encode(kernel, device, run, make_image, rng):
    """encode(cb, source) makes MPS's shape: width 1 (rows), height 1 (columns), one channel
    (across channels); the source's format (FLOAT32 for indices); offset untouched."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 5, 6, 7), FMT.FLOAT16)
    k = cls(device)
    k.clip_rect_source = ((1, 1, 1), (4, 3, 1))
    k.destination_feature_channel_offset = 2
    k.destination_image_allocator = mk.Image.default_allocator()
    out = run(device, lambda cb: k.encode(cb, make_image(device, x, FMT.FLOAT16)))
    n, h, w, c = result_shape(axis, 1, 3, 4, 7)
    assert (out.number_of_images, out.height, out.width, out.feature_channels) == (n, h, w, c + 2)
    assert out.feature_channel_format == (FMT.FLOAT32 if cls in ARG else FMT.FLOAT16)
    assert tuple(k.offset) == (0, 0, 0)
    got = out.to_numpy().astype(np.float64)[..., 2:]
    r = reduce_reference(op, axis, x[1:2, 1:4, 1:5])
    check(got, ref.round_to_format(r, ref.FLOAT32 if cls in ARG else ref.FLOAT16),
          2 * tolerance(op, axis, x[1:2, 1:4, 1:5]) + 2.0 ** -10 * np.abs(r), cls.__name__)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k[1] == FC], ids=[i for k, i in zip(KERNELS, IDS) if k[1] == FC])
def test_one_channel_results_leave_the_rest(kernel, device, run, rng):
    """Into a one-channel destination (dense: one float a pixel) a clip rect leaves the pixels
    outside it alone, neighbours in storage included; a destination with more channels keeps
    the others."""
    cls, axis, op = kernel
    shape = (2, 66, 257, 20)
    x = random_values(rng, shape)
    src = mk.Image.from_numpy(device, x.astype(np.float32))
    k = cls(device)
    k.clip_rect = ((3, 1, 0), (254, 65, 2))
    dst = mk.Image.from_numpy(device, np.full(shape[:3] + (1,), 7.0, np.float32))
    assert dst.pixel_size == 4
    run(device, lambda cb: k.encode(cb, src, dst))
    expected = np.full(shape[:3] + (1,), 7.0)
    r = ref.round_to_format(reduce_reference(op, axis, x), ref.FLOAT32)
    expected[:, 1:66, 3:257] = r[:, :65, :254]
    check(dst.to_numpy().astype(np.float64), expected,
          place(tolerance(op, axis, x), np.zeros(expected.shape), k.clip_rect), cls.__name__)
    wide = mk.Image.from_numpy(device, np.full(shape[:3] + (3,), 7.0, np.float32))
    k.clip_rect = mk.RECT_NO_CLIP
    run(device, lambda cb: k.encode(cb, src, wide))
    got = wide.to_numpy()
    assert (got[..., 1:] == 7.0).all()
    check(got[..., :1].astype(np.float64), r, tolerance(op, axis, x), cls.__name__)


def test_temporary_source_and_destination(device, run, make_image, read_image, rng):
    """Reductions read and write temporaries in the arena like any kernel."""
    x = random_values(rng, (1, 6, 5, 20))
    dst = make_image(device, np.zeros((1, 1, 1, 1)))

    def encode(cb):
        t = mk.CNNNeuronAbsolute(device).encode(cb, make_image(device, x))
        rows = mk.NNReduceRowMax(device).encode(cb, t)           # (1, 6, 1, 20), temporary
        cols = mk.NNReduceColumnSum(device).encode(cb, rows)     # (1, 1, 1, 20)
        mk.NNReduceFeatureChannelsMean(device).encode(cb, cols, dst)
    run(device, encode)
    expected = np.abs(x).max(axis=2).sum(axis=1).mean()
    assert abs(read_image(dst)[0, 0, 0, 0] - expected) <= 40 * U * expected


# ---- weighted channel sums (NNReduceBinary) ---------------------------------------------------

def weighted_reference(x, w, mean, by_count):
    with np.errstate(all="ignore"):
        s = (x * w).sum(-1, keepdims=True)
        if mean:
            return s / x.shape[-1]
        if by_count:
            return s / np.broadcast_to(w != 0, np.broadcast(x, w).shape).sum(-1, keepdims=True)
        return s


@pytest.mark.parametrize("kind", ["mean", "sum", "sum_by_count"])
@pytest.mark.parametrize("weights", ["vector", "per_pixel", "per_pixel_one_image"])
def test_weighted(kind, weights, isa, device, run, make_image, read_image, rng):
    x = random_values(rng, (2, 5, 6, 37))
    shape = {"vector": (1, 1, 1, 37), "per_pixel": (2, 5, 6, 37), "per_pixel_one_image": (1, 5, 6, 37)}[weights]
    w = random_values(rng, shape)
    w[rng.random(shape) < 0.3] = 0.0
    if kind == "mean":
        k = mk.NNReduceFeatureChannelsAndWeightsMean(device)
    else:
        k = mk.NNReduceFeatureChannelsAndWeightsSum(device, kind == "sum_by_count")
        assert k.do_weighted_sum_by_non_zero_weights == (kind == "sum_by_count")
    dst = make_image(device, np.zeros((2, 5, 6, 1)))
    encode_run(run, device, k, make_image(device, x), dst, make_image(device, w))
    expected = weighted_reference(x, w, kind == "mean", kind == "sum_by_count")
    tol = tolerance("sum", FC, np.broadcast_to(x * w, x.shape)) * 2
    if kind == "sum_by_count":
        tol = tol / np.maximum((np.broadcast_to(w, x.shape) != 0).sum(-1, keepdims=True), 1)
    check(read_image(dst), ref.round_to_format(expected, ref.FLOAT32), tol, f"{kind} {weights}")


def test_weighted_clip_rects_and_offsets(device, run, make_image, read_image, rng):
    x = random_values(rng, (1, 6, 7, 12))
    w = random_values(rng, (1, 4, 4, 20), FMT.FLOAT16)
    k = mk.NNReduceFeatureChannelsAndWeightsSum(device)
    k.primary_source_clip_rect = ((2, 1, 0), (3, 2, 1))
    k.secondary_source_clip_rect = ((1, 2, 0), (3, 2, 1))
    k.primary_source_feature_channel_offset = 4
    k.secondary_source_feature_channel_offset = 9
    k.destination_feature_channel_offset = 1
    d0 = np.full((1, 2, 3, 2), 0.5)
    dst = make_image(device, d0)
    encode_run(run, device, k, make_image(device, x), dst, make_image(device, w, FMT.FLOAT16))
    xs, ws = x[:, 1:3, 2:5, 4:12], w[:, 2:4, 1:4, 9:17]
    expected = d0.copy()
    expected[..., 1:2] = weighted_reference(xs, ws, False, False)
    check(read_image(dst), ref.round_to_format(expected, ref.FLOAT32),
          np.pad(tolerance("sum", FC, xs * ws), ((0, 0), (0, 0), (0, 0), (1, 0))), "clip rects")


def test_weighted_all_zero_weights_by_count_is_nan(device, run, make_image, read_image):
    k = mk.NNReduceFeatureChannelsAndWeightsSum(device, do_weighted_sum_by_non_zero_weights=True)
    dst = make_image(device, np.zeros((1, 1, 2, 1)))
    encode_run(run, device, k, make_image(device, np.ones((1, 1, 2, 5))), dst,
               make_image(device, np.zeros((1, 1, 1, 5))))
    assert np.isnan(read_image(dst)).all()


# ---- validation ----------------------------------------------------------------------------

def _img(device, n=1, h=3, w=4, c=5, fmt=FMT.FLOAT32):
    return mk.Image(device, mk.ImageDescriptor(fmt, w, h, c, n))


BAD = [  # (id, kernel, source shape, destination shape, settings, destination format, message)
    ("clip_source_outside", mk.NNReduceRowSum, (1, 3, 4, 5), (1, 3, 1, 5),
     dict(clip_rect_source=((4, 0, 0), (2, 2, 1))), FMT.FLOAT32, r"clip_rect_source.*does not meet"),
    ("clip_source_empty", mk.NNReduceRowSum, (1, 3, 4, 5), (1, 3, 1, 5),
     dict(clip_rect_source=((0, 0, 0), (0, 2, 1))), FMT.FLOAT32, r"clip_rect_source"),
    ("clip_source_image_beyond", mk.NNReduceColumnMax, (1, 3, 4, 5), (1, 1, 4, 5),
     dict(clip_rect_source=((0, 0, 1), (4, 3, 1))), FMT.FLOAT32, r"images"),
    ("too_few_dst_channels", mk.NNReduceRowSum, (1, 3, 4, 5), (1, 3, 1, 4), {}, FMT.FLOAT32, r"channel"),
    ("dst_channel_offset", mk.NNReduceFeatureChannelsSum, (1, 3, 4, 5), (1, 3, 4, 1),
     dict(destination_feature_channel_offset=1), FMT.FLOAT32, r"channel"),
    ("src_channel_offset", mk.NNReduceFeatureChannelsMax, (1, 3, 4, 5), (1, 3, 4, 1),
     dict(source_feature_channel_offset=5), FMT.FLOAT32, r"channel offset"),
    ("argmax_into_unorm8", mk.NNReduceFeatureChannelsArgumentMax, (1, 3, 4, 5), (1, 3, 4, 1), {},
     FMT.UNORM8, r"cannot hold.*FLOAT32"),
    ("argmin_into_bf16_too_many", mk.NNReduceFeatureChannelsArgumentMin, (1, 1, 2, 300), (1, 1, 2, 1),
     {}, FMT.BFLOAT16, r"indices 0..299"),
    ("weight_nan", mk.NNReduceFeatureChannelsSum, (1, 3, 4, 5), (1, 3, 4, 1),
     dict(weight=float("nan")), FMT.FLOAT32, r"weight"),
    ("weight_text", mk.NNReduceFeatureChannelsSum, (1, 3, 4, 5), (1, 3, 4, 1),
     dict(weight="heavy"), FMT.FLOAT32, r"weight"),
    ("abstract", mk.NNReduceUnary, (1, 3, 4, 5), (1, 3, 4, 1), {}, FMT.FLOAT32, r"abstract"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_encode_raises(bad, device):
    """A ValidationError (a ValueError) naming the problem, at encode; the buffer still runs."""
    _, cls, src_shape, dst_shape, settings, dst_fmt, message = bad
    kernel = cls(device)
    for key, value in settings.items():
        setattr(kernel, key, value)
    src, dst = _img(device, *src_shape), _img(device, *dst_shape, fmt=dst_fmt)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match=f"(?i){message}") as info:
        kernel.encode(cb, src, dst)
    assert isinstance(info.value, ValueError)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None


BAD_WEIGHTS = [  # (id, primary shape, weights shape, settings, message)
    ("too_few_weight_channels", (1, 3, 4, 5), (1, 1, 1, 4), {}, r"offer 4 channels.*5 primary"),
    ("weights_region_too_small", (1, 3, 4, 5), (1, 2, 4, 5), {}, r"must be 1x1.*cover the 4x3"),
    ("weights_images", (3, 3, 4, 5), (2, 3, 4, 5), {}, r"2 images.*1 or at least the 3"),
    ("weights_clip_outside", (1, 3, 4, 5), (1, 3, 4, 5),
     dict(secondary_source_clip_rect=((9, 9, 0), (1, 1, 1))), r"secondary_source_clip_rect"),
]


@pytest.mark.parametrize("bad", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_bad_weights_raise(bad, device):
    _, p_shape, w_shape, settings, message = bad
    kernel = mk.NNReduceFeatureChannelsAndWeightsSum(device)
    for key, value in settings.items():
        setattr(kernel, key, value)
    dst = _img(device, p_shape[0], p_shape[1], p_shape[2], 1)
    cb = device.make_command_queue().make_command_buffer()
    with pytest.raises(mk.ValidationError, match=f"(?i){message}"):
        kernel.encode(cb, _img(device, *p_shape), _img(device, *w_shape), dst)


def test_destination_aliasing_source_raises(device):
    image = _img(device, c=1)
    with pytest.raises(mk.ValidationError, match="(?i)alias|share"):
        mk.NNReduceFeatureChannelsSum(device).encode(
            device.make_command_queue().make_command_buffer(), image, image)


# ---- determinism: threads and ISAs --------------------------------------------------------------

DET_SHAPES = [(2, 37, 41, 67), (1, 9, 131, 64)]   # many chunks for every axis; columns in 3 spans


@pytest.mark.parametrize("change", [None, "clip_rect_source", "clip_rect", "weight",
                                    "source_feature_channel_offset"])
def test_encoding_again_on_the_same_images(change, device, run, make_image, read_image, rng):
    """A second encode on the same persistent images replays the recorded command
    (kernel.py _replay) unless an attribute changed: either way the result is right."""
    x = random_values(rng, (1, 5, 6, 20))
    kernel = mk.NNReduceFeatureChannelsSum(device)
    src, dst = make_image(device, x, FMT.FLOAT32), make_image(device, np.zeros((1, 5, 6, 1)), FMT.FLOAT32)
    encode_run(run, device, kernel, src, dst)
    recorded = kernel._recorded[1]
    src.write_bytes(np.ascontiguousarray(-x, dtype=np.float32))   # same storage, new values
    clip, c0, weight = ((0, 0, 0), (BIG, BIG, BIG)), 0, 1.0
    if change == "clip_rect_source":
        kernel.clip_rect_source = clip = ((1, 2, 0), (3, 2, 1))
    elif change == "clip_rect":
        kernel.clip_rect = ((2, 1, 0), (2, 3, 1))
    elif change == "weight":
        kernel.weight = weight = 0.5
    elif change == "source_feature_channel_offset":
        kernel.source_feature_channel_offset = c0 = 3
    encode_run(run, device, kernel, src, dst)
    assert (kernel._recorded[1] is recorded) == (change is None)
    result = reduce_reference("sum", FC, region(-x, clip, c0), weight)
    want = reduce_reference("sum", FC, x)   # the first result stays where nothing is written
    if change == "clip_rect":
        want[:, 1:4, 2:4] = result[:, :3, :2]
    else:
        want[:, :result.shape[1], :result.shape[2]] = result
    check(read_image(dst), want, tolerance("sum", FC, x).max(), f"after changing {change}")


def bits(image):
    out = image.to_numpy()
    return out.view(np.uint32 if out.dtype == np.float32 else np.uint16)


@pytest.mark.parametrize("shape", DET_SHAPES, ids=["x".join(map(str, s)) for s in DET_SHAPES])
@pytest.mark.parametrize("fmt", [FMT.FLOAT32, FMT.FLOAT16])
@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_threads_bitwise(kernel, fmt, shape, isa, device, device1, run, make_image, rng):
    """1 thread and 2 threads give bitwise identical results."""
    cls, axis, op = kernel
    x = random_values(rng, shape, fmt)
    x.reshape(-1)[rng.choice(x.size, 30, replace=False)] = np.nan
    dst_fmt = FMT.FLOAT32 if cls in ARG else fmt
    outs = []
    for dev in (device1, device):
        dst = make_image(dev, np.zeros(result_shape(axis, *shape)), dst_fmt)
        encode_run(run, dev, cls(dev), make_image(dev, x, fmt), dst)
        outs.append(bits(dst))
    assert np.array_equal(outs[0], outs[1])


def test_threads_bitwise_weighted(isa, device, device1, run, make_image, rng):
    shape = DET_SHAPES[0]
    x, w = random_values(rng, shape), random_values(rng, shape)
    outs = []
    for dev in (device1, device):
        dst = make_image(dev, np.zeros(shape[:3] + (1,)))
        encode_run(run, dev, mk.NNReduceFeatureChannelsAndWeightsSum(dev, True),
                   make_image(dev, x), dst, make_image(dev, w))
        outs.append(bits(dst))
    assert np.array_equal(outs[0], outs[1])


def each_isa(select_isa):
    """Switches to each ISA this CPU has, in turn, yielding its name."""
    for name in ("generic", "avx2", "avx512"):
        try:
            select_isa(name)
        except pytest.skip.Exception:
            continue
        yield name


def assert_identical(outs, op, what):
    """All results in outs (a dict) bitwise equal; for min and max up to the sign of a zero."""
    for (na, a), (nb, b) in itertools.combinations(outs.items(), 2):
        assert np.array_equal(a, b, equal_nan=True), f"{what}: {na} and {nb} differ"
        if op not in ("min", "max"):
            assert np.array_equal(np.signbit(a), np.signbit(b)), f"{what}: {na} and {nb} zero signs"


@pytest.mark.parametrize("kernel", KERNELS, ids=IDS)
def test_isa_agreement(kernel, select_isa, device, run, make_image, read_image, rng):
    """The accumulation order is the same in every ISA: sums, means and indices are bitwise
    identical; min and max too, up to the sign of a zero."""
    cls, axis, op = kernel
    x = random_values(rng, (2, 9, 11, 53))
    x.reshape(-1)[rng.choice(x.size, 20, replace=False)] = np.nan
    outs = {name: run_kernel(run, device, make_image, read_image, cls, x)[0]
            for name in each_isa(select_isa)}
    assert_identical(outs, op, cls.__name__)


# ---- the documented accumulation order (docs/reduction.md) ------------------------------

ORDER_CHANNELS = [1, 5, 16, 17, 33, 63, 65, 200, 4097]


def channel_sum_in_order(terms):
    """Sums over the last axis of float32 terms in the documented order, in float32: 64 lanes,
    lane k holding terms k, k+64, ... in increasing order (padding: -0), then the tree lane k
    with k+32, k+16, k+8, k+4, k+2, k+1."""
    c = terms.shape[-1]
    lanes = np.full(terms.shape[:-1] + (-(-c // 64) * 64,), -0.0, np.float32)
    lanes[..., :c] = terms
    lanes = lanes.reshape(terms.shape[:-1] + (-1, 64))
    acc = lanes[..., 0, :]
    for g in range(1, lanes.shape[-2]):
        acc = acc + lanes[..., g, :]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc


@pytest.mark.parametrize("channels", ORDER_CHANNELS)
def test_channel_sum_order(channels, isa, device, run, make_image, read_image, rng):
    """Sums and weighted sums across channels follow the documented order bit for bit, in
    every ISA (values of mixed magnitudes, so another order would round differently)."""
    shape = (1, 3, 5, channels)
    x = (rng.uniform(-1, 1, shape) * 2.0 ** rng.integers(-12, 12, shape)).astype(np.float32)
    w = rng.uniform(-2, 2, shape).astype(np.float32)
    got, _ = run_kernel(run, device, make_image, read_image, mk.NNReduceFeatureChannelsSum, x)
    assert np.array_equal(got.astype(np.float32), channel_sum_in_order(x)), "sum"
    dst = make_image(device, np.zeros(shape[:3] + (1,)))
    encode_run(run, device, mk.NNReduceFeatureChannelsAndWeightsSum(device), make_image(device, x),
               dst, make_image(device, w))
    assert np.array_equal(read_image(dst).astype(np.float32), channel_sum_in_order(x * w)), "weighted"


FC_KERNELS = [k for k in KERNELS if k[1] == FC]
FC_IDS = [i for i, k in zip(IDS, KERNELS) if k[1] == FC]


@pytest.mark.parametrize("channels", ORDER_CHANNELS)
@pytest.mark.parametrize("kernel", FC_KERNELS, ids=FC_IDS)
def test_channel_counts_bitwise(kernel, channels, select_isa, device, device1, run, make_image, rng):
    """Every ISA and 1 or 2 threads give bitwise identical results (min and max up to the sign
    of a zero between ISAs) for channel counts below, at and past the 4 chains of 16 lanes;
    at least 3 chunks of pixels."""
    cls, axis, op = kernel
    shape = (1, -(-3 * 65536 // channels // 64), 64, channels)
    x = random_values(rng, shape, ties=op not in ("sum", "mean"))   # sums of ties: exact
    x.reshape(-1)[rng.choice(x.size, 5, replace=False)] = np.nan
    outs = {}
    for name in each_isa(select_isa):
        for dev in (device1, device):
            dst = make_image(dev, np.zeros(shape[:3] + (1,)))
            encode_run(run, dev, cls(dev), make_image(dev, x), dst)
            outs[name, dev.num_threads] = dst.to_numpy()
    assert_identical(outs, op, cls.__name__)
