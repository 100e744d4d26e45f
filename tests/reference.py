"""Plain NumPy float64 references for the elementwise kernels (neurons, arithmetic) and for
the pointwise geometry (offset, clip_rect, edge mode, channel offsets, read strides).

Written from the MPS definitions only; nothing here imports mpskernels. Values are float64
arrays shaped (N, H, W, C); parameters a, b, c, scales, bias are rounded to float32 first
(the kernels receive float32 parameters), everything after that is float64.
"""
import math

import numpy as np

FLT_MIN = float(np.finfo(np.float32).tiny)      # 2**-126, the smallest normal float32
FLT_MAX = float(np.finfo(np.float32).max)

# CNNNeuronType values (Apple's)
NONE, RELU, LINEAR, SIGMOID, HARD_SIGMOID, TANH, ABSOLUTE, SOFT_PLUS, SOFT_SIGN, ELU, PRELU, \
    RELUN, POWER, EXPONENTIAL, LOGARITHM, GELU = range(16)

# ImageEdgeMode values
EDGE_ZERO, EDGE_CLAMP = 0, 1

# CNNArithmetic ops
ADD, SUB, MUL, DIV = range(4)


def f32(v):
    """A Python or NumPy value rounded to float32, returned as float64."""
    return np.float64(np.float32(v))


_erfc = np.frompyfunc(math.erfc, 1, 1)


def ieee_pow(base, exponent):
    """pow with IEEE 754 / C99 Annex F special cases. np.power follows them except for
    pow(-inf, y) with y > 0 not an odd integer, which is +inf (NumPy gives NaN)."""
    base, exponent = np.broadcast_arrays(np.asarray(base, np.float64), np.asarray(exponent, np.float64))
    with np.errstate(all="ignore"):
        r = np.power(base, exponent)
        odd = (np.floor(exponent) == exponent) & (np.abs(np.fmod(exponent, 2.0)) == 1.0)
        return np.where(np.isneginf(base) & (exponent > 0) & ~odd, np.inf, r)


def neuron(neuron_type, x, a=0.0, b=0.0, c=0.0, slopes=None, channels=None):
    """f(x) of one neuron type, in float64. x: (..., C); channels: the SOURCE feature channel
    of each entry of the last axis (PReLU's slope index), default 0..C-1."""
    x = np.asarray(x, dtype=np.float64)
    a, b, c = f32(a), f32(b), f32(c)
    with np.errstate(all="ignore"):
        if neuron_type == NONE:
            return x.copy()
        if neuron_type == RELU:
            return np.where(x >= 0, x, a * x)
        if neuron_type == LINEAR:
            return a * x + b
        if neuron_type == SIGMOID:
            e = np.exp(-np.abs(x))                       # never overflows
            return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if neuron_type == HARD_SIGMOID:
            return np.clip(a * x + b, 0.0, 1.0)          # NaN stays NaN
        if neuron_type == TANH:
            return a * np.tanh(b * x)
        if neuron_type == ABSOLUTE:
            return np.abs(x)
        if neuron_type == SOFT_PLUS:
            t = b * x                                    # log(1 + e^t), evaluated stably
            return a * (np.maximum(t, 0.0) + np.log1p(np.exp(-np.abs(t))))
        if neuron_type == SOFT_SIGN:
            return np.where(np.isinf(x), np.sign(x), x / (1.0 + np.abs(x)))
        if neuron_type == ELU:
            return np.where(x >= 0, x, a * np.expm1(x))
        if neuron_type == PRELU:
            s = np.asarray(slopes, dtype=np.float32).astype(np.float64).reshape(-1)
            if channels is None:
                channels = np.arange(x.shape[-1])
            slope = np.full(len(channels), s[0]) if s.size == 1 else s[np.asarray(channels)]
            return np.where(x >= 0, x, slope * x)
        if neuron_type == RELUN:
            return np.minimum(np.where(x >= 0, x, a * x), b)
        if neuron_type == POWER:
            return ieee_pow(a * x + b, c)
        if neuron_type == EXPONENTIAL:
            t = a * x + b
            return np.exp(t) if c == -1 else ieee_pow(c, t)
        if neuron_type == LOGARITHM:
            t = a * x + b
            return np.log(t) if c == -1 else np.log(t) / np.log(c)
        if neuron_type == GELU:
            # 0.5*x*(1 + erf(x/sqrt2)) == 0.5*x*erfc(-x/sqrt2), no cancellation for x << 0;
            # the limit at -inf is -0 (not -inf*0).
            r = 0.5 * x * _erfc(-x / math.sqrt(2.0)).astype(np.float64)
            return np.where(x == -np.inf, -0.0, r)
    raise ValueError(f"unknown neuron type {neuron_type}")


def arithmetic(op, x, y, primary_scale=1.0, secondary_scale=1.0, bias=0.0,
               minimum=-np.inf, maximum=np.inf):
    """clamp((ps*x) OP (ss*y) + bias, minimum, maximum) in float64, IEEE division (x/0 = ±inf,
    0/0 = NaN); a NaN stays NaN through the clamp."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    u, v = f32(primary_scale) * x, f32(secondary_scale) * y
    with np.errstate(all="ignore"):
        r = {ADD: np.add, SUB: np.subtract, MUL: np.multiply, DIV: np.divide}[op](u, v)
        r = r + f32(bias)
        return np.minimum(np.maximum(r, f32(minimum)), f32(maximum))


def flush_denormals(v):
    """FTZ/DAZ: values below FLT_MIN in magnitude become ±0."""
    v = np.asarray(v)
    return np.where(np.abs(v) < FLT_MIN, np.copysign(0.0, v), v).astype(v.dtype)


def arithmetic_f32_steps(op, x, y, primary_scale=1.0, secondary_scale=1.0, bias=0.0,
                         minimum=-np.inf, maximum=np.inf):
    """The same formula evaluated step by step in float32 with denormals flushed (FTZ/DAZ):
    u = ps*x, v = ss*y, u OP v, + bias, clamp, each step rounded, as a kernel without FMA
    computes it. Overflow to inf, and an intermediate flushed to 0, show as they do there
    (e.g. FLT_MAX * (0.75 * FLT_MIN): the second factor flushes to 0, so the product is 0)."""
    x = flush_denormals(np.asarray(x, np.float32))
    y = flush_denormals(np.asarray(y, np.float32))
    with np.errstate(all="ignore"):
        u = flush_denormals(np.float32(primary_scale) * x)
        v = flush_denormals(np.float32(secondary_scale) * y)
        r = {ADD: np.add, SUB: np.subtract, MUL: np.multiply, DIV: np.divide}[op](u, v)
        r = flush_denormals(flush_denormals(r) + np.float32(bias))
        r = np.minimum(np.maximum(r, np.float32(minimum)), np.float32(maximum))
    return r.astype(np.float64)


# ---- storage formats (ImageFeatureChannelFormat values) ---------------------------------------

UNORM8, UNORM16, FLOAT16, FLOAT32, BFLOAT16 = 1, 2, 3, 4, 5


def round_bf16(v):
    """float values rounded to bfloat16 (8 significant bits, nearest even), as float64."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(all="ignore"):
        m, e = np.frexp(v)                       # v = m * 2**e, 0.5 <= |m| < 1
        r = np.ldexp(np.rint(m * 256.0), e - 8)  # np.rint: round half to even
        r = np.where(np.isfinite(v), r, v)
        return np.float32(r).astype(np.float64)  # beyond bf16's range: inf, like float32


def round_to_format(v, fmt):
    """The float64 values v stored in format fmt and read back, as float64 (NaN → 0 for unorm)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore"):
        if fmt == FLOAT32:
            return v.astype(np.float32).astype(np.float64)
        if fmt == FLOAT16:
            return v.astype(np.float32).astype(np.float16).astype(np.float64)
        if fmt == BFLOAT16:
            return round_bf16(v.astype(np.float32))
    # unorm (mpskernels.h): clamp the float32 value to [0, 1] (NaN → 0), multiply by 255 or
    # 65535 in float32, round half to even
    scale = np.float32(255.0 if fmt == UNORM8 else 65535.0)
    with np.errstate(over="ignore"):
        clamped = np.clip(np.nan_to_num(v.astype(np.float32), nan=0.0), 0.0, 1.0).astype(np.float32)
    return np.rint(clamped * scale).astype(np.float64) / np.float64(scale)


def format_units(v, fmt):
    """Values representable in fmt mapped to integers whose difference counts units in the last
    place (adjacent representable values differ by 1; -0 and +0 are both 0). NaN → None-safe:
    returns float array with NaN where v is NaN."""
    v = np.asarray(v, dtype=np.float64)
    if fmt in (UNORM8, UNORM16):
        return np.rint(v * (255.0 if fmt == UNORM8 else 65535.0))
    if fmt == FLOAT16:
        with np.errstate(over="ignore"):
            bits = v.astype(np.float16).view(np.uint16).astype(np.int64)
        mag = bits & 0x7FFF
    elif fmt == BFLOAT16:
        bits = (v.astype(np.float32).view(np.uint32) >> 16).astype(np.int64)
        mag = bits & 0x7FFF
    else:
        bits = v.astype(np.float32).view(np.uint32).astype(np.int64)
        mag = bits & 0x7FFFFFFF
    sign_bit = 0x8000 if fmt in (FLOAT16, BFLOAT16) else 0x80000000
    units = np.where(bits & sign_bit, -mag, mag).astype(np.float64)
    return np.where(np.isnan(v), np.nan, units)


# ---- geometry ------------------------------------------------------------------------------

def clip_region(clip, dst_shape):
    """clip_rect ((x, y, z), (w, h, d)) intersected with a destination (N, H, W, C):
    (x0, y0, z0, width, height, depth); sizes <= 0 mean nothing is written."""
    (x, y, z), (w, h, d) = clip
    n, hh, ww, _ = dst_shape
    return x, y, z, min(x + w, ww) - x, min(y + h, hh) - y, min(z + d, n) - z


def gather(src, region, offset, stride_xy=(1, 1), edge=EDGE_ZERO, c0=0, channels=1,
           channel_stride=1):
    """The source values a pointwise kernel reads for a destination region: destination pixel
    (x0+i, y0+j) of destination image z0+k reads source pixel (ox + i*sx, oy + j*sy) of source
    image oz + k, channels c0 + m*channel_stride. Out of the image: 0 (ZERO) or the nearest
    edge pixel (CLAMP). Returns (depth, height, width, channels) float64."""
    x0, y0, z0, w, h, depth = region
    ox, oy, oz = offset
    sx, sy = stride_xy
    n, hh, ww, _ = src.shape
    out = np.zeros((depth, h, w, channels))
    for k in range(depth):
        for j in range(h):
            yy = oy + j * sy
            for i in range(w):
                xx = ox + i * sx
                inside = 0 <= yy < hh and 0 <= xx < ww
                if not inside and edge == EDGE_ZERO:
                    continue
                cy, cx = min(max(yy, 0), hh - 1), min(max(xx, 0), ww - 1)
                out[k, j, i, :] = src[oz + k, cy, cx, c0 + np.arange(channels) * channel_stride]
    return out


def unary_pointwise(f, src, dst, offset=(0, 0, 0), clip=((0, 0, 0), (1 << 62,) * 3),
                    edge=EDGE_ZERO, src_c0=0, src_max=2 ** 64 - 1, dst_c0=0):
    """What a unary pointwise kernel (a neuron) leaves in dst: a new float64 array. f(values,
    source_channels) computes the neuron; pixels outside the clip rect and channels outside
    [dst_c0, dst_c0 + channels) keep dst's values."""
    out = np.array(dst, dtype=np.float64)
    channels = min(src.shape[3] - src_c0, src_max)
    region = clip_region(clip, dst.shape)
    x0, y0, z0, w, h, depth = region
    if min(w, h, depth) <= 0:
        return out
    values = gather(src, region, offset, (1, 1), edge, src_c0, channels)
    out[z0:z0 + depth, y0:y0 + h, x0:x0 + w, dst_c0:dst_c0 + channels] = \
        f(values, np.arange(src_c0, src_c0 + channels))
    return out


def binary_pointwise(f, primary, secondary, dst, primary_offset=(0, 0, 0),
                     secondary_offset=(0, 0, 0), primary_stride=(1, 1), secondary_stride=(1, 1),
                     primary_edge=EDGE_ZERO, secondary_edge=EDGE_ZERO, primary_c0=0,
                     secondary_c0=0, primary_max=2 ** 64 - 1, primary_channel_stride=1,
                     secondary_channel_stride=1, dst_c0=0, clip=((0, 0, 0), (1 << 62,) * 3)):
    """What a binary pointwise kernel (arithmetic) leaves in dst (a new float64 array);
    f(primary_values, secondary_values). The channel count comes from the primary; a channel
    stride of 0 repeats the first channel, a pixel stride of 0 repeats one column / row."""
    out = np.array(dst, dtype=np.float64)
    channels = min(primary.shape[3] - primary_c0, primary_max)
    region = clip_region(clip, dst.shape)
    x0, y0, z0, w, h, depth = region
    if min(w, h, depth) <= 0:
        return out
    p = gather(primary, region, primary_offset, primary_stride, primary_edge, primary_c0,
               channels, primary_channel_stride)
    s = gather(secondary, region, secondary_offset, secondary_stride, secondary_edge,
               secondary_c0, channels, secondary_channel_stride)
    out[z0:z0 + depth, y0:y0 + h, x0:x0 + w, dst_c0:dst_c0 + channels] = f(p, s)
    return out


# ---- comparing float32 results --------------------------------------------------------------

# Kernels flush denormal results and intermediates to zero (FTZ/DAZ): a result within a few
# FLT_MIN of zero may come out as ±0. Tests allow this much absolute error everywhere.
FTZ_ATOL = 2.0 ** -120


def mismatches(got, refs, tol):
    """Where got (float32 results as float64) matches none of the references: a reference r
    is matched by NaN where r is NaN, by the exact value where float32(r) is infinite, and
    elsewhere by float32(r) or anything within tol of r."""
    bad = np.ones(got.shape, dtype=bool)
    with np.errstate(all="ignore"):
        for r in refs:
            r32 = round_to_format(r, FLOAT32)
            ok = np.where(np.isnan(r), np.isnan(got),
                          np.where(np.isinf(r32), got == r32,
                                   (got == r32) | (np.abs(got - r) <= tol)))
            bad &= ~ok
    return bad
