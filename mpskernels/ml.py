"""Metal 4 machine-learning passes on the CPU (MPS_REFERENCE.md §9): the network IR a pipeline
runs, libraries, pipelines, argument tables, the compute and machine-learning encoders, the
barriers and fences that order passes, and the validation layer that reports hazards.

Tensor operations (compute encoder `encode`, and every IR node) run the existing kernels on
tensors: neurons and arithmetic through src/elementwise, convolution through src/conv (NHWC
tensors). Passes run in encoding order, one after another (a valid schedule of what Metal
allows); the validation layer checks the program would also be right if passes that no
barrier orders ran at the same time. The design is in docs/ml.md."""
import itertools
import math
import threading
import weakref

import numpy as np

from mpskernels import _native
from mpskernels.arithmetic import CNNArithmetic
from mpskernels.convolution import (CNNConvolution, CNNConvolutionDescriptor, CNNConvolutionTranspose,
                                    _ArraySource, _ConvolutionBase)
from mpskernels.enums import (BindingAccess, CNNNeuronType, Stages, TensorDataType, TensorUsage,
                              VisibilityOptions)
from mpskernels.errors import CommandBufferStateError, HazardError, ValidationError
from mpskernels.geometry import LIMIT, Offset
from mpskernels.heap import Heap, resource_by_id
from mpskernels.matrix import _clamp_of
from mpskernels.neuron import CNNNeuron, NNNeuronDescriptor
from mpskernels.tensor import _TYPES, Tensor, TensorExtents, data_type_of, element_size

# ==== operands: a tensor, or a slot of the intermediates heap, as the kernels see it ==========


class _Operand:
    """A strided float array at a fixed address: what a tensor op reads or writes. numpy order
    shape and element strides; `_root`/`_is_temporary`/`_format` make it a CommandBuffer._add
    operand like an image."""
    __slots__ = ("address", "shape", "strides", "_format", "esize", "name", "nbytes")
    _is_temporary = False

    def __init__(self, address, shape, strides, data_type, name):
        self.address = address
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.esize = element_size(data_type)
        self._format = _kernel_format(data_type, name)
        self.name = name
        self.nbytes = (sum((d - 1) * s for d, s in zip(self.shape, self.strides)) + 1) * self.esize

    @property
    def _root(self):
        return self

    def _address(self):
        return self.address

    def span(self):
        return self.address, self.address + self.nbytes


def _kernel_format(data_type, name):
    fmt = _TYPES[TensorDataType(data_type)][1]
    if fmt is None:
        raise ValidationError(f"{name} is {TensorDataType(data_type).name}: tensor operations "
                              f"take FLOAT32, FLOAT16 or BFLOAT16 tensors")
    return fmt


def _tensor_operand(tensor, name=None):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a Tensor, got {type(tensor).__name__}")
    return _Operand(tensor._address(), tensor.shape, tensor._elements[::-1], tensor.data_type,
                    name or (f"tensor {tensor.label!r}" if tensor.label else repr(tensor)))


def _packed(shape):
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


# ==== tensor operations: record existing kernels' commands over operands ======================

def _loops(shape, operand_strides, keep_inner=False):
    """Merge dimensions contiguous in every operand and split the rest into an outer loop and
    a 4-D kernel extent. Returns (outer shape, per-operand outer strides, extent (n, h, w, c),
    per-operand 4 strides). keep_inner: never merge the innermost dimension (PReLU's channels)."""
    dims = [(d, [s[i] for s in operand_strides]) for i, d in enumerate(shape) if d != 1]
    merged = []
    for d, st in reversed(dims):          # innermost first
        if merged and not (keep_inner and len(merged) == 1 and merged[0][2]):
            inner_d, inner_st, _ = merged[-1]
            if all(o == i * inner_d for o, i in zip(st, inner_st)):
                merged[-1] = (inner_d * d, inner_st, merged[-1][2])
                continue
        merged.append((d, st, not merged))
    if keep_inner and (not shape or shape[-1] == 1):
        merged.insert(0, (1, [0] * len(operand_strides), True))
    merged = [(d, st) for d, st, _ in merged][::-1]   # outermost first
    while len(merged) < 4:
        merged.insert(0, (1, [0] * len(operand_strides)))
    outer, inner = merged[:-4], merged[-4:]
    extent = tuple(d for d, _ in inner)
    return ([d for d, _ in outer], [[st[k] for _, st in outer] for k in range(len(operand_strides))],
            extent, [tuple(st[k] for _, st in inner) for k in range(len(operand_strides))])


def _record_elementwise(cb, make, operands, shape, strides, description, keep_inner=False):
    """One command per outer index (usually one): make(extent) builds it."""
    outer, outer_strides, extent, inner = _loops(shape, strides, keep_inner)
    for index in itertools.product(*[range(d) for d in outer]):
        cb._add(make(extent), [
            (op, sum(i * s for i, s in zip(index, os)) * op.esize, st)
            for op, os, st in zip(operands, outer_strides, inner)], description)


def _broadcast(shape, op, what):
    """op's strides broadcast to `shape` (NumPy rules: stride 0 where op has extent 1)."""
    pad = len(shape) - len(op.shape)
    if pad < 0:
        raise ValidationError(f"{what}: {op.name} of shape {op.shape} has more dimensions than "
                              f"the destination {shape}")
    out = []
    for d, (e, s) in zip(shape, [(1, 0)] * pad + list(zip(op.shape, op.strides))):
        if e == d:
            out.append(s if d != 1 else 0)
        elif e == 1:
            out.append(0)
        else:
            raise ValidationError(f"{what}: {op.name} of shape {op.shape} does not broadcast to "
                                  f"the destination shape {shape}")
    return out


def _check_same_shape(src, dst, what):
    if src.shape != dst.shape:
        raise ValidationError(f"{what}: the source {src.name} has shape {src.shape} but the "
                              f"destination {dst.name} has {dst.shape}")


def _overlapping(a, b):
    (a0, a1), (b0, b1) = a.span(), b.span()
    return a0 < b1 and b0 < a1


def neuron_op(cb, neuron, src, dst, description):
    """dst = f(src) for a neuron descriptor or CNNNeuron; PReLU slopes run along the
    innermost dimension."""
    _check_same_shape(src, dst, f"{description}")
    if _overlapping(src, dst) and (src.address, src.strides) != (dst.address, dst.strides):
        raise ValidationError(f"{description}: the destination {dst.name} partly overlaps the source {src.name}")
    slopes = None
    if neuron.neuron_type == CNNNeuronType.PRELU:
        data = np.asarray(neuron.data, np.float32).reshape(-1)
        channels = src.shape[-1] if src.shape else 1
        if data.size not in (1, channels):
            raise ValidationError(f"{description}: PReLU has {data.size} slopes; the innermost "
                                  f"dimension has {channels}")
        slopes = np.array(np.broadcast_to(data, (channels,)))   # a writable copy
    t, a, b, c = int(neuron.neuron_type), neuron.a, neuron.b, neuron.c

    def make(extent):
        return _native.ElementwiseCommand.neuron(extent, t, a, b, c, slopes)

    _record_elementwise(cb, make, [src, dst], dst.shape, [src.strides, dst.strides],
                        description, keep_inner=slopes is not None)


def arithmetic_op(cb, kernel, a, b, dst, description):
    """dst = clamp((primary_scale*a) OP (secondary_scale*b) + bias, min, max), a and b
    broadcast to dst's shape (NumPy rules)."""
    for src in (a, b):
        if _overlapping(src, dst) and (src.address, src.strides, src.shape) != (dst.address, dst.strides, dst.shape):
            raise ValidationError(f"{description}: the destination {dst.name} partly overlaps {src.name}")
    args = (kernel._op, kernel.primary_scale, kernel.secondary_scale, kernel.bias,
            kernel.minimum_value, kernel.maximum_value)
    if kernel.minimum_value > kernel.maximum_value:
        raise ValidationError(f"{description}: minimum_value > maximum_value")

    def make(extent):
        return _native.ElementwiseCommand.arithmetic(extent, *args)

    _record_elementwise(cb, make, [a, b, dst], dst.shape,
                        [_broadcast(dst.shape, a, description), _broadcast(dst.shape, b, description),
                         dst.strides], description)


def copy_op(cb, src, dst, description, perm=None):
    """dst = src, or src's dimensions permuted (dst dimension i is src dimension perm[i]),
    converting between float formats."""
    if perm is None:
        perm = range(len(src.shape))
    shape = tuple(src.shape[p] for p in perm)
    if shape != dst.shape:
        raise ValidationError(f"{description}: {src.name} gives shape {shape}, the destination "
                              f"{dst.name} has {dst.shape}")
    if _overlapping(src, dst):
        raise ValidationError(f"{description}: the destination {dst.name} overlaps the source {src.name}")
    _record_elementwise(cb, _native.ElementwiseCommand.copy, [src, dst], shape,
                        [[src.strides[p] for p in perm], dst.strides], description)


class _NHWCImage:
    """An NHWC operand seen as an image, so the convolution family's encode path runs on it."""

    def __init__(self, op):
        if len(op.shape) != 4 or op.strides[3] != 1:
            raise ValidationError(f"convolution takes NHWC tensors (rank 4, channels innermost "
                                  f"and contiguous); {op.name} has shape {op.shape}")
        self._op = op
        self.number_of_images, self.height, self.width, self.feature_channels = op.shape
        self._format = op._format
        self._strides = op.strides
        self._root = op

    def _byte_offset(self, n, y, x, c):
        sn, sy, sx, sc = self._strides
        return (n * sn + y * sy + x * sx + c * sc) * self._op.esize

    def __repr__(self):
        return self._op.name


def convolution_op(cb, kernel, src, dst, description, accumulate=False):
    """A CNNConvolution (any of its forms) over NHWC tensors, placed by kernel.offset and
    clip_rect as on images (the IR sets offset from ONNX-style pads). accumulate: dst holds a
    residual, added before the neuron."""
    if _overlapping(src, dst):
        raise ValidationError(f"{description}: the destination {dst.name} overlaps the source {src.name}")
    kernel._encode(cb, _NHWCImage(src), _NHWCImage(dst), accumulate)


def _is_packed(op):
    return all(s == t for d, s, t in zip(op.shape, op.strides, _packed(op.shape)) if d != 1)


def _with(op, shape, strides=None):
    """The same memory seen with another shape (and strides; default packed)."""
    view = _Operand.__new__(_Operand)
    for k in _Operand.__slots__:
        setattr(view, k, getattr(op, k))
    view.shape = tuple(shape)
    view.strides = tuple(strides) if strides is not None else _packed(shape)
    return view


def reshape_op(cb, ops, description):
    """dst = src's elements in C order, in dst's shape: one strided copy, the packed side seen
    in the other's shape."""
    src, dst = ops
    if _is_packed(src):
        copy_op(cb, _with(src, dst.shape), dst, description)
    elif _is_packed(dst):
        copy_op(cb, src, _with(dst, src.shape), description)
    else:   # the pipeline stages a reshape between two bindings (_staged)
        raise ValidationError(f"{description}: neither {src.name} nor {dst.name} is packed")


def _rows(op, what):
    """op (..., K) as NHWC (1, 1, rows, K): every dimension but the last must merge."""
    shape, strides = op.shape, op.strides
    if strides[-1] != 1 and shape[-1] != 1:
        raise ValidationError(f"{what}: {op.name}'s last dimension must be contiguous")
    rows = int(np.prod(shape[:-1]))
    row_stride = strides[-2] if len(shape) > 1 else shape[-1]
    for i in range(len(shape) - 2):
        if shape[i] != 1 and strides[i] != strides[i + 1] * shape[i + 1]:
            raise ValidationError(f"{what}: the leading dimensions of {op.name} {shape} are not "
                                  f"contiguous; gemm needs them to merge into rows")
    return _with(op, (1, 1, rows, shape[-1]), (0, 0, row_stride, 1))


def gemm_op(cb, kernel, src, dst, description, accumulate=False):
    """dst (..., N) = src (..., K) x W^T + bias (+ dst if accumulate): the 1x1 convolution over rows."""
    convolution_op(cb, kernel, _rows(src, description), _rows(dst, description), description, accumulate)


def _gemm_operand(cb, command, slot, address, *layout):
    """A GemmCommand's operand (it has no bind(): re-pointing it sets the whole operand)."""
    command.set_operand(slot, address, *layout)
    if cb._relocations is not None:
        cb._relocations.append((lambda a: command.set_operand(slot, a, *layout), address))


def gemv_op(cb, weights_t, bias, clamp, src, dst, description, accumulate=False):
    """dst (1, ..., N) = clamp(src (1, ..., K) x W^T + bias (+ dst if accumulate)) on mk_sgemm,
    W^T given [K][N]."""
    k, n = weights_t.shape
    command = _native.GemmCommand(1, 1, n, k, 1.0, 1.0 if accumulate else 0.0, bias, *clamp)
    _gemm_operand(cb, command, 0, src.address, src._format, k * src.strides[-1], src.strides[-1], 0)
    command.set_operand(1, weights_t.ctypes.data, 4, n, 1, 0)
    _gemm_operand(cb, command, 2, dst.address, dst._format, n * dst.strides[-1], dst.strides[-1], 0)
    command.keep = weights_t
    cb._add(command, [], description)


def concat_op(cb, axis, ops, description):
    """Each source copied into its slice of the destination along axis."""
    *srcs, dst = ops
    start = 0
    for src in srcs:
        part = _with(dst, src.shape, dst.strides)
        part.address = dst.address + start * dst.strides[axis] * dst.esize
        part.nbytes = (sum((d - 1) * t for d, t in zip(part.shape, part.strides)) + 1) * part.esize
        copy_op(cb, src, part, description)
        start += src.shape[axis]


def pool_op(cb, attrs, src, dst, description):
    """Max or average pooling of NHWC fp32 operands (src/pool)."""
    for op in (src, dst):
        if len(op.shape) != 4 or op.strides[3] != 1 or op._format != 4:
            raise ValidationError(f"{description}: pooling takes NHWC float32 operands with "
                                  f"contiguous channels; {op.name} has shape {op.shape}")
    if _overlapping(src, dst):
        raise ValidationError(f"{description}: the destination {dst.name} overlaps the source {src.name}")
    n, h, w, c = src.shape
    command = _native.PoolCommand(0 if attrs["mode"] == "max" else 1, attrs["kernel"], attrs["strides"],
                                  attrs["dilations"], attrs["pads"], attrs["count_include_pad"], h, w,
                                  dst.shape)
    cb._add(command, [(src, 0, src.strides), (dst, 0, dst.strides)], description)


def _check_f32(ops, description, what):
    for op in ops:
        if op._format != 4:
            raise ValidationError(f"{description}: {what} takes float32 operands; {op.name} is not")


def nn_rows_op(cb, op, src, dst, description, epsilon=0.0, scale=None, bias=None):
    """An nn row op along the innermost axis (src/nn): softmax, layer normalisation, erf,
    hard-swish, tanh-GELU. dst has src's shape, or src's with the innermost dimension 1 for
    the per-row layer-norm statistics."""
    _check_f32((src, dst), description, "this op")
    stat = op in (_native.NN_LAYER_NORM_MEAN, _native.NN_LAYER_NORM_INV_STD)
    if stat:
        if dst.shape != src.shape[:-1] + (1,):
            raise ValidationError(f"{description}: {dst.name} must have shape {src.shape[:-1] + (1,)}")
        dst = _with(dst, src.shape, dst.strides[:-1] + (0,))
    else:
        _check_same_shape(src, dst, description)
    if _overlapping(src, dst) and (src.address, src.strides) != (dst.address, dst.strides):
        raise ValidationError(f"{description}: the destination {dst.name} partly overlaps the source {src.name}")
    rows = op in (_native.NN_SOFTMAX, _native.NN_LAYER_NORM) or stat

    def make(extent):
        return _native.NNRowsCommand(extent, op, epsilon, scale, bias)

    _, _, extent, inner = _loops(src.shape, [src.strides, dst.strides], keep_inner=rows)
    if extent[3] > 1 and (inner[0][3] != 1 or (not stat and inner[1][3] != 1)):
        raise ValidationError(f"{description}: the innermost dimension of {src.name} and {dst.name} must be contiguous")
    _record_elementwise(cb, make, [src, dst], src.shape, [src.strides, dst.strides], description,
                        keep_inner=rows)


def gather_op(cb, index, value, src, dst, description):
    """dst[i0, i1, ...] = src[index[0][i0], index[1][i1], ...], or `value` where an index is
    -1; index[k] None: the identity (dst and src have the same extent there). Rank > 4 after
    merging runs one command per outer index."""
    _check_f32((src, dst), description, "gather")
    if _overlapping(src, dst):
        raise ValidationError(f"{description}: the destination {dst.name} overlaps the source {src.name}")
    address = src.address
    axes = []    # [dst extent, src extent, table or None, src stride, dst stride]
    for d, s, t, ss, ds in zip(dst.shape, src.shape, index, src.strides, dst.strides):
        if d == 1 and (t is None or t[0] >= 0):   # one element: an address offset
            address += (0 if t is None else int(t[0])) * ss * src.esize
            continue
        if axes and t is None and axes[-1][2] is None and axes[-1][3] == ss * s and axes[-1][4] == ds * d:
            axes[-1] = [axes[-1][0] * d, axes[-1][1] * s, None, ss, ds]
            continue
        axes.append([d, s, t, ss, ds])
    while len(axes) < 4:
        axes.insert(0, [1, 1, None, 0, 0])
    outer, inner = axes[:-4], axes[-4:]
    tables = [np.arange(d, dtype=np.int32) if t is None else np.ascontiguousarray(t, np.int32)
              for d, _, t, _, _ in inner]
    extent, src_extent = tuple(a[0] for a in inner), tuple(a[1] for a in inner)
    for idx in itertools.product(*[range(a[0]) for a in outer]):
        pos = [i if a[2] is None else int(a[2][i]) for i, a in zip(idx, outer)]
        fill = any(p < 0 for p in pos)
        command = _native.NNGatherCommand([np.full(extent[0], -1, np.int32)] + tables[1:] if fill else tables,
                                          value, src_extent, extent)
        s_op = _with(src, src.shape, src.strides)
        s_op.address = address + sum(max(p, 0) * a[3] for p, a in zip(pos, outer)) * src.esize
        d_off = sum(i * a[4] for i, a in zip(idx, outer)) * dst.esize
        cb._add(command, [(s_op, 0, tuple(a[3] for a in inner)), (dst, d_off, tuple(a[4] for a in inner))],
                description)


def resize_op(cb, tables, src, dst, description):
    """Bilinear resize of NHWC operands (src/nn): tables (y0, y1, wy, x0, x1, wx)."""
    _check_f32((src, dst), description, "resize")
    for op in (src, dst):
        if len(op.shape) != 4 or op.strides[3] != 1:
            raise ValidationError(f"{description}: resize takes NHWC operands with contiguous channels; "
                                  f"{op.name} has shape {op.shape}")
    if _overlapping(src, dst):
        raise ValidationError(f"{description}: the destination {dst.name} overlaps the source {src.name}")
    command = _native.NNResizeCommand(*tables, src.shape[1], src.shape[2], dst.shape)
    cb._add(command, [(src, 0, src.strides), (dst, 0, dst.strides)], description)


_REDUCE_OPS = {"sum": 0, "mean": 1, "min": 2, "max": 3}   # mk_reduce_op


def reduce_op(cb, op, axes, src, dst, description):
    """dst = src reduced over the contiguous range of axes (src/reduce), kept as size 1: the
    packed source seen as (outer, reduced, inner); one mk_reduce across channels (inner = 1)
    or down columns."""
    _check_f32((src, dst), description, "reduce")
    if not (_is_packed(src) and _is_packed(dst)):
        raise ValidationError(f"{description}: reduce takes packed operands")
    a0, a1 = axes[0], axes[-1] + 1
    outer, r, inner = (int(np.prod(src.shape[:a0])), int(np.prod(src.shape[a0:a1])),
                       int(np.prod(src.shape[a1:])))
    if inner == 1:
        command = _native.ReduceCommand((1, 1, outer, r), _REDUCE_OPS[op], 0, 1.0)
        strides = [(0, 0, r, 1), (0, 0, 1, 1)]
    else:
        command = _native.ReduceCommand((outer, r, 1, inner), _REDUCE_OPS[op], 2, 1.0)
        strides = [(r * inner, inner, 0, 1), (inner, 0, 0, 1)]
    cb._add(command, [(src, 0, strides[0]), (dst, 0, strides[1])], description)


def _batch_dims(shape, strides_list):
    """Batch dimensions merged where contiguous in every operand: [(extent, [strides])]."""
    merged = []
    for d, st in reversed([(d, [s[i] for s in strides_list]) for i, d in enumerate(shape) if d != 1]):
        if merged and all(o == i * merged[-1][0] for o, i in zip(st, merged[-1][1])):
            merged[-1] = (merged[-1][0] * d, merged[-1][1])
        else:
            merged.append((d, st))
    return merged[::-1] or [(1, [0] * len(strides_list))]


def matmul_op(cb, transpose_a, transpose_b, alpha, a, b, dst, description):
    """dst (..., M, N) = alpha * op(a) op(b) (mk_sgemm), batch dimensions broadcast (NumPy
    rules); op() swaps the last two dimensions when transposed."""
    _check_f32((a, b, dst), description, "matmul")
    for src in (a, b):
        if _overlapping(src, dst):
            raise ValidationError(f"{description}: the destination {dst.name} overlaps {src.name}")
    batch = dst.shape[:-2]
    m, n = dst.shape[-2:]
    k = a.shape[-1] if not transpose_a else a.shape[-2]
    mats = []
    for op, t in ((a, transpose_a), (b, transpose_b)):
        rs, cs = op.strides[-2:]
        mats.append((cs, rs) if t else (rs, cs))
        mats[-1] = (op, *mats[-1], _broadcast(batch, _with(op, op.shape[:-2], op.strides[:-2]), description))
    mats.append((dst, dst.strides[-2], dst.strides[-1], list(dst.strides[:-2])))
    dims = _batch_dims(batch, [m_[3] for m_ in mats])
    *outer, (count, bstrides) = dims
    for idx in itertools.product(*[range(d) for d, _ in outer]):
        command = _native.GemmCommand(count, m, n, k, alpha, 0.0)
        for slot, (op, rs, cs, _) in enumerate(mats):
            offset = sum(i * st[slot] for i, (_, st) in zip(idx, outer))
            _gemm_operand(cb, command, slot, op.address + offset * op.esize, op._format, rs, cs, bstrides[slot])
        cb._add(command, [], description)


# ==== the network IR =============================================================================

class Value:
    """A tensor of the network: an input, an output, or an intermediate (heap-placed).
    shape is in NumPy order; -1 marks a free dimension of an input, and values computed from
    such an input have shape None until a pipeline fixes the input's dimensions."""

    def __init__(self, network, name, shape, data_type, producer=None):
        self.network = network
        self.name = name
        self.shape = None if shape is None else tuple(shape)   # None: known once inputs are
        self.data_type = data_type
        self.producer = producer

    def __repr__(self):
        return f"<Value {self.name!r} {self.shape} {self.data_type.name}>"


class Node:
    """One op: kind (a string naming the op), inputs and outputs (Values), attrs (plain data:
    numbers, tuples, NumPy arrays), so that a file format can store it as it is."""

    def __init__(self, kind, inputs, outputs, attrs, name):
        self.kind, self.inputs, self.outputs, self.attrs, self.name = kind, inputs, outputs, attrs, name

    def __repr__(self):
        return f"<Node {self.name!r} {self.kind}>"


def _shape_arg(shape, what):
    shape = tuple(-1 if d is None else d for d in shape)
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or (d < 1 and d != -1):
            raise ValidationError(f"{what}: dimensions must be positive integers or -1/None (free), got {shape}")
    return tuple(int(d) for d in shape)


def _ints(values, count, what, minimum):
    """A tuple of integers in [minimum, 2**31 - 1] (`count` of them unless None): strides,
    pads, a perm (the kernels take them as int32)."""
    try:
        values = tuple(values)
    except TypeError:
        values = (values,)
    if (count is not None and len(values) != count) or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not minimum <= v < 1 << 31
            for v in values):
        raise ValidationError(f"{what} must be {count or 'some'} integers in [{minimum}, 2**31 - 1], "
                              f"got {values!r}")
    return tuple(int(v) for v in values)


def _table(values, dtype, what):
    """A 1-D array of dtype (an index or weight table); ValidationError if values do not fit."""
    try:
        return np.asarray(values, dtype).reshape(-1)
    except (OverflowError, ValueError, TypeError) as e:
        raise ValidationError(f"{what}: {e}") from None


def _neuron_arg(neuron, what):
    if neuron is not None and not isinstance(neuron, NNNeuronDescriptor):
        raise ValidationError(f"{what}: neuron must be an NNNeuronDescriptor or None, got {neuron!r}")
    return neuron


class Network:
    """A graph of our kernels over tensors, built in order (each node's inputs exist before it).
    Inputs get binding indices 0.. in declaration order, outputs follow."""

    # the op methods: each node's attrs are exactly their keyword arguments (a package replays them)
    OPS = ("neuron", "add", "sub", "mul", "div", "transpose", "reshape", "conv2d", "gemm", "pool2d", "concat",
           "softmax", "unary", "layer_norm", "gather", "resize_linear", "reduce", "matmul", "conv_transpose2d")

    def __init__(self, name="main"):
        self.name = name
        self.inputs, self.outputs, self.nodes, self.constants = [], [], [], []
        self._names = set()

    def _value(self, name, shape, data_type, producer=None):
        if name in self._names:
            raise ValidationError(f"network {self.name!r} already has a value named {name!r}")
        self._names.add(name)
        return Value(self, name, shape, data_type, producer)

    def _node(self, kind, inputs, attrs, name, out_shape_fn):
        for v in inputs:
            if not isinstance(v, Value) or v.network is not self:
                raise ValidationError(f"{kind}: {v!r} is not a value of network {self.name!r}")
        name = name or f"{kind}_{len(self.nodes)}"
        node = Node(kind, list(inputs), [], attrs, name)
        node.infer = out_shape_fn
        shape = None
        if all(v.shape is not None and -1 not in v.shape for v in inputs):   # static: check now
            shape = out_shape_fn([v.shape for v in inputs])
        elif all(v.shape is not None for v in inputs):
            shape = _partial_shape(out_shape_fn, [v.shape for v in inputs])
        out = self._value(name, shape, inputs[0].data_type, node)
        node.outputs.append(out)
        self.nodes.append(node)
        return out

    def input(self, name, shape, data_type=TensorDataType.FLOAT32):
        value = self._value(name, _shape_arg(shape, f"input {name!r}"), data_type_of(data_type))
        self.inputs.append(value)
        return value

    def output(self, value, name=None):
        """Make value a network output (its own binding); returns it."""
        if value.producer is None:
            raise ValidationError(f"{value!r} is an input: an output must be computed by a node")
        if value in self.outputs:
            raise ValidationError(f"{value!r} is already an output")
        if name is not None and name != value.name:
            if name in self._names:
                raise ValidationError(f"network {self.name!r} already has a value named {name!r}")
            self._names.discard(value.name)
            self._names.add(name)
            value.name = name
        self.outputs.append(value)
        return value

    # ---- ops -------------------------------------------------------------------------------

    def neuron(self, x, neuron_type, a=0.0, b=0.0, c=0.0, prelu=None, name=None):
        NNNeuronDescriptor(neuron_type)   # validates the type
        attrs = {"neuron_type": int(neuron_type), "a": float(a), "b": float(b), "c": float(c),
                 "prelu": None if prelu is None else np.asarray(prelu, np.float32).reshape(-1)}
        return self._node("neuron", [x], attrs, name, lambda s: s[0])

    def _arith(self, op, a, b, clamp, name):
        attrs = {"clamp": None if clamp is None else (float(clamp[0]), float(clamp[1]))}
        return self._node(op, [a, b], attrs, name, lambda s: _broadcast_shapes(s[0], s[1], op))

    # clamp=(lo, hi): the result clamped (a fused ReLU / Clip)
    def add(self, a, b, clamp=None, name=None):
        return self._arith("add", a, b, clamp, name)

    def sub(self, a, b, clamp=None, name=None):
        return self._arith("sub", a, b, clamp, name)

    def mul(self, a, b, clamp=None, name=None):
        return self._arith("mul", a, b, clamp, name)

    def div(self, a, b, clamp=None, name=None):
        return self._arith("div", a, b, clamp, name)

    def constant(self, array, name=None):
        """A float32 array the network reads (not a binding, not in the heap)."""
        data = np.ascontiguousarray(array, np.float32)
        value = self._value(name or f"constant_{len(self.constants)}", data.shape, TensorDataType.FLOAT32)
        value.data = data
        self.constants.append(value)
        return value

    def reshape(self, x, shape, name=None):
        """The elements of x in C order, in a new shape (one -1 is inferred)."""
        shape = _ints(shape, None, "reshape: shape", -1)

        def infer(shapes):
            size = int(np.prod(shapes[0]))
            known = int(np.prod([d for d in shape if d != -1]))
            out = tuple(size // known if d == -1 and known else d for d in shape)
            if shape.count(-1) > 1 or any(d < 1 for d in out) or int(np.prod(out)) != size:
                raise ValidationError(f"reshape: {shapes[0]} ({size} elements) cannot become {shape}")
            return out

        return self._node("reshape", [x], {"shape": shape}, name, infer)

    def pool2d(self, x, mode, kernel=None, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0),
               count_include_pad=False, ceil_mode=False, name=None):
        """Max ("max") or average ("average") pooling of NHWC x; kernel None: the whole image
        (global pooling). pads (top, left, bottom, right); ceil_mode rounds the output size up."""
        if mode not in ("max", "average"):
            raise ValidationError(f"pool2d: mode must be 'max' or 'average', got {mode!r}")
        strides, dilations = _ints(strides, 2, "pool2d: strides", 1), _ints(dilations, 2, "pool2d: dilations", 1)
        pads = _ints(pads, 4, "pool2d: pads", 0)
        attrs = {"mode": mode, "kernel": None if kernel is None else _ints(kernel, 2, "pool2d: kernel", 1),
                 "strides": strides, "dilations": dilations, "pads": pads,
                 "count_include_pad": bool(count_include_pad), "ceil_mode": bool(ceil_mode)}

        def infer(shapes):
            n, h, w, c = _rank(shapes[0], 4, "pool2d input (NHWC)")
            kh, kw = attrs["kernel"] or (h, w)
            (sy, sx), (dy, dx), (top, left, bottom, right) = strides, dilations, pads
            size = []
            for extent, k, s, d, p0, p1 in ((h, kh, sy, dy, top, bottom), (w, kw, sx, dx, left, right)):
                span = extent + p0 + p1 - d * (k - 1) - 1
                o = (-(-span // s) if ceil_mode else span // s) + 1
                if ceil_mode and (o - 1) * s >= extent + p0:
                    o -= 1      # the last window must start inside the image or its padding
                size.append(o)
            if min(size) < 1 or min(kh, kw, sy, sx, dy, dx) < 1:
                raise ValidationError(f"pool2d: an input of {h}x{w} is too small for a {kh}x{kw} window")
            return (n, size[0], size[1], c)

        return self._node("pool2d", [x], attrs, name, infer)

    def concat(self, *xs, axis, name=None):
        """xs joined along axis (their other dimensions equal)."""
        axis, = _ints(axis, 1, "concat: axis", -(1 << 31))

        def infer(shapes):
            rank = len(shapes[0])
            a = axis + rank if axis < 0 else axis
            if not 0 <= a < rank or any(len(s) != rank or s[:a] + s[a + 1:] != shapes[0][:a] + shapes[0][a + 1:]
                                        for s in shapes):
                raise ValidationError(f"concat: shapes {shapes} do not join along axis {axis}")
            return shapes[0][:a] + (sum(s[a] for s in shapes),) + shapes[0][a + 1:]

        return self._node("concat", list(xs), {"axis": axis}, name, infer)

    def gemm(self, x, weights, bias=None, neuron=None, name=None):
        """x (..., K) times weights^T ([N][K] float32) plus bias, then the fused neuron:
        (..., N). Runs on the convolution family's 1x1 path."""
        w = np.ascontiguousarray(weights, np.float32)
        if w.ndim != 2:
            raise ValidationError(f"gemm: weights must be [N][K], got shape {w.shape}")
        attrs = {"weights": w, "bias": None if bias is None else np.asarray(bias, np.float32).reshape(-1),
                 "neuron": _neuron_arg(neuron, "gemm")}

        def infer(shapes):
            if len(shapes[0]) < 2 or shapes[0][-1] != w.shape[1]:
                raise ValidationError(f"gemm: the input {shapes[0]} must have rank >= 2 and "
                                      f"{w.shape[1]} elements in its last dimension")
            return shapes[0][:-1] + (w.shape[0],)

        return self._node("gemm", [x], attrs, name, infer)

    def transpose(self, x, perm, name=None):
        perm = _ints(perm, None, "transpose: perm", 0)

        def infer(shapes):
            if sorted(perm) != list(range(len(shapes[0]))):
                raise ValidationError(f"transpose: {perm} is not a permutation of {len(shapes[0])} dimensions")
            return tuple(shapes[0][p] for p in perm)

        return self._node("transpose", [x], {"perm": perm}, name, infer)

    def conv2d(self, x, weights, bias=None, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0),
               groups=1, neuron=None, name=None):
        """x NHWC; weights [out][kh][kw][in/groups] float32; pads (top, left, bottom, right);
        neuron: an NNNeuronDescriptor applied to the result (fused)."""
        w = np.ascontiguousarray(weights, np.float32)
        if w.ndim != 4:
            raise ValidationError(f"conv2d: weights must be [out][kh][kw][in/groups], got shape {w.shape}")
        out_c, kh, kw, cin_g = w.shape
        (sy, sx), (dy, dx) = _ints(strides, 2, "conv2d: strides", 1), _ints(dilations, 2, "conv2d: dilations", 1)
        top, left, bottom, right = _ints(pads, 4, "conv2d: pads", 0)
        groups, = _ints(groups, 1, "conv2d: groups", 1)
        if out_c % groups:
            raise ValidationError(f"conv2d: groups {groups} must divide the {out_c} output channels")
        _neuron_arg(neuron, "conv2d")
        attrs = {"weights": w, "bias": None if bias is None else np.asarray(bias, np.float32).reshape(-1),
                 "strides": (sy, sx), "dilations": (dy, dx), "pads": (top, left, bottom, right),
                 "groups": groups, "neuron": neuron}

        def infer(shapes):
            n, h, wd, c = _rank(shapes[0], 4, "conv2d input (NHWC)")
            if c != cin_g * groups:
                raise ValidationError(f"conv2d: the input has {c} channels; the weights take "
                                      f"{cin_g} x {groups} groups")
            oh = (h + top + bottom - dy * (kh - 1) - 1) // sy + 1
            ow = (wd + left + right - dx * (kw - 1) - 1) // sx + 1
            if oh < 1 or ow < 1:
                raise ValidationError(f"conv2d: an input of {h}x{wd} is too small for this window")
            return (n, oh, ow, out_c)

        return self._node("conv2d", [x], attrs, name, infer)

    def softmax(self, x, name=None):
        """Softmax along the innermost dimension."""
        return self._node("softmax", [x], {}, name, lambda s: _rank_at_least(s[0], 1, "softmax"))

    UNARY = ("erf", "hard_swish", "gelu_tanh")

    def unary(self, x, function, name=None):
        """An elementwise function beyond the neuron types: "erf", "hard_swish"
        (x * clamp(x/6 + 1/2, 0, 1)) or "gelu_tanh" (GELU's tanh approximation)."""
        if function not in self.UNARY:
            raise ValidationError(f"unary: function must be one of {self.UNARY}, got {function!r}")
        return self._node("unary", [x], {"function": function}, name, lambda s: s[0])

    LAYER_NORM_OUTPUTS = ("y", "mean", "inv_std_dev")

    def layer_norm(self, x, scale=None, bias=None, axis=-1, epsilon=1e-5, output="y", name=None):
        """Layer normalisation over dimensions axis.. (the innermost ones): y = (x - mean) /
        sqrt(var + epsilon) * scale + bias, scale and bias broadcast to those dimensions.
        output "mean" / "inv_std_dev": the per-row statistic instead, shape x.shape[:axis]
        + (1, ...)."""
        if output not in self.LAYER_NORM_OUTPUTS:
            raise ValidationError(f"layer_norm: output must be one of {self.LAYER_NORM_OUTPUTS}, got {output!r}")
        attrs = {"scale": None if scale is None else np.asarray(scale, np.float32),
                 "bias": None if bias is None else np.asarray(bias, np.float32),
                 "axis": _ints(axis, 1, "layer_norm: axis", -(1 << 31))[0], "epsilon": float(epsilon),
                 "output": output}

        def infer(shapes):
            shape = shapes[0]
            a = _axis(axis, len(shape), "layer_norm")
            for what in ("scale", "bias"):
                if attrs[what] is not None:
                    try:   # it must broadcast *to* them, not to something larger
                        if np.broadcast_shapes(attrs[what].shape, shape[a:]) != tuple(shape[a:]):
                            raise ValueError
                    except ValueError:
                        raise ValidationError(f"layer_norm: {what} of shape {attrs[what].shape} does not "
                                              f"broadcast to the normalised dimensions {shape[a:]}") from None
            return shape if output == "y" else shape[:a] + (1,) * (len(shape) - a)

        return self._node("layer_norm", [x], attrs, name, infer)

    def gather(self, x, index, value=0.0, name=None):
        """out[i0, i1, ...] = x[index[0][i0], index[1][i1], ...], or `value` where an index
        is -1: one index table (integers) per dimension, None for all of it. Pad, slice
        with any step, gather along a dimension and nearest-neighbour resize are gathers."""
        index = [None if t is None else _table(t, np.int32, "gather: index") for t in index]

        def infer(shapes):
            shape = shapes[0]
            if len(index) != len(shape):
                raise ValidationError(f"gather: {len(index)} index tables for a rank-{len(shape)} input")
            for k, (t, d) in enumerate(zip(index, shape)):
                if t is not None and (t.size == 0 or t.min() < -1 or t.max() >= d):
                    raise ValidationError(f"gather: index table {k} must be non-empty, with entries -1 "
                                          f"or in 0..{d - 1}")
            return tuple(d if t is None else t.size for t, d in zip(index, shape))

        return self._node("gather", [x], {"index": index, "value": float(value)}, name, infer)

    def resize_linear(self, x, y0, y1, wy, x0, x1, wx, name=None):
        """Bilinear resize of NHWC x: output row i blends rows y0[i] and y1[i] with weight
        wy[i] on y1, columns likewise; out (N, len(y0), len(x0), C)."""
        tables = [_table(t, np.int32 if k % 3 < 2 else np.float32, "resize_linear: tables")
                  for k, t in enumerate((y0, y1, wy, x0, x1, wx))]
        attrs = dict(zip(("y0", "y1", "wy", "x0", "x1", "wx"), tables))

        def infer(shapes):
            n, h, w, c = _rank(shapes[0], 4, "resize_linear input (NHWC)")
            for (i0, i1, wt), extent in ((tables[:3], h), (tables[3:], w)):
                if not (i0.size == i1.size == wt.size > 0) or min(i0.min(), i1.min()) < 0 \
                        or max(i0.max(), i1.max()) >= extent:
                    raise ValidationError(f"resize_linear: index tables must have equal, non-zero "
                                          f"lengths and entries in 0..{extent - 1}")
            return (n, tables[0].size, tables[3].size, c)

        return self._node("resize_linear", [x], attrs, name, infer)

    REDUCE = ("sum", "mean", "min", "max")

    def reduce(self, x, op, axes, name=None):
        """x reduced ("sum", "mean", "min", "max") over axes, a contiguous range of
        dimensions, kept with size 1."""
        if op not in self.REDUCE:
            raise ValidationError(f"reduce: op must be one of {self.REDUCE}, got {op!r}")
        axes = _ints(axes, None, "reduce: axes", -(1 << 31))

        def infer(shapes):
            shape = shapes[0]
            ax = sorted(_axis(a, len(shape), "reduce") for a in axes)
            if not ax or ax != list(range(ax[0], ax[-1] + 1)):
                raise ValidationError(f"reduce: axes {axes} must be a non-empty contiguous range")
            return tuple(1 if i in ax else d for i, d in enumerate(shape))

        return self._node("reduce", [x], {"op": op, "axes": axes}, name, infer)

    def matmul(self, a, b, transpose_a=False, transpose_b=False, alpha=1.0, name=None):
        """alpha * a @ b over the last two dimensions (each transposed if asked), leading
        (batch) dimensions broadcast as in NumPy. Runs on mk_sgemm (src/gemm)."""
        attrs = {"transpose_a": bool(transpose_a), "transpose_b": bool(transpose_b), "alpha": float(alpha)}

        def infer(shapes):
            sa, sb = shapes
            if len(sa) < 2 or len(sb) < 2:
                raise ValidationError(f"matmul: operands need rank >= 2, got {sa} and {sb}")
            m, k = sa[-2:][::-1] if transpose_a else sa[-2:]
            k2, n = sb[-2:][::-1] if transpose_b else sb[-2:]
            if k != k2:
                raise ValidationError(f"matmul: inner dimensions differ: {sa} @ {sb}")
            return _broadcast_shapes(sa[:-2], sb[:-2], "matmul") + (m, n)

        return self._node("matmul", [a, b], attrs, name, infer)

    def conv_transpose2d(self, x, weights, bias=None, strides=(1, 1), dilations=(1, 1),
                         pads=(0, 0, 0, 0), output_padding=(0, 0), groups=1, neuron=None, name=None):
        """ONNX ConvTranspose of NHWC x: weights [out][kh][kw][in/groups] (ONNX's W
        [in][out/groups][kh][kw] regrouped, not flipped); pads (top, left, bottom, right) are
        cut from the full output (a negative pad adds rows / columns of bias: an ONNX output_shape
        larger than the full output); output_padding adds rows / columns at the end. Runs on
        CNNConvolutionTranspose."""
        w = np.ascontiguousarray(weights, np.float32)
        if w.ndim != 4:
            raise ValidationError(f"conv_transpose2d: weights must be [out][kh][kw][in/groups], got shape {w.shape}")
        out_c, kh, kw, cin_g = w.shape
        attrs = {"weights": w, "bias": None if bias is None else np.asarray(bias, np.float32).reshape(-1),
                 "strides": _ints(strides, 2, "conv_transpose2d: strides", 1),
                 "dilations": _ints(dilations, 2, "conv_transpose2d: dilations", 1),
                 "pads": _ints(pads, 4, "conv_transpose2d: pads", -(1 << 24)),
                 "output_padding": _ints(output_padding, 2, "conv_transpose2d: output_padding", 0),
                 "groups": _ints(groups, 1, "conv_transpose2d: groups", 1)[0],
                 "neuron": _neuron_arg(neuron, "conv_transpose2d")}

        def infer(shapes):
            n, h, wd, c = _rank(shapes[0], 4, "conv_transpose2d input (NHWC)")
            (sy, sx), (dy, dx), (top, left, bottom, right), (oy, ox) = strides, dilations, pads, output_padding
            if c != cin_g * groups or out_c % groups:
                raise ValidationError(f"conv_transpose2d: the input has {c} channels; the weights take "
                                      f"{cin_g} x {groups} groups")
            oh = sy * (h - 1) + oy + (kh - 1) * dy + 1 - top - bottom
            ow = sx * (wd - 1) + ox + (kw - 1) * dx + 1 - left - right
            if oh < 1 or ow < 1:
                raise ValidationError(f"conv_transpose2d: the pads leave no output ({oh}x{ow})")
            return (n, oh, ow, out_c)

        return self._node("conv_transpose2d", [x], attrs, name, infer)


def _partial_shape(infer, shapes):
    """The output shape with -1 where it depends on the inputs' free (-1) dimensions: infer
    with them set to 1 and to 2 and compare (None if either fails)."""
    try:
        a, b = (infer([tuple(k if d == -1 else d for d in s) for s in shapes]) for k in (1, 2))
    except ValidationError:
        return None
    return tuple(x if x == y else -1 for x, y in zip(a, b))


def _rank_at_least(shape, rank, what):
    if len(shape) < rank:
        raise ValidationError(f"{what} needs rank >= {rank}, got shape {shape}")
    return shape


def _axis(axis, rank, what):
    if not -rank <= axis < rank:
        raise ValidationError(f"{what}: axis {axis} is outside a rank-{rank} shape")
    return axis % rank


def _rank(shape, rank, what):
    if len(shape) != rank:
        raise ValidationError(f"{what} must have rank {rank}, got shape {shape}")
    return shape


def _broadcast_shapes(a, b, op):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise ValidationError(f"{op}: shapes {a} and {b} do not broadcast") from None


# ==== libraries, descriptors, pipelines =======================================================

class Library:
    """MTLLibrary of networks: Library(device, {name: Network}) builds one in memory (loading
    a package file is device.make_library(path), not yet implemented)."""

    def __init__(self, device, networks):
        if isinstance(networks, Network):
            networks = {networks.name: networks}
        for name, net in networks.items():
            if not isinstance(net, Network):
                raise TypeError(f"library function {name!r} must be a Network, got {type(net).__name__}")
            if not net.outputs:
                raise ValidationError(f"network {name!r} has no outputs: mark them with network.output()")
        self.device = device
        self.label = None
        self._networks = dict(networks)

    @property
    def function_names(self):
        return list(self._networks)


class FunctionDescriptor:
    """MTL4FunctionDescriptor (base)."""


class LibraryFunctionDescriptor(FunctionDescriptor):
    def __init__(self, name=None, library=None):
        self.name = name
        self.library = library


class MachineLearningPipelineDescriptor:
    """MTL4MachineLearningPipelineDescriptor."""

    def __init__(self, machine_learning_function_descriptor=None, label=None):
        self.label = label
        self.machine_learning_function_descriptor = machine_learning_function_descriptor
        self._dims = {}

    def set_input_dimensions(self, dimensions, buffer_index):
        """Fix the shape of the input at buffer_index (None clears it)."""
        if dimensions is not None and not isinstance(dimensions, TensorExtents):
            raise TypeError(f"dimensions must be a TensorExtents or None, got {dimensions!r}")
        if dimensions is None:
            self._dims.pop(buffer_index, None)
        else:
            self._dims[int(buffer_index)] = dimensions

    def set_input_dimensions_range(self, dimensions, indices):
        """Many at once: indices a range (Apple's NSRange); None entries clear."""
        indices = list(indices)
        if len(dimensions) != len(indices):
            raise ValidationError(f"{len(dimensions)} dimensions for a range of {len(indices)} indices")
        for d, i in zip(dimensions, indices):
            self.set_input_dimensions(d, i)

    def input_dimensions(self, buffer_index):
        return self._dims.get(buffer_index)

    def reset(self):
        self.__init__()


class Binding:
    """MTLTensorBinding: one input or output of a pipeline."""

    def __init__(self, name, index, access, data_type, dimensions):
        self.name, self.index, self.access = name, index, access
        self.data_type, self.dimensions = data_type, dimensions
        self.type = "tensor"
        self.is_used = True

    def __repr__(self):
        return (f"<Binding {self.index} {self.name!r} {self.access.name} {self.data_type.name} "
                f"shape {self.dimensions.shape}>")


class MachineLearningPipelineReflection:
    def __init__(self, bindings):
        self.bindings = bindings


class _Step:
    """One node of a compiled network: a record function and its operand slots."""
    __slots__ = ("node", "run", "slots")

    def __init__(self, node, run, slots):
        self.node, self.run, self.slots = node, run, slots


# node kinds that view their operands in other shapes: bound operands are staged (packed)
_PACKED_OPERANDS = ("reduce", "layer_norm")
# elementwise node kinds whose kernels may write over a source of the destination's shape
_IN_PLACE = ("neuron", "add", "sub", "mul", "div")


def _staged(step, staging):
    """step running on packed slots in place of the bound operands in staging {slot: Value}
    that are not packed themselves: inputs copied in before, outputs copied out after."""
    if not staging:
        return step
    run, count, n_in = step.run, len(step.slots), len(step.node.inputs)

    def staged_run(cb, ops, name):
        own = ops[:count]
        extra = {i: op for i, op in zip(staging, ops[count:]) if not _is_packed(own[i])}
        for i, op in extra.items():
            if i < n_in:
                copy_op(cb, own[i], op, name)
        run(cb, [extra.get(i, op) for i, op in enumerate(own)], name)
        for i, op in extra.items():
            if i >= n_in:
                copy_op(cb, op, own[i], name)

    return _Step(step.node, staged_run, step.slots + list(staging.values()))


class MachineLearningPipelineState:
    """A network compiled for fixed input shapes: kernels made and weights packed once, every
    intermediate's offset in the intermediates heap planned (mk_arena_plan)."""

    def __init__(self, device, descriptor):
        fd = descriptor.machine_learning_function_descriptor
        if not isinstance(fd, LibraryFunctionDescriptor) or not isinstance(fd.library, Library):
            raise ValidationError("the descriptor's machine_learning_function_descriptor must be a "
                                  "LibraryFunctionDescriptor(name, library)")
        if fd.name not in fd.library._networks:
            raise ValidationError(f"library has no function {fd.name!r}; it has "
                                  f"{fd.library.function_names}")
        net = fd.library._networks[fd.name]
        self.device = device
        self.label = descriptor.label
        self.network = net
        self._recording = None   # the last dispatch's commands (_Recording)
        shapes = self._input_shapes(net, descriptor)
        shapes.update((v, v.shape) for v in net.constants)
        for node in net.nodes:   # shapes with the inputs fixed
            try:
                shapes[node.outputs[0]] = node.infer([shapes[v] for v in node.inputs])
            except ValidationError as e:
                raise ValidationError(f"node {node.name!r} ({node.kind}) of network {net.name!r}: {e}") from None
        self._shapes = shapes
        self._nodes = _fuse_residual_adds(net, shapes)
        self._plan(net, shapes)
        self._steps = [_staged(self._compile(node), self._staging.get(node)) for node in self._nodes]
        self.reflection = MachineLearningPipelineReflection(
            [Binding(v.name, i, BindingAccess.READ_ONLY, v.data_type, TensorExtents.from_shape(shapes[v]))
             for i, v in enumerate(net.inputs)]
            + [Binding(v.name, len(net.inputs) + i, BindingAccess.WRITE_ONLY, v.data_type,
                       TensorExtents.from_shape(shapes[v])) for i, v in enumerate(net.outputs)])

    @staticmethod
    def _input_shapes(net, descriptor):
        shapes = {}
        for i, v in enumerate(net.inputs):
            given = descriptor.input_dimensions(i)
            if given is None:
                if -1 in v.shape:
                    raise ValidationError(
                        f"input {v.name!r} (binding {i}) has free dimensions {v.shape}: fix them "
                        f"with descriptor.set_input_dimensions(TensorExtents, {i})")
                shapes[v] = v.shape
                continue
            shape = given.shape
            if len(shape) != len(v.shape) or any(m != -1 and m != g for m, g in zip(v.shape, shape)):
                raise ValidationError(f"set_input_dimensions for input {v.name!r} (binding {i}): "
                                      f"shape {shape} does not fit the model's {v.shape}")
            if any(d < 1 for d in shape):
                raise ValidationError(f"set_input_dimensions for input {v.name!r}: {shape} has free dimensions")
            shapes[v] = shape
        return shapes

    def _plan(self, net, shapes):
        """Offsets of the intermediates: live from their node to their last reader."""
        bound = set(net.inputs) | set(net.outputs)
        nodes = self._nodes
        # Values sharing a slot (self._views: value -> the value that owns the slot): a reshape
        # of an intermediate is a view of it; an elementwise node writes over a source of its
        # shape that nothing reads later (in place: no second slot, and the source, just
        # written, is in cache). Of several such sources, the one produced last. A convolution
        # with a fused residual add accumulates over the residual's slot likewise (unless it
        # also reads that slot).
        self._views = {}
        last_reader = {v: t for t, n in enumerate(nodes) for v in n.inputs}
        produced = {n.outputs[0]: t for t, n in enumerate(nodes)}
        sharers = {}   # slot owner -> the values in its slot

        def owner(v):
            return self._views.get(v, v)

        def writable(v, t, node):   # v's slot is free after node t, which reads it only as v's shape
            return (shapes[v] == shapes[node.outputs[0]] and v.data_type == node.outputs[0].data_type
                    and all(last_reader.get(u, -1) <= t for u in sharers.get(owner(v), [v]))
                    and all(shapes[u] == shapes[v] for u in node.inputs if owner(u) == owner(v)))

        for t, n in enumerate(nodes):
            residual = n.attrs.get("residual") and owner(n.inputs[0]) != owner(n.inputs[1])
            if n.outputs[0] in bound or not (residual or n.kind in ("reshape",) + _IN_PLACE):
                continue
            sources = [v for v in (n.inputs[1:] if residual else n.inputs)
                       if v in produced and v not in bound and (n.kind == "reshape" or writable(v, t, n))]
            if sources:
                slot = owner(max(sources, key=produced.get))
                self._views[n.outputs[0]] = slot
                sharers.setdefault(slot, [slot]).append(n.outputs[0])
        last = {}
        for t, node in enumerate(nodes):
            for v in node.inputs:
                last[self._views.get(v, v)] = t
        order = [n.outputs[0] for n in nodes if n.outputs[0] not in bound and n.outputs[0] not in self._views]
        first = {n.outputs[0]: t for t, n in enumerate(nodes)}
        # ops that see an operand in another shape need it packed; a bound tensor's rows may be
        # padded, so they go through a packed slot (copied in before, out after the node)
        self._staging = {}
        for t, n in enumerate(nodes):
            slots = n.inputs + n.outputs
            staged = [0] if n.kind == "reshape" and all(v in bound for v in slots) else \
                [i for i, v in enumerate(slots) if v in bound] if n.kind in _PACKED_OPERANDS else []
            for i in staged:
                v = Value(net, f"{n.name}/staging{i}", shapes[slots[i]], slots[i].data_type)
                self._staging.setdefault(n, {})[i] = v
                shapes[v], first[v], last[v] = v.shape, t, t
                order.append(v)
        self._offsets = {}
        self.memory_stats = {"peak_bytes": 0, "requested_bytes": 0, "lower_bound_bytes": 0}
        if order:
            sizes = [math.prod(shapes[v]) * element_size(v.data_type) for v in order]
            for v, size in zip(order, sizes):
                if size > LIMIT:
                    raise ValidationError(f"{v.name!r} of shape {shapes[v]} would take {size} bytes "
                                          f"(more than 2**40): check the input shapes")
            offsets, self.memory_stats = _native.plan_arena(
                sizes, [first[v] for v in order], [last.get(v, first[v]) for v in order])
            self._offsets = {v: int(o) for v, o in zip(order, offsets)}
        self.intermediates_heap_size = int(self.memory_stats["peak_bytes"])

    def _compile(self, node):
        attrs, slots = node.attrs, node.inputs + node.outputs
        if node.kind == "neuron":
            d = NNNeuronDescriptor(attrs["neuron_type"], attrs["a"], attrs["b"], attrs["c"], attrs["prelu"])
            return _Step(node, lambda cb, ops, name: neuron_op(cb, d, ops[0], ops[1], name), slots)
        if node.kind in ("add", "sub", "mul", "div"):
            from mpskernels import arithmetic
            kernel = {"add": arithmetic.CNNAdd, "sub": arithmetic.CNNSubtract, "mul": arithmetic.CNNMultiply,
                      "div": arithmetic.CNNDivide}[node.kind](self.device)
            if attrs.get("clamp") is not None:
                kernel.minimum_value, kernel.maximum_value = attrs["clamp"]
            return _Step(node, lambda cb, ops, name: arithmetic_op(cb, kernel, *ops, name), slots)
        if node.kind == "transpose":
            perm = attrs["perm"]
            return _Step(node, lambda cb, ops, name: copy_op(cb, ops[0], ops[1], name, perm), slots)
        if node.kind == "reshape":
            if node.outputs[0] in self._views:   # a view: nothing to do
                return _Step(node, lambda cb, ops, name: None, [])
            return _Step(node, reshape_op, slots)
        if node.kind == "conv2d":
            kernel = _conv_kernel(self.device, attrs)
            return self._accumulating(node, lambda cb, x, y, name, acc: convolution_op(cb, kernel, x, y, name, acc))
        if node.kind == "gemm":
            w, neuron = attrs["weights"], attrs["neuron"]
            clamp = _clamp_of(*(CNNNeuronType.NONE, 0.0, 0.0) if neuron is None else
                              (neuron.neuron_type, neuron.a, neuron.b))
            if int(np.prod(self._shapes[node.inputs[0]][:-1])) == 1 and clamp is not None:
                # one row: mk_sgemm's matrix-vector path reads the weights once, 1.2-1.9x
                # faster than the 1x1 convolution (bench/test_bench_nn.py)
                wt = np.ascontiguousarray(w.T)
                bias = None if attrs["bias"] is None else np.array(attrs["bias"], np.float32)   # writable
                return self._accumulating(node, lambda cb, x, y, name, acc: gemv_op(cb, wt, bias, clamp, x, y, name, acc))
            kernel = _conv_kernel(self.device, {"weights": w.reshape(w.shape[0], 1, 1, w.shape[1]),
                                                "bias": attrs["bias"], "strides": (1, 1), "dilations": (1, 1),
                                                "pads": (0, 0, 0, 0), "groups": 1, "neuron": attrs["neuron"]})
            return self._accumulating(node, lambda cb, x, y, name, acc: gemm_op(cb, kernel, x, y, name, acc))
        if node.kind == "concat":
            axis = attrs["axis"] % len(self._shapes[node.outputs[0]])
            return _Step(node, lambda cb, ops, name: concat_op(cb, axis, ops, name), slots)
        if node.kind == "pool2d":
            n, h, w, c = self._shapes[node.inputs[0]]
            a = dict(attrs, kernel=attrs["kernel"] or (h, w))
            return _Step(node, lambda cb, ops, name: pool_op(cb, a, ops[0], ops[1], name), slots)
        if node.kind == "softmax":
            return _Step(node, lambda cb, ops, name: nn_rows_op(cb, _native.NN_SOFTMAX, *ops, name), slots)
        if node.kind == "unary":
            op = {"erf": _native.NN_ERF, "hard_swish": _native.NN_HARD_SWISH,
                  "gelu_tanh": _native.NN_GELU_TANH}[attrs["function"]]
            return _Step(node, lambda cb, ops, name: nn_rows_op(cb, op, *ops, name), slots)
        if node.kind == "layer_norm":
            shape = self._shapes[node.inputs[0]]
            a = attrs["axis"] % len(shape)
            inner = shape[a:]
            rows = (*shape[:a], int(np.prod(inner)))   # the normalised dimensions as one row
            scale, bias = (None if t is None else np.ascontiguousarray(np.broadcast_to(t, inner).reshape(-1))
                           for t in (attrs["scale"], attrs["bias"]))
            op = {"y": _native.NN_LAYER_NORM, "mean": _native.NN_LAYER_NORM_MEAN,
                  "inv_std_dev": _native.NN_LAYER_NORM_INV_STD}[attrs["output"]]
            out_rows = rows if attrs["output"] == "y" else rows[:-1] + (1,)
            eps = attrs["epsilon"]
            return _Step(node, lambda cb, ops, name: nn_rows_op(
                cb, op, _with(ops[0], rows), _with(ops[1], out_rows), name, eps, scale, bias), slots)
        if node.kind == "gather":
            index, value = attrs["index"], attrs["value"]
            return _Step(node, lambda cb, ops, name: gather_op(cb, index, value, *ops, name), slots)
        if node.kind == "resize_linear":
            tables = [attrs[k] for k in ("y0", "y1", "wy", "x0", "x1", "wx")]
            return _Step(node, lambda cb, ops, name: resize_op(cb, tables, *ops, name), slots)
        if node.kind == "reduce":
            rank = len(self._shapes[node.inputs[0]])
            op, axes = attrs["op"], sorted(a % rank for a in attrs["axes"])
            return _Step(node, lambda cb, ops, name: reduce_op(cb, op, axes, *ops, name), slots)
        if node.kind == "matmul":
            args = (attrs["transpose_a"], attrs["transpose_b"], attrs["alpha"])
            return _Step(node, lambda cb, ops, name: matmul_op(cb, *args, *ops, name), slots)
        if node.kind == "conv_transpose2d":
            kernel = _conv_transpose_kernel(self.device, attrs)
            return _Step(node, lambda cb, ops, name: convolution_op(cb, kernel, ops[0], ops[1], name), slots)
        raise ValidationError(f"node {node.name!r}: unknown op {node.kind!r}")

    def _accumulating(self, node, record):
        """The step of a convolution / GEMM, record(cb, x, y, name, accumulate). With a fused
        residual add ([x, r] -> y, _fuse_residual_adds) it accumulates into y holding r: r's
        own slot (in place, planned by _plan), else a copy of r made first."""
        slots = node.inputs + node.outputs
        if not node.attrs.get("residual"):
            return _Step(node, lambda cb, ops, name: record(cb, ops[0], ops[1], name, False), slots)
        in_place = node.outputs[0] in self._views

        def run(cb, ops, name):
            x, r, y = ops
            if not in_place:
                copy_op(cb, r, y, name)
            record(cb, x, y, name, True)

        return _Step(node, run, slots)

    @property
    def allocated_size(self):
        return 0


def _fuse_residual_adds(net, shapes):
    """The nodes a pipeline runs: net.nodes with each add(conv2d(x), r) (its clamp a ReLU or
    ReLUN, or none) whose convolution result nothing else reads made one conv2d node
    [x, r] -> the add's output, which accumulates into its destination (the kernels' epilogue:
    conv + bias + r, then the clamp): one pass over the output instead of three (write, read
    back, write). It runs where the add was (r may be computed after the convolution). The
    same for add(gemm(x), r) (a transformer's residual after its linear layer)."""
    readers = {}
    for n in net.nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    fused, dropped = {}, set()
    for n in net.nodes:
        if n.kind != "add":
            continue
        clamp = n.attrs["clamp"]
        if clamp is None:
            neuron = None
        elif clamp[0] == 0.0 and clamp[1] >= 0.0:
            neuron = NNNeuronDescriptor(CNNNeuronType.RELU) if clamp[1] == math.inf else \
                NNNeuronDescriptor(CNNNeuronType.RELUN, 0.0, clamp[1])
        else:
            continue
        for y, r in (n.inputs, n.inputs[::-1]):
            conv = y.producer
            if (conv is not None and conv.kind in ("conv2d", "gemm")
                    and (conv.attrs["neuron"] is None or conv.attrs["neuron"].neuron_type == CNNNeuronType.NONE)
                    and readers[y] == 1 and y not in net.outputs and r.data_type == y.data_type
                    and shapes[r] == shapes[y] == shapes[n.outputs[0]]):
                dropped.add(conv)
                fused[n] = Node(conv.kind, [conv.inputs[0], r], n.outputs,
                                dict(conv.attrs, neuron=neuron, residual=True), conv.name)
                break
    return [fused.get(n, n) for n in net.nodes if n not in dropped]


def _conv_descriptor(attrs):
    w = attrs["weights"]
    out_c, kh, kw, cin_g = w.shape
    d = CNNConvolutionDescriptor(kw, kh, cin_g * attrs["groups"], out_c)
    d.stride_in_pixels_y, d.stride_in_pixels_x = attrs["strides"]
    d.dilation_rate_y, d.dilation_rate_x = attrs["dilations"]
    d.groups = attrs["groups"]
    if attrs["neuron"] is not None:
        d.fused_neuron_descriptor = attrs["neuron"]
    return d


def _conv_kernel(device, attrs):
    w = attrs["weights"]
    _, kh, kw, _ = w.shape
    (dy, dx), (top, left, _, _) = attrs["dilations"], attrs["pads"]
    kernel = CNNConvolution.from_arrays(device, _conv_descriptor(attrs), w, attrs["bias"])
    # window of output i starts at i*stride - pad: its centre is offset + i*stride (§4.5)
    kernel.offset = Offset(((kw - 1) * dx + 1) // 2 - left, ((kh - 1) * dy + 1) // 2 - top, 0)
    return kernel


def _conv_transpose_kernel(device, attrs):
    """CNNConvolutionTranspose for ONNX ConvTranspose: the kernel flipped in both spatial axes
    (docs/convolution.md), the window start placed by kernel_offset (offset 0)."""
    w = attrs["weights"]
    _, kh, kw, _ = w.shape
    (dy, dx), (top, left, _, _) = attrs["dilations"], attrs["pads"]
    kernel = CNNConvolutionTranspose(device, _ArraySource(_conv_descriptor(attrs),
                                                          np.ascontiguousarray(w[:, ::-1, ::-1, :]), attrs["bias"]))
    kernel.kernel_offset_x = left - (kw - 1) * dx
    kernel.kernel_offset_y = top - (kh - 1) * dy
    return kernel


class Compiler:
    """MTL4Compiler."""

    def __init__(self, device):
        self.device = device

    def make_machine_learning_pipeline_state(self, descriptor):
        if not isinstance(descriptor, MachineLearningPipelineDescriptor):
            raise TypeError(f"expected a MachineLearningPipelineDescriptor, got {type(descriptor).__name__}")
        return MachineLearningPipelineState(self.device, descriptor)


class ArgumentTableDescriptor:
    def __init__(self, max_buffer_bind_count=31, max_texture_bind_count=0, max_sampler_state_bind_count=0):
        self.max_buffer_bind_count = max_buffer_bind_count
        self.max_texture_bind_count = max_texture_bind_count
        self.max_sampler_state_bind_count = max_sampler_state_bind_count


class ArgumentTable:
    """MTL4ArgumentTable: tensors bound to buffer indices (the pipeline's binding indices)."""

    def __init__(self, device, descriptor):
        if not isinstance(descriptor, ArgumentTableDescriptor):
            raise TypeError(f"expected an ArgumentTableDescriptor, got {type(descriptor).__name__}")
        count = descriptor.max_buffer_bind_count
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= 1 << 16:
            raise ValidationError(f"max_buffer_bind_count must be a positive integer, got {count!r}")
        self.device = device
        self.label = None
        self.max_buffer_bind_count = count
        self._tensors = {}

    def set_tensor(self, tensor, index):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"set_tensor takes a Tensor, got {type(tensor).__name__}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.max_buffer_bind_count:
            raise ValidationError(f"buffer index {index!r} is outside 0..{self.max_buffer_bind_count - 1} "
                                  f"(max_buffer_bind_count)")
        self._tensors[index] = tensor

    def set_resource(self, resource_id, buffer_index):
        """Apple's spelling: bind the tensor whose gpu_resource_id this is."""
        tensor = resource_by_id(resource_id)
        if not isinstance(tensor, Tensor):
            raise ValidationError(f"no live tensor has gpu_resource_id {resource_id!r}")
        self.set_tensor(tensor, buffer_index)


# ==== passes: encoders, barriers, fences, the validation layer ===============================

class Fence:
    """MTLFence: orders work in one pass after work in an earlier pass."""

    def __init__(self, device):
        self.device = device
        self.label = None


class _Dispatch:
    __slots__ = ("id", "pass_", "stage", "what", "reads", "writes", "ancestors")


class _PassLog:
    """Every dispatch of one command buffer's passes, what it reads and writes, and the
    orderings barriers and fences give; raises HazardError for unordered conflicts."""

    def __init__(self):
        self.passes = []
        self.dispatches = []

    def add(self, encoder, what, reads, writes):
        d = _Dispatch()
        d.id, d.pass_, d.stage, d.what = len(self.dispatches), encoder, encoder._stage, what
        d.reads, d.writes = reads, writes
        preds = []
        for kind, pos, after, before, source in encoder._orders:
            if not d.stage & before:
                continue
            if kind == "encoder":
                preds += [e for e in encoder._dispatches[:pos] if e.stage & after]
            elif kind == "queue":
                preds += [e for p in self.passes if p is not encoder for e in p._dispatches if e.stage & after]
            else:   # fence: source = (pass, position) of its update
                p, upto = source
                preds += [e for e in p._dispatches[:upto] if e.stage & after]
        for p in self.passes:
            if p is encoder:
                continue
            for pos, after, before_queue in p._producer_barriers:
                if d.stage & before_queue:
                    preds += [e for e in p._dispatches[:pos] if e.stage & after]
        ancestors = set()
        for e in preds:
            ancestors.add(e.id)
            ancestors |= e.ancestors
        d.ancestors = ancestors
        if encoder.device.validate_passes:
            for e in self.dispatches:
                if e.id not in ancestors:
                    self._check(e, d)
        encoder._dispatches.append(d)
        self.dispatches.append(d)

    @staticmethod
    def _check(e, d):
        """e is earlier than d and not ordered before it: they must not conflict."""
        for verb, mine, their_verb, theirs in (("reads", d.reads, "writes", e.writes),
                                               ("writes", d.writes, "writes", e.writes),
                                               ("writes", d.writes, "reads", e.reads)):
            for a0, a1, name in mine:
                for b0, b1, other in theirs:
                    if a0 < b1 and b0 < a1:
                        alias = f" (as {other})" if other != name else ""
                        if e.pass_ is d.pass_:
                            raise HazardError(
                                f"hazard in {d.pass_._name}: {d.what} {verb} {name}, which {e.what} "
                                f"{their_verb}{alias}, and no barrier_after_encoder_stages orders them")
                        raise HazardError(
                            f"hazard: {d.what} of {d.pass_._name} {verb} {name}, which {e.what} of "
                            f"{e.pass_._name} {their_verb}{alias}, and no barrier or fence orders the "
                            f"two passes: e.g. barrier_after_queue_stages({Stages(e.stage)!r}, "
                            f"{Stages(d.stage)!r}) in {d.pass_._name} before the dispatch")


class _Encoder:
    """MTL4CommandEncoder: barriers, fences, end_encoding."""

    _stage = Stages.DISPATCH
    _kind = "pass"

    def __init__(self, command_buffer):
        command_buffer._check_encodable()
        if command_buffer._encoder is not None:
            raise CommandBufferStateError(
                f"{command_buffer._encoder._name} is still encoding: call its end_encoding() before "
                f"making another encoder")
        log = command_buffer._pass_log
        if log is None:
            log = command_buffer._pass_log = _PassLog()
        self.command_buffer = command_buffer
        self.device = command_buffer.device
        self._log = log
        self._index = len(log.passes)
        self._label = None
        self._dispatches = []
        self._orders = []              # (kind, position, after stages, before stages, fence source)
        self._producer_barriers = []   # (position, after stages, before queue stages)
        self._ended = False
        self._retained = []            # what the commands point into: alive until the buffer is
        log.passes.append(self)
        command_buffer._encoder = self

    @property
    def label(self):
        return self._label

    @label.setter
    def label(self, value):
        self._label = value

    @property
    def _name(self):
        return f"{self._kind} {self._label!r}" if self._label else f"{self._kind} {self._index}"

    def __repr__(self):
        return f"<{type(self).__name__} {self._name}>"

    def _check_open(self, what):
        if self._ended:
            raise CommandBufferStateError(f"{what} on {self._name} after end_encoding(): make a new encoder")

    def _stages(self, value, what):
        try:
            return Stages(value)
        except (ValueError, TypeError):
            raise ValidationError(f"{what} must be Stages, got {value!r}") from None

    def barrier_after_queue_stages(self, after_queue_stages, before_stages,
                                   visibility_options=VisibilityOptions.DEVICE):
        """Consumer barrier: this pass's before_stages work (encoded after this call) waits for
        the after_queue_stages work of every earlier pass of the queue."""
        self._check_open("barrier_after_queue_stages")
        VisibilityOptions(visibility_options)
        self._orders.append(("queue", len(self._dispatches), self._stages(after_queue_stages, "after_queue_stages"),
                             self._stages(before_stages, "before_stages"), None))

    def barrier_after_stages(self, after_stages, before_queue_stages,
                             visibility_options=VisibilityOptions.DEVICE):
        """Producer barrier: later passes' before_queue_stages work waits for this pass's
        after_stages work encoded so far."""
        self._check_open("barrier_after_stages")
        VisibilityOptions(visibility_options)
        self._producer_barriers.append((len(self._dispatches), self._stages(after_stages, "after_stages"),
                                        self._stages(before_queue_stages, "before_queue_stages")))

    def barrier_after_encoder_stages(self, after_encoder_stages, before_encoder_stages,
                                     visibility_options=VisibilityOptions.DEVICE):
        """Intra-pass barrier: later work of this pass waits for earlier work of this pass."""
        self._check_open("barrier_after_encoder_stages")
        VisibilityOptions(visibility_options)
        self._orders.append(("encoder", len(self._dispatches),
                             self._stages(after_encoder_stages, "after_encoder_stages"),
                             self._stages(before_encoder_stages, "before_encoder_stages"), None))

    def update_fence(self, fence, after_encoder_stages):
        self._check_open("update_fence")
        if not isinstance(fence, Fence):
            raise TypeError(f"update_fence takes a Fence, got {type(fence).__name__}")
        fence._update = (self, len(self._dispatches), self._stages(after_encoder_stages, "after_encoder_stages"),
                         self.command_buffer)

    def wait_for_fence(self, fence, before_encoder_stages):
        self._check_open("wait_for_fence")
        update = getattr(fence, "_update", None)
        if update is None or update[3] is not self.command_buffer or update[0] is self:
            raise ValidationError(f"wait_for_fence in {self._name}: no earlier pass of this command "
                                  f"buffer updated the fence (update_fence first, in the producing pass)")
        encoder, position, after, _ = update
        self._orders.append(("fence", len(self._dispatches), after,
                             self._stages(before_encoder_stages, "before_encoder_stages"), (encoder, position)))

    def end_encoding(self):
        self._check_open("end_encoding")
        self._ended = True
        self.command_buffer._encoder = None

    def _dispatch(self, what, reads, writes):
        """Register one dispatch's memory with the pass log (hazard check) before recording."""
        self._log.add(self, what, [(*op.span(), op.name) for op in reads],
                      [(*op.span(), op.name) for op in writes])


# kernel class -> (number of sources, record function(cb, kernel, *sources, destination, name))
TENSOR_OPS = {
    CNNNeuron: (1, neuron_op),
    CNNArithmetic: (2, arithmetic_op),
    _ConvolutionBase: (1, convolution_op),
}


class ComputeCommandEncoder(_Encoder):
    """A compute pass (stage DISPATCH) whose tensor operations run our kernels on tensors:
    encode(kernel, *sources, destination) for a CNNNeuron, a CNNArithmetic (NumPy
    broadcasting) or a CNNConvolution (NHWC tensors); copy(source, destination)."""

    _stage = Stages.DISPATCH
    _kind = "compute pass"

    def encode(self, kernel, *tensors):
        self._check_open("encode")
        self.command_buffer._check_encodable()
        for cls, (count, record) in TENSOR_OPS.items():
            if isinstance(kernel, cls):
                break
        else:
            raise TypeError(f"{type(kernel).__name__} has no tensor operation; supported: "
                            f"{', '.join(c.__name__ for c in TENSOR_OPS)}")
        if len(tensors) != count + 1:
            raise ValidationError(f"{kernel!r} takes {count} source tensor(s) and a destination, "
                                  f"got {len(tensors)} tensors")
        ops = [_tensor_operand(t) for t in tensors]
        self._retained += tensors
        what = f"dispatch {len(self._dispatches)} ({type(kernel).__name__})"
        self._dispatch(what, ops[:-1], ops[-1:])
        record(self.command_buffer, kernel, *ops, what)

    def copy(self, source, destination):
        self._check_open("copy")
        self.command_buffer._check_encodable()
        ops = [_tensor_operand(source), _tensor_operand(destination)]
        self._retained += (source, destination)
        what = f"dispatch {len(self._dispatches)} (copy)"
        self._dispatch(what, ops[:1], ops[1:])
        copy_op(self.command_buffer, ops[0], ops[1], what)


class MachineLearningCommandEncoder(_Encoder):
    """MTL4MachineLearningCommandEncoder: runs a pipeline's network (stage MACHINE_LEARNING)."""

    _stage = Stages.MACHINE_LEARNING
    _kind = "machine-learning pass"

    def __init__(self, command_buffer):
        super().__init__(command_buffer)
        self._pipeline = None
        self._table = None

    def set_pipeline_state(self, pipeline_state):
        self._check_open("set_pipeline_state")
        if not isinstance(pipeline_state, MachineLearningPipelineState):
            raise TypeError(f"expected a MachineLearningPipelineState, got {type(pipeline_state).__name__}")
        self._pipeline = pipeline_state

    def set_argument_table(self, argument_table):
        self._check_open("set_argument_table")
        if not isinstance(argument_table, ArgumentTable):
            raise TypeError(f"expected an ArgumentTable, got {type(argument_table).__name__}")
        self._table = argument_table

    def dispatch_network(self, intermediates_heap):
        """Run the pipeline's network on the bound tensors, intermediates in the heap."""
        self._check_open("dispatch_network")
        self.command_buffer._check_encodable()
        state, table = self._pipeline, self._table
        where = f"dispatch_network in {self._name}"
        if state is None or table is None:
            raise ValidationError(f"{where}: set_pipeline_state and set_argument_table first")
        if not isinstance(intermediates_heap, Heap):
            raise TypeError(f"{where}: intermediates_heap must be a Heap, got {type(intermediates_heap).__name__}")
        if intermediates_heap.size < state.intermediates_heap_size:
            raise ValidationError(
                f"{where}: the intermediates heap has {intermediates_heap.size} bytes; the pipeline "
                f"needs intermediates_heap_size = {state.intermediates_heap_size}")
        operands = {}
        heap_base = intermediates_heap._address()
        heap_op = _HeapRange(heap_base, state.intermediates_heap_size) if state.intermediates_heap_size else None
        for binding in state.reflection.bindings:
            tensor = table._tensors.get(binding.index)
            label = f"binding {binding.name!r} (index {binding.index})"
            if tensor is None:
                raise ValidationError(f"{where}: no tensor bound for {label}; argument_table.set_tensor(tensor, {binding.index})")
            if tensor.data_type != binding.data_type:
                raise ValidationError(f"{where}: {label} takes {binding.data_type.name}, the bound "
                                      f"tensor is {tensor.data_type.name}")
            if tensor.dimensions != binding.dimensions:
                raise ValidationError(f"{where}: {label} takes shape {binding.dimensions.shape} "
                                      f"(extents {list(binding.dimensions)}), the bound tensor has "
                                      f"{tensor.shape}")
            if not tensor.usage & TensorUsage.MACHINE_LEARNING:
                raise ValidationError(f"{where}: the tensor for {label} lacks TensorUsage.MACHINE_LEARNING")
            op = _tensor_operand(tensor, f"{label} ({tensor!r})")
            if heap_op is not None and _overlapping(op, heap_op):
                raise ValidationError(f"{where}: the tensor for {label} lies in the intermediates heap's "
                                      f"first {state.intermediates_heap_size} bytes, which the network overwrites")
            operands[state.network.inputs[binding.index] if binding.index < len(state.network.inputs)
                     else state.network.outputs[binding.index - len(state.network.inputs)]] = op
        outputs = [operands[v] for v in state.network.outputs]
        for i, a in enumerate(outputs):
            for b in list(operands.values()):
                if a is not b and _overlapping(a, b):
                    raise ValidationError(f"{where}: {a.name} overlaps {b.name}")
        self._retained += (state, intermediates_heap, *table._tensors.values())
        what = f"dispatch {len(self._dispatches)} (network {state.network.name!r})"
        extra = [heap_op] if heap_op is not None else []
        self._dispatch(what, [operands[v] for v in state.network.inputs] + extra, outputs + extra)
        cb = self.command_buffer
        bound = [operands[v] for v in state.network.inputs + state.network.outputs]
        regions = _Recording.regions(heap_op, bound)
        suffix = f" of {what} in {self._name}"
        recording = state._recording
        if recording is not None and regions is not None and recording.replay(cb, regions, bound, suffix):
            return
        for v in state.network.constants:
            operands[v] = _Operand(v.data.ctypes.data, v.shape, _packed(v.shape), v.data_type,
                                   f"constant {v.name!r}")
        for v, offset in state._offsets.items():
            operands[v] = _Operand(heap_base + offset, state._shapes[v], _packed(state._shapes[v]),
                                   v.data_type, f"intermediate {v.name!r}")
        for v, root in state._views.items():
            operands[v] = _with(operands[root], state._shapes[v])
            operands[v].name = f"intermediate {v.name!r} (in the slot of {root.name!r})"
        first = len(cb._commands)
        cb._relocations = []
        try:
            for step in state._steps:
                step.run(cb, [operands[v] for v in step.slots], f"node {step.node.name!r} ({step.node.kind}){suffix}")
            relocations = cb._relocations
        finally:
            cb._relocations = None
        if regions is not None:
            state._recording = _Recording(cb, cb._commands[first:], relocations, regions, bound, suffix)


class _Recording:
    """The commands of a pipeline's last recorded dispatch, replayed by its next dispatches so
    that no node is encoded again (Python's share of a run). Operands in the intermediates heap
    or in a bound tensor are re-pointed when those lie elsewhere; that changes the commands, so
    a replay needs every command buffer holding them to have finished (else the dispatch
    records afresh). Bound tensors with other strides or formats record afresh too."""

    def __init__(self, cb, commands, relocations, regions, bound, suffix):
        self.commands, self.suffix = commands, suffix
        self.layout = _Recording._layout(bound)
        self.spans = regions   # [(start, end)] of the last dispatch's regions
        self.moves = []   # (set the address, region index, byte offset in the region)
        for set_address, address in relocations:
            for i, (r0, r1) in enumerate(regions):
                if r0 <= address < r1:
                    self.moves.append((set_address, i, address - r0))
                    break   # else a constant of the pipeline: it never moves
        self.users = [weakref.ref(cb)]
        self.lock = threading.Lock()

    @staticmethod
    def _layout(bound):
        return [(op.shape, op.strides, op._format) for op in bound]

    @staticmethod
    def regions(heap_op, bound):
        """[(start, end)]: the intermediates heap and each bound tensor, or None if two of them
        overlap (an address would not tell which one it is in)."""
        spans = [heap_op.span() if heap_op is not None else (0, 0)] + [op.span() for op in bound]
        return spans if _Recording.disjoint(spans) else None

    @staticmethod
    def disjoint(spans):
        ordered = sorted(s for s in spans if s[0] < s[1])
        return not any(a[1] > b[0] for a, b in zip(ordered, ordered[1:]))

    def replay(self, cb, regions, bound, suffix):
        """Add the recorded commands to cb, re-pointed to these regions; False if it cannot."""
        if _Recording._layout(bound) != self.layout:
            return False
        return self.replay_regions(cb, regions, suffix)

    def replay_regions(self, cb, regions, suffix=None):
        """replay() for regions known to hold what the recorded ones held, laid out alike
        (Session's runs without encoding); suffix None: the descriptions stay."""
        with self.lock:
            for ref in self.users:
                user = ref()
                if user is not None and not user._finished:
                    return False
            self.users = [weakref.ref(cb)]
            old, bases = [r0 for r0, _ in self.spans], [r0 for r0, _ in regions]
            if bases != old:
                for set_address, i, offset in self.moves:
                    if bases[i] != old[i]:
                        set_address(bases[i] + offset)
            self.spans = regions
            if suffix is not None and suffix != self.suffix:   # failures name the dispatch and the pass
                for command in self.commands:
                    if isinstance(command.description, str) and command.description.endswith(self.suffix):
                        command.description = command.description[:-len(self.suffix)] + suffix
                self.suffix = suffix
        cb._add_recorded(self.commands, ())
        return True


class _HeapRange:
    """The intermediates region of a heap, for the hazard check."""
    __slots__ = ("address", "nbytes", "name")

    def __init__(self, address, nbytes):
        self.address, self.nbytes, self.name = address, nbytes, "the intermediates heap"

    def span(self):
        return self.address, self.address + self.nbytes


# the package format, the ONNX builder and the session live in their own modules
from mpskernels.ml_package import build_package, load_package, save_package  # noqa: E402,F401
from mpskernels.ml_session import NodeArg, Session  # noqa: E402,F401
