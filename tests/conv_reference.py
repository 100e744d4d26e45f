"""Plain float64 NumPy references for the convolution family (the oracle of
tests/test_convolution.py), written from MPS_REFERENCE.md §4.5, §5.3, §5.8 and the ONNX
ConvTranspose definition; nothing here is shared with the library."""
import numpy as np

EDGE_ZERO, EDGE_CLAMP = 0, 1


def _taps(first, count, stride, k, dilation, size, edge, up=1):
    """Source index of every (output, tap) along one axis: output i, tap p reads
    first + i*stride + p*dilation of a source up-sampled by `up` (zeros between samples).
    Returns (index into the real source, valid mask)."""
    u = first + np.arange(count)[:, None] * stride + np.arange(k)[None, :] * dilation
    last = (size - 1) * up
    if edge == EDGE_CLAMP:
        u = np.clip(u, 0, last)
    valid = (u >= 0) & (u <= last) & (u % up == 0)
    return np.where(valid, u // up, 0), valid


def correlate(src, weights, bias, groups, first, count, stride, dilation, edge, up=(1, 1)):
    """out[n, j, i, o] = bias[o] + sum over taps (q, p) and the group's channels c of
    weights[o, q, p, c] * src[n, y(j, q), x(i, p), g*cin_g + c]   (float64).
    src (N, H, W, C); weights (O, kh, kw, C/groups); first = (x, y) source coordinate of
    output (0, 0)'s first tap; count = (w, h) outputs; up: zero-stuffing of the source."""
    src = np.asarray(src, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n, hh, ww, cin = src.shape
    o, kh, kw, cin_g = w.shape
    assert cin == cin_g * groups and o % groups == 0
    xs, xv = _taps(first[0], count[0], stride[0], kw, dilation[0], ww, edge, up[0])
    ys, yv = _taps(first[1], count[1], stride[1], kh, dilation[1], hh, edge, up[1])
    # patches[n, j, i, q, p, c]
    patches = src[:, ys[:, None, :, None], xs[None, :, None, :], :]
    mask = (yv[:, None, :, None] & xv[None, :, None, :])[None, ..., None]
    patches = np.where(mask, patches, 0.0)
    cout_g = o // groups
    out = np.empty((n, count[1], count[0], o))
    for g in range(groups):
        pg = patches[..., g * cin_g:(g + 1) * cin_g]
        wg = w[g * cout_g:(g + 1) * cout_g]
        out[..., g * cout_g:(g + 1) * cout_g] = np.einsum("njiqpc,oqpc->njio", pg, wg)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)
    return out


def convolution(src, weights, bias, groups=1, offset=(0, 0), count=None, stride=(1, 1),
                dilation=(1, 1), edge=EDGE_ZERO):
    """MPS forward convolution, §4.5: output i's window centre is offset.x + i*stride, its
    first tap at centre - (((kw-1)*dilation + 1) >> 1)."""
    kh, kw = np.shape(weights)[1:3]
    first = tuple(offset[a] - ((((kw, kh)[a] - 1) * dilation[a] + 1) >> 1) for a in (0, 1))
    return correlate(src, weights, bias, groups, first, count, stride, dilation, edge)


def depthwise_weights(weights, multiplier):
    """Depthwise [out][kh][kw] weights as grouped [out][kh][kw][1] (groups = in channels)."""
    return np.asarray(weights)[..., None]


def depth_to_space(x, r):
    """Sub-pixel: Dest[y][x][c] = I[y/r][x/r][(N/r^2)*(r*(y%r) + x%r) + c]."""
    n, h, w, c = x.shape
    m = c // (r * r)
    return x.reshape(n, h, w, r, r, m).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, m)


def onnx_conv_transpose(x, w, b, strides, pads, dilations=(1, 1), group=1):
    """ONNX ConvTranspose, NCHW, straight from its definition: every input pixel scatters
    x[n, ci, iy, ix] * W[ci, co, ky, kx] to output (iy*s - pad_top + ky*d, ix*s - pad_left + kx*d).
    x (N, Ci, H, W); w (Ci, Co/group, kh, kw); pads (top, left, bottom, right)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, ci, h, wd = x.shape
    _, co_g, kh, kw = w.shape
    sy, sx = strides
    dy, dx = dilations
    oh = sy * (h - 1) + (kh - 1) * dy + 1 - pads[0] - pads[2]
    ow = sx * (wd - 1) + (kw - 1) * dx + 1 - pads[1] - pads[3]
    ci_g = ci // group
    y = np.zeros((n, co_g * group, oh, ow))
    for g in range(group):
        for iy in range(h):
            for ix in range(wd):
                for ky in range(kh):
                    oy = iy * sy - pads[0] + ky * dy
                    if not 0 <= oy < oh:
                        continue
                    for kx in range(kw):
                        ox = ix * sx - pads[1] + kx * dx
                        if 0 <= ox < ow:
                            y[:, g * co_g:(g + 1) * co_g, oy, ox] += np.einsum(
                                "nc,co->no", x[:, g * ci_g:(g + 1) * ci_g, iy, ix],
                                w[g * ci_g:(g + 1) * ci_g, :, ky, kx])
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y
