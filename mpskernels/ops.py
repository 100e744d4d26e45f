"""mpskernels.ops: one-off calls on NumPy arrays, in the shape NumPy and torch.nn.functional
users know: conv2d, conv_transpose2d, linear, matmul, max_pool2d / avg_pool2d, the reductions
(sum, mean, max, min, argmax, argmin), softmax, layer_norm and the neurons (relu, sigmoid,
gelu, ...).

Every call runs our kernels (src/conv, src/gemm, src/pool, src/reduce, src/elementwise, src/nn)
straight away: the commands a kernel would record on a command buffer run on the calling
thread over the device's thread pool, with the GIL released, directly on the arrays (no
queue, no images, no arena). There is no NumPy fallback for the arithmetic.

- device: a Device, default create_system_default_device(); its num_threads is the thread
  count. Results are bitwise the same for any thread count.
- Arrays are float32 (TypeError otherwise; argmax / argmin give int64 like NumPy). Any
  strides work: what a kernel can read in place is read in place (a transposed operand of
  matmul, a channels-last view given as NCHW), anything else is copied first.
- out=: an array of exactly the result's shape and dtype. It may overlap the inputs (the
  result is then made aside and copied in, as NumPy does).
- Layouts: conv and pooling take layout="NCHW" (default, PyTorch's) or "NHWC". Weights are
  PyTorch's whatever the layout: conv2d (out, in/groups, kh, kw), conv_transpose2d
  (in, out/groups, kh, kw). An NCHW result is C-contiguous, except that an input whose
  memory is channels-last (x.transpose(0, 3, 1, 2) of an NHWC array) gives a channels-last
  result, as PyTorch's memory format does; the kernels run channels-last, so other NCHW
  inputs and results are copied (by the copy kernel) on the way in and out.

Convolution weights are packed once per (weights array, bias, geometry, activation) and kept
in a per-device cache (up to 64 kernels, LRU; clear_cache() empties it). The cache is never
stale: it keeps a copy of the weights and bias it packed, and each call compares the arrays
with it bit for bit, so a changed array is repacked. The compare reads both: 0.1 ms per MB
of weights when they are in cache, up to ~0.7 ms per MB from memory; packing costs more
(42 ms for a 3x3 256->256 Winograd kernel; repacking a 3x3 512->512 igemm on every call was
twice as slow as checking it). docs/ops.md has the figures."""
import builtins
import ctypes
import math
import threading
import weakref
from collections import OrderedDict

import numpy as np

from mpskernels import _native
from mpskernels.device import Device, create_system_default_device
from mpskernels.enums import CNNNeuronType as T
from mpskernels.matrix import _clamp_of
from mpskernels.ml import (_conv_kernel, _conv_transpose_kernel, _Operand, convolution_op, copy_op,
                           neuron_op, pool_op)
from mpskernels.neuron import NNNeuronDescriptor
from mpskernels.reduction import (ARGMAX, ARGMIN, COLUMN, FEATURE_CHANNELS, MAX, MEAN, MIN,
                                  SUM)

# sum, max, min and abs are left out: a star import must not hide the builtins
__all__ = ["conv2d", "conv_transpose2d", "linear", "matmul", "max_pool2d", "avg_pool2d",
           "mean", "amax", "amin", "argmax", "argmin", "neuron", "relu", "leaky_relu", "relu6",
           "prelu", "elu", "gelu", "sigmoid", "hardsigmoid", "tanh", "softplus", "softsign",
           "absolute", "exp", "log", "power", "erf", "hardswish", "softmax", "layer_norm",
           "clear_cache"]

_INT32_MAX = (1 << 31) - 1
_F32 = 4   # mk_format of float32


# ==== running: commands recorded as on a command buffer, run at once ==========================

class _Now:
    """Stands in for a command buffer: the kernels' encode paths record into it (`_add`),
    run() runs the commands in order on the calling thread with the device's pool. It keeps
    every array it hands out an address of alive until then (`keep`)."""
    __slots__ = ("commands", "keep")

    def __init__(self):
        self.commands = []
        self.keep = []

    def op(self, a, name):
        """The operand (as ml.py's tensor operations take) of an array the commands use."""
        self.keep.append(a)
        return _ArrayOperand(a, name)

    def copy(self, src, dst):
        """Record dst = src: float32 arrays of one shape, rank <= 4, extents < 2**31."""
        shape = (1,) * (4 - src.ndim) + src.shape
        command = _native.ElementwiseCommand.copy(shape)
        for k, a in enumerate((src, dst)):
            self.keep.append(a)
            command.set_operand(k, _address(a), _F32, *(0,) * (4 - a.ndim), *_strides(a))
        command.description = "ops: copy"
        self.commands.append(command)

    def _add(self, command, operands, description):
        for k, (op, byte_offset, (sn, sy, sx, sc)) in enumerate(operands):
            command.set_operand(k, op._root._address() + byte_offset, op._format, sn, sy, sx, sc)
        command.description = description
        self.commands.append(command)

    def run(self, device):
        for command in self.commands:
            command.run(device._pool)


class _ArrayOperand(_Operand):
    """A float32 array as an ml.py operand (made without the data-type lookups)."""
    __slots__ = ()

    def __init__(self, a, name):
        self.address, self.shape, self.strides = _address(a), a.shape, _strides(a)
        self._format, self.esize, self.name = _F32, 4, name
        self.nbytes = (builtins.sum((d - 1) * s for d, s in zip(self.shape, self.strides)) + 1) * 4


def _device(device):
    if device is None:
        return create_system_default_device()
    if not isinstance(device, Device):
        raise TypeError(f"device must be an mpskernels Device or None, got {type(device).__name__}")
    return device


# ==== arrays ===================================================================================

def _array(x, name, ndim=None, what=""):
    """x, checked: a float32 ndarray (of ndim dimensions); a NumPy scalar as a 0-d one."""
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__} "
                        f"(np.asarray({name}, np.float32))")
    if x.dtype != np.float32:
        raise TypeError(f"{name} has dtype {x.dtype}; ops compute in float32: pass "
                        f"{name}.astype(np.float32)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D{what}, got shape {x.shape}")
    return x


def _walkable(x):
    """Whether kernels can walk x's strides: positive multiples of 4 bytes, aligned."""
    flags = x.flags
    return flags.aligned and (flags.c_contiguous or all(
        s > 0 and s % 4 == 0 for d, s in zip(x.shape, x.strides) if d > 1))


def _readable(x):
    """x, or a C-contiguous copy if kernels cannot walk its strides."""
    return x if _walkable(x) else np.ascontiguousarray(x)


def _strides(a):
    """Element strides; a dimension of extent 1 gets the stride it would have if packed."""
    if 1 not in a.shape:
        return tuple(s >> 2 for s in a.strides)
    out, packed = [], 1
    for d, s in zip(reversed(a.shape), reversed(a.strides)):
        out.append(s >> 2 if d > 1 else packed)
        packed = out[-1] * d
    return tuple(reversed(out))


def _address(a):
    """The address of a's first element. ctypes reads a writable C-contiguous array's in a
    third of the time __array_interface__ takes (which builds a dict)."""
    flags = a.flags
    if flags.writeable and flags.c_contiguous and a.size:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.__array_interface__["data"][0]


def _contiguous(a):
    return a.flags.c_contiguous and a.flags.aligned


def _out(out, shape, inputs, dtype=np.float32, writable=_contiguous):
    """(result, target): the array returned (out, checked, or a new one) and the one the
    kernel writes — result itself, or a new array to copy into out afterwards when out
    overlaps an input or writable(out) is false."""
    if out is None:
        result = np.empty(shape, dtype)
        return result, result
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; this result is {np.dtype(dtype)}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}; the result has shape {tuple(shape)}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if not writable(out) or any(np.may_share_memory(out, x) for x in inputs):
        return out, np.empty(shape, dtype)
    return out, out


def _finish(now, device, result, target):
    """Run, with a copy of target into result (out) last if the kernels wrote aside."""
    if target is not result and result.dtype == np.float32 and _walkable(result):
        copy_op(now, now.op(target, "result"), now.op(result, "out"), "ops: copy to out")
        target = result
    now.run(device)
    if target is not result:   # out with strides no kernel takes, or indices as int64
        result[...] = target
    return result


def _packed(now, x):
    """x if C-contiguous, else a C-contiguous copy recorded on now."""
    if _contiguous(x):
        return x
    packed = np.empty(x.shape, np.float32)
    copy_op(now, now.op(_readable(x), "x"), now.op(packed, "x (copy)"), "ops: copy")
    return packed


def _pair(value, name, minimum=1):
    if type(value) is int and value >= minimum:
        return value, value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (y, x), got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _layout(layout):
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


# ==== channels-last views of 4-D operands ======================================================

def _nhwc_source(now, x, layout):
    """x as an (N, H, W, C) view with channels contiguous: in place if x allows, else a copy
    recorded on `now`. Returns (view, whether x's memory was already channels-last)."""
    v = x if layout == "NHWC" else x.transpose(0, 2, 3, 1)
    if _walkable(v) and (v.strides[3] == 4 or v.shape[3] == 1):
        return v, True
    packed = np.empty(v.shape, np.float32)
    now.copy(_readable(v), packed)
    return packed, False


def _nhwc_result(n, h, w, c, layout, channels_last, out, inputs):
    """(result in the caller's layout, the NHWC array the kernel writes, and the NHWC view
    of result to copy that into afterwards, or None if the kernel writes result itself)."""
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    if out is None and (layout == "NHWC" or channels_last):
        nhwc = np.empty((n, h, w, c), np.float32)
        return (nhwc if layout == "NHWC" else nhwc.transpose(0, 3, 1, 2)), nhwc, None
    result, target = _out(out, shape, inputs, writable=_walkable)
    view = result if layout == "NHWC" else result.transpose(0, 2, 3, 1)
    if target is result and (view.strides[3] == 4 or view.shape[3] == 1):
        return result, view, None
    return result, np.empty((n, h, w, c), np.float32), view


def _nhwc_finish(now, device, result, nhwc, view):
    """Run, copying the NHWC result into result's view last if it was made aside."""
    if view is not None and _walkable(view):
        now.copy(nhwc, view)
        view = None
    now.run(device)
    if view is not None:   # out with strides no kernel takes (negative, misaligned)
        view[...] = nhwc
    return result


# ==== neurons ====================================================================================

_ACTIVATIONS = {
    "relu": (T.RELU,), "relu6": (T.RELUN, 0.0, 6.0), "sigmoid": (T.SIGMOID,),
    "hardsigmoid": (T.HARD_SIGMOID, 1 / 6, 0.5), "tanh": (T.TANH, 1.0, 1.0),
    "gelu": (T.GELU,), "elu": (T.ELU, 1.0), "softplus": (T.SOFT_PLUS, 1.0, 1.0),
    "softsign": (T.SOFT_SIGN,), "abs": (T.ABSOLUTE,),
}


def _descriptor(activation, name="activation"):
    if activation is None:
        return None
    if isinstance(activation, NNNeuronDescriptor):
        return activation
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return NNNeuronDescriptor(*_ACTIVATIONS[activation])
    raise ValueError(f"{name} must be None, an NNNeuronDescriptor or one of "
                     f"{', '.join(sorted(_ACTIVATIONS))}; got {activation!r}")


def neuron(x, descriptor, *, axis=-1, out=None, device=None):
    """descriptor's function of every element of x (an NNNeuronDescriptor, or a name as
    conv2d's activation takes). PReLU's slopes run along `axis`."""
    d = _descriptor(descriptor, "descriptor")
    if d is None:
        raise ValueError("descriptor must not be None")
    return _neuron(x, d, axis, out, device)


def _flat(a, b):
    """Whether a and b hold their elements in one memory order, without gaps."""
    return (a.flags.c_contiguous and b.flags.c_contiguous
            or a.flags.f_contiguous and b.flags.f_contiguous) and a.flags.aligned


def _neuron(x, d, axis, out, device):
    device = _device(device)
    x = _array(x, "x")
    if out is None:
        result = target = np.empty_like(x)   # x's memory order: its strides merge alike
    else:   # out may be x itself: the kernel reads and writes each element in place
        result, target = _out(out, x.shape, () if out is x else (x,), writable=_walkable)
    if x.size == 0:
        return result
    now = _Now()
    t = d.neuron_type
    if t != T.PRELU and x.size <= _INT32_MAX and _flat(x, target):   # the common case
        command = _native.ElementwiseCommand.neuron((1, 1, 1, x.size), int(t), d.a, d.b, d.c)
        command.set_operand(0, _address(x), _F32, 0, 0, 0, 1)
        command.set_operand(1, _address(target), _F32, 0, 0, 0, 1)
        command.description = f"ops: {t.name.lower()}"
        now.commands.append(command)
        return _finish(now, device, result, target)
    src, dst = _readable(x).reshape(x.shape or (1,)), target.reshape(x.shape or (1,))
    if t == T.PRELU and x.ndim > 1:   # slopes along the innermost operand axis
        axis = _axes(axis, x.ndim, "axis")[0]
        order = [i for i in range(x.ndim) if i != axis] + [axis]
        src, dst = src.transpose(order), dst.transpose(order)
    neuron_op(now, d, now.op(src, "x"), now.op(dst, "out"), f"ops: {t.name.lower()}")
    return _finish(now, device, result, target)


# descriptors of the neurons without parameters, made once (never handed out)
_RELU, _RELU6, _GELU, _SIGMOID, _TANH, _SOFTSIGN, _ABS, _EXP, _LOG = (
    NNNeuronDescriptor(T.RELU), NNNeuronDescriptor(T.RELUN, 0.0, 6.0), NNNeuronDescriptor(T.GELU),
    NNNeuronDescriptor(T.SIGMOID), NNNeuronDescriptor(T.TANH, 1.0, 1.0),
    NNNeuronDescriptor(T.SOFT_SIGN), NNNeuronDescriptor(T.ABSOLUTE),
    NNNeuronDescriptor(T.EXPONENTIAL, 1.0, 0.0, -1.0), NNNeuronDescriptor(T.LOGARITHM, 1.0, 0.0, -1.0))


def relu(x, *, out=None, device=None):
    """max(x, 0)."""
    return _neuron(x, _RELU, -1, out, device)


def leaky_relu(x, negative_slope=0.01, *, out=None, device=None):
    """x if x >= 0 else negative_slope * x."""
    return _neuron(x, NNNeuronDescriptor(T.RELU, negative_slope), -1, out, device)


def relu6(x, *, out=None, device=None):
    """min(max(x, 0), 6)."""
    return _neuron(x, _RELU6, -1, out, device)


def prelu(x, weight, *, axis=1, out=None, device=None):
    """x if x >= 0 else weight[c] * x, c the index along `axis` (PyTorch: the channels,
    axis 1; a 1-D x: axis 0); weight has one slope, or one per index of that axis."""
    x, slopes = _array(x, "x"), _array(weight, "weight").reshape(-1)
    if x.ndim < 2:
        axis = 0
    channels = x.shape[_axes(axis, x.ndim)[0]] if x.ndim else 1
    if slopes.size not in (1, channels):
        raise ValueError(f"prelu: weight has {slopes.size} slopes; x {x.shape} has {channels} "
                         f"along axis {axis}: give one, or one per index")
    return _neuron(x, NNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes), axis, out, device)


def elu(x, alpha=1.0, *, out=None, device=None):
    """x if x >= 0 else alpha * (exp(x) - 1)."""
    return _neuron(x, NNNeuronDescriptor(T.ELU, alpha), -1, out, device)


def gelu(x, approximate="none", *, out=None, device=None):
    """0.5 x (1 + erf(x / sqrt 2)), or with approximate='tanh'
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as PyTorch."""
    if approximate == "tanh":
        return _elementwise_rows(_native.NN_GELU_TANH, x, out, device)
    if approximate != "none":
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _neuron(x, _GELU, -1, out, device)


def sigmoid(x, *, out=None, device=None):
    """1 / (1 + exp(-x))."""
    return _neuron(x, _SIGMOID, -1, out, device)


def hardsigmoid(x, alpha=1 / 6, beta=0.5, *, out=None, device=None):
    """clamp(alpha x + beta, 0, 1); the defaults are PyTorch's (ONNX: alpha=0.2)."""
    return _neuron(x, NNNeuronDescriptor(T.HARD_SIGMOID, alpha, beta), -1, out, device)


def tanh(x, *, out=None, device=None):
    return _neuron(x, _TANH, -1, out, device)


def softplus(x, beta=1.0, *, out=None, device=None):
    """log(1 + exp(beta x)) / beta (PyTorch's, without its threshold)."""
    return _neuron(x, NNNeuronDescriptor(T.SOFT_PLUS, 1.0 / beta, beta), -1, out, device)


def softsign(x, *, out=None, device=None):
    """x / (1 + |x|)."""
    return _neuron(x, _SOFTSIGN, -1, out, device)


def absolute(x, *, out=None, device=None):
    return _neuron(x, _ABS, -1, out, device)


def exp(x, *, out=None, device=None):
    return _neuron(x, _EXP, -1, out, device)


def log(x, *, out=None, device=None):
    """The natural logarithm."""
    return _neuron(x, _LOG, -1, out, device)


def power(x, exponent, *, out=None, device=None):
    """x ** exponent (a number)."""
    return _neuron(x, NNNeuronDescriptor(T.POWER, 1.0, 0.0, exponent), -1, out, device)


# ==== convolution ================================================================================

_CACHE_SIZE = 64
_cache_lock = threading.Lock()
_cached_devices = weakref.WeakSet()


def _cache(device):
    """device's kernels: an LRU OrderedDict key -> (kernel, weights copy, bias copy). It lives
    on the device (kernels refer to their device: a cache beside it would keep it alive)."""
    cache = device.__dict__.get("_ops_kernels")
    if cache is None:
        cache = device.__dict__.setdefault("_ops_kernels", OrderedDict())
        _cached_devices.add(device)
    return cache


def clear_cache(device=None):
    """Drop the packed convolution weights kept for `device` (None: every device)."""
    with _cache_lock:
        for d in [device] if device is not None else list(_cached_devices):
            d.__dict__.get("_ops_kernels", {}).clear()


def _same_bits(a, b):
    """Whether a (any strides) holds exactly the bits of b (a copy of it taken earlier)."""
    if b.nbytes <= 1 << 16:
        return a.tobytes() == b.tobytes()   # for small arrays a memcmp is the quickest
    return bool((a.view(np.uint32) == b.view(np.uint32)).all())


def _identity(a):
    return None if a is None else (_address(a), a.shape, a.strides)


def _cached_kernel(device, key, weight, bias, make):
    """The kernel for `key`, built by make() unless the cache holds one packed from arrays
    with the same bits as weight and bias now."""
    key = (key, _identity(weight), _identity(bias))
    with _cache_lock:
        cache = _cache(device)
        entry = cache.get(key)
        if entry is not None:
            cache.move_to_end(key)
    if entry is not None:
        kernel, w, b = entry
        if _same_bits(weight, w) and (bias is None or _same_bits(bias, b)):
            return kernel
    kernel = make()
    entry = (kernel, weight.copy(), None if bias is None else bias.copy())
    with _cache_lock:
        cache[key] = entry
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return kernel


def _bias(bias, channels):
    if bias is None:
        return None
    bias = _array(bias, "bias", 1)
    if bias.shape[0] != channels:
        raise ValueError(f"bias has {bias.shape[0]} values; one per output channel "
                         f"({channels}) is needed")
    return bias


def _neuron_key(d):
    if d is None:
        return None
    data = None if d.data is None else np.asarray(d.data, np.float32).tobytes()
    return (int(d.neuron_type), d.a, d.b, d.c, data)


def _padding(padding, k, dilation, stride):
    """((top, bottom), (left, right)) from an int, (y, x), ((top, bottom), (left, right)),
    'valid' or 'same' (stride 1; the odd pixel at the bottom / right, as PyTorch)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in PyTorch); give the pads")
        total = [d * (kk - 1) for d, kk in zip(dilation, k)]
        return tuple((t // 2, t - t // 2) for t in total)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 \
            and all(isinstance(p, (tuple, list)) for p in padding):
        pads = [_pair(p, "padding", 0) for p in padding]
        return pads[0], pads[1]
    py, px = _pair(padding, "padding", 0)
    return (py, py), (px, px)


def _conv_attrs(weights, bias, stride, dilation, top_left, groups, neuron):
    """The attributes ml.py's convolution kernel makers take."""
    return dict(weights=weights, bias=None if bias is None else np.ascontiguousarray(bias),
                strides=stride, dilations=dilation, pads=(*top_left, 0, 0), groups=groups,
                neuron=neuron)


def _conv_shapes(x, weight, layout, groups, channels_per_group, what):
    n, c, h, w = x.shape if layout == "NCHW" else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if c != channels_per_group * groups:
        raise ValueError(f"x has {c} channels ({layout}); weight {weight.shape} {what} with "
                         f"groups={groups} needs {channels_per_group * groups}")
    return n, c, h, w


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           layout="NCHW", activation=None, out=None, device=None):
    """2-D convolution (cross-correlation) as torch.nn.functional.conv2d, activation fused.

    x: (N, C, H, W), or (N, H, W, C) with layout="NHWC". weight: (out, C/groups, kh, kw)
    (PyTorch's, for both layouts). bias: (out,) or None. stride, dilation: int or (y, x);
    padding: int, (y, x), ((top, bottom), (left, right)), 'valid' or 'same'. activation:
    None, a name ('relu', 'relu6', 'sigmoid', 'hardsigmoid', 'tanh', 'gelu', 'elu',
    'softplus', 'softsign', 'abs') or an NNNeuronDescriptor (e.g. leaky ReLU, PReLU)."""
    device, layout = _device(device), _layout(layout)
    x = _array(x, "x", 4, f" ({layout})")
    weight = _array(weight, "weight", 4, " (out_channels, in_channels/groups, kh, kw)")
    cout, cin_g, kh, kw = weight.shape
    n, c, h, w = _conv_shapes(x, weight, layout, groups, cin_g, "(out, in/groups, kh, kw)")
    if cout % groups:
        raise ValueError(f"groups={groups} must divide the {cout} output channels of weight")
    bias = _bias(bias, cout)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    (pt, pb), (pl, pr) = _padding(padding, (kh, kw), dilation, stride)
    ho = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1 or builtins.min(cout, kh, kw) < 1:
        raise ValueError(f"conv2d: a {h}x{w} input padded by {(pt, pb)}, {(pl, pr)} is smaller "
                         f"than the {kh}x{kw} window dilated by {dilation}")
    act = _descriptor(activation)

    def make():   # the pipeline's kernel maker (ml.py): weights [out][kh][kw][in/groups]
        return _conv_kernel(device, _conv_attrs(np.ascontiguousarray(weight.transpose(0, 2, 3, 1)),
                                                bias, stride, dilation, (pt, pl), groups, act))

    key = ("conv2d", stride, dilation, groups, pt, pl, _neuron_key(act))
    return _convolve(device, key, weight, bias, make, x, layout, (n, ho, wo, cout), out)


def _convolve(device, key, weight, bias, make, x, layout, out_shape, out):
    n, ho, wo, cout = out_shape
    if n == 0 or x.size == 0:
        return _out(out, (n, cout, ho, wo) if layout == "NCHW" else out_shape, ())[0]
    kernel = _cached_kernel(device, key, weight, bias, make)
    now = _Now()
    src, channels_last = _nhwc_source(now, x, layout)
    result, nhwc, view = _nhwc_result(n, ho, wo, cout, layout, channels_last, out, (x,))
    convolution_op(now, kernel, now.op(src, "x"), now.op(nhwc, "out"), kernel)
    return _nhwc_finish(now, device, result, nhwc, view)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, layout="NCHW", activation=None, out=None, device=None):
    """Transposed convolution as torch.nn.functional.conv_transpose2d (same argument order),
    activation fused. weight: (C, out/groups, kh, kw) (PyTorch's). The result has
    (H - 1)*stride - 2*padding + dilation*(kh - 1) + output_padding + 1 rows (columns
    alike); output_padding must be smaller than stride or dilation."""
    device, layout = _device(device), _layout(layout)
    x = _array(x, "x", 4, f" ({layout})")
    weight = _array(weight, "weight", 4, " (in_channels, out_channels/groups, kh, kw)")
    cin, cout_g, kh, kw = weight.shape
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 \
            or cin % groups:
        raise ValueError(f"groups must be a positive int dividing the {cin} input channels of "
                         f"weight, got {groups!r}")
    n, c, h, w = _conv_shapes(x, weight, layout, groups, cin // groups,
                              "(in, out/groups, kh, kw)")
    cout = cout_g * groups
    bias = _bias(bias, cout)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    pad = _pair(padding, "padding", 0)
    extra = _pair(output_padding, "output_padding", 0)
    for e, s, d in zip(extra, stride, dilation):
        if e >= builtins.max(s, d):
            raise ValueError(f"output_padding {output_padding} must be smaller than stride "
                             f"{stride} or dilation {dilation}")
    ho = (h - 1) * stride[0] - 2 * pad[0] + dilation[0] * (kh - 1) + extra[0] + 1
    wo = (w - 1) * stride[1] - 2 * pad[1] + dilation[1] * (kw - 1) + extra[1] + 1
    if ho < 1 or wo < 1 or builtins.min(cout, kh, kw) < 1:
        raise ValueError(f"conv_transpose2d: padding {padding} leaves no output of a {h}x{w} "
                         f"input")
    act = _descriptor(activation)

    def make():   # ONNX's ConvTranspose as the pipeline makes it (it flips the kernel)
        w = weight.reshape(groups, cin // groups, cout_g, kh, kw).transpose(0, 2, 3, 4, 1)
        return _conv_transpose_kernel(device, _conv_attrs(
            np.ascontiguousarray(w).reshape(cout, kh, kw, -1), bias, stride, dilation, pad, groups, act))

    key = ("conv_transpose2d", stride, dilation, groups, pad, _neuron_key(act))
    return _convolve(device, key, weight, bias, make, x, layout, (n, ho, wo, cout), out)


# ==== pooling ====================================================================================

def _pool(mode, x, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad,
          layout, out, device):
    device, layout = _device(device), _layout(layout)
    x = _array(x, "x", 4, f" ({layout})")
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    d = _pair(dilation, "dilation")
    p = _pair(padding, "padding", 0)
    n, c, h, w = x.shape if layout == "NCHW" else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    size = []
    for i, extent in enumerate((h, w)):
        span = d[i] * (k[i] - 1) + 1
        if p[i] > span // 2:
            raise ValueError(f"padding {padding} must be at most half the window "
                             f"{span} (as in PyTorch)")
        o = -(-(extent + 2 * p[i] - span) // s[i]) if ceil_mode else (extent + 2 * p[i] - span) // s[i]
        o += 1
        if ceil_mode and (o - 1) * s[i] >= extent + p[i]:   # the last window starts in the padding
            o -= 1
        if o < 1:
            raise ValueError(f"the {h}x{w} input padded by {p} is smaller than the window {k}")
        size.append(o)
    ho, wo = size
    if x.size == 0:
        return _out(out, (n, c, ho, wo) if layout == "NCHW" else (n, ho, wo, c), ())[0]
    now = _Now()
    src, channels_last = _nhwc_source(now, x, layout)
    result, nhwc, view = _nhwc_result(n, ho, wo, c, layout, channels_last, out, (x,))
    attrs = dict(mode=mode, kernel=k, strides=s, dilations=d,
                 pads=(p[0], p[1], p[0], p[1]), count_include_pad=count_include_pad)
    pool_op(now, attrs, now.op(src, "x"), now.op(nhwc, "out"), f"ops: {mode}_pool2d")
    return _nhwc_finish(now, device, result, nhwc, view)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
               layout="NCHW", out=None, device=None):
    """As torch.nn.functional.max_pool2d (stride defaults to kernel_size; padding at most
    half the window)."""
    return _pool("max", x, kernel_size, stride, padding, dilation, ceil_mode, False, layout,
                 out, device)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               *, layout="NCHW", out=None, device=None):
    """As torch.nn.functional.avg_pool2d (no divisor_override). With count_include_pad the
    divisor counts the padding but not a ceil_mode window's part past it, as PyTorch."""
    return _pool("average", x, kernel_size, stride, padding, 1, ceil_mode,
                 bool(count_include_pad), layout, out, device)


# ==== matrix products ============================================================================

def _gemm(now, batch, m, n, k, operands, bias=None, lo=-np.inf, hi=np.inf):
    """Record one mk_sgemm; operands: (address, (row, column, batch) element strides) of
    A, B and C."""
    command = _native.GemmCommand(batch, m, n, k, 1.0, 0.0, bias, lo, hi)
    for i, (address, (rs, cs, bs)) in enumerate(operands):   # arrays in now.keep
        command.set_operand(i, address, 4, rs, cs, bs)
    command.description = "ops: matrix product"
    now.commands.append(command)


def matmul(a, b, *, out=None, device=None):
    """np.matmul on float32: (..., M, K) @ (..., K, N) with the batch dimensions broadcast;
    a 1-D a is one row, a 1-D b one column, and that dimension is left out of the result.
    Transposed and strided operands are read in place."""
    device = _device(device)
    a, b = _array(a, "a"), _array(b, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: a and b need at least one dimension (use * for scalars)")
    a2 = _readable(a[None, :] if a.ndim == 1 else a)
    b2 = _readable(b[:, None] if b.ndim == 1 else b)
    (m, k), (k2, n) = a2.shape[-2:], b2.shape[-2:]
    if k != k2:
        raise ValueError(f"matmul: a {a.shape} has {k} columns but b {b.shape} has {k2} rows")
    batch = a2.shape[:-2]
    if b2.shape[:-2] != batch:
        try:
            batch = np.broadcast_shapes(batch, b2.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: the batch dimensions of a {a.shape} and b {b.shape} do "
                             f"not broadcast") from None
    shape = batch + (m,) * (a.ndim > 1) + (n,) * (b.ndim > 1)
    result, target = _out(out, shape, (a, b))
    now = _Now()
    if result.size and k == 0:
        target[...] = 0
    elif result.size:
        operands = [t if t.shape[:-2] == batch else np.broadcast_to(t, batch + t.shape[-2:])
                    for t in (a2, b2)] + [target.reshape(batch + (m, n))]
        _batched(now, operands, m, n, k)
    return _finish(now, device, result, target)


def _batched(now, operands, m, n, k):
    """GEMMs over the batch dimensions of A, B, C: merged into one batch stride wherever all
    three allow, a loop over the rest. A B shared by the whole batch, with A's and C's rows
    evenly spaced across it, makes one GEMM of batch*M rows instead."""
    now.keep += operands
    strides = [_strides(t) for t in operands]
    dims = []   # (extent, [stride of A, B, C]), innermost first
    for i in reversed(range(len(operands[0].shape) - 2)):
        extent, st = operands[0].shape[i], [s[i] for s in strides]
        if extent == 1:
            continue
        if dims and all(o == e * dims[-1][0] for o, e in zip(st, dims[-1][1])):
            dims[-1] = (dims[-1][0] * extent, dims[-1][1])
        else:
            dims.append((extent, st))
    inner_n, inner = dims.pop(0) if dims else (1, [0, 0, 0])
    rc = [(s[-2], s[-1]) for s in strides]
    bases = [_address(t) for t in operands]
    if inner_n > 1 and inner[1] == 0 and all(inner[j] == rc[j][0] * m for j in (0, 2)):
        m, inner_n, inner = m * inner_n, 1, [0, 0, 0]
    if not dims:   # one GEMM (the usual case)
        _gemm(now, inner_n, m, n, k, [(bases[j], (*rc[j], inner[j])) for j in range(3)])
        return
    for index in np.ndindex(*[e for e, _ in reversed(dims)]):
        offsets = [builtins.sum(i * st[j] for i, (_, st) in zip(index, reversed(dims)))
                   for j in range(3)]
        _gemm(now, inner_n, m, n, k, [(bases[j] + 4 * offsets[j], (*rc[j], inner[j]))
                                      for j in range(3)])


def linear(x, weight, bias=None, *, activation=None, out=None, device=None):
    """x @ weight.T + bias, as torch.nn.functional.linear, activation fused (ReLU and ReLU6
    in the GEMM, others right after it). x: (..., in); weight: (out, in); bias: (out,)."""
    device = _device(device)
    x = _array(x, "x")
    weight = _array(weight, "weight", 2, " (out_features, in_features)")
    if x.ndim == 0:
        raise ValueError("linear: x needs at least one dimension (..., in_features)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x {x.shape} has {x.shape[-1]} features; weight {weight.shape} "
                         f"takes {k}")
    bias = _bias(bias, n)
    act = _descriptor(activation)
    result, target = _out(out, x.shape[:-1] + (n,), (x, weight) + ((bias,) if bias is not None else ()))
    if result.size == 0:
        return result
    rows = target.size // n
    now = _Now()
    t, a, b, _ = (T.NONE, 0, 0, 0) if act is None else (act.neuron_type, act.a, act.b, act.c)
    clamp = _clamp_of(t, a, b)
    if k == 0:
        target[...] = 0 if bias is None else bias
        clamp = None
    else:
        x2 = _readable(x.reshape(rows, k))
        w = _readable(weight)
        now.keep += [x2, w, target]
        lo, hi = clamp if clamp else (-np.inf, np.inf)
        _gemm(now, 1, rows, n, k, [(_address(x2), (*_strides(x2), 0)),
                                   (_address(w), (_strides(w)[1], _strides(w)[0], 0)),
                                   (_address(target), (n, 1, 0))],
              None if bias is None else np.ascontiguousarray(bias), lo, hi)
    if clamp is None and act is not None:
        view = now.op(target.reshape(rows, n), "out")
        neuron_op(now, act, view, view, f"ops: linear {t.name.lower()}")
    return _finish(now, device, result, target)


# ==== reductions =================================================================================

def _axes(axis, ndim, name="axis"):
    """axis (None: all, an int, or a tuple of ints) as a sorted tuple of distinct axes."""
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    axes = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"{name} must be None, an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} {a} is out of bounds for an array of {ndim} dimensions")
        axes.append(int(a) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name} {axis!r} repeats an axis")
    return tuple(sorted(axes))


def _groups(dims):
    """Neighbouring (extent, reduced) dimensions of the same kind merged."""
    out = []
    for extent, reduced in dims:
        if out and out[-1][1] == reduced:
            out[-1] = (out[-1][0] * extent, reduced)
        else:
            out.append((extent, reduced))
    return out


def _reduce_command(now, op, axis, extent, src, src_strides, dst, dst_strides):
    if builtins.max(extent) > _INT32_MAX:
        raise ValueError(f"ops: a reduction over {extent} elements is too large for one kernel "
                         f"call (each extent must be below 2**31)")
    now.keep += [src, dst]
    command = _native.ReduceCommand(extent, op, axis)
    command.set_operand(0, _address(src), 4, *src_strides)
    command.set_operand(1, _address(dst), 4, *dst_strides)
    command.description = "ops: reduction"
    now.commands.append(command)


_NAMES = {SUM: "sum", MEAN: "mean", MAX: "maximum", MIN: "minimum", ARGMAX: "argmax",
          ARGMIN: "argmin"}


def _reduce(op, x, axis, keepdims, out, device):
    device = _device(device)
    x = _array(x, "x")
    axes = _axes(axis, x.ndim)
    arg = op in (ARGMIN, ARGMAX)
    if arg and len(axes) != 1 and axis is not None:
        raise ValueError(f"{_NAMES[op]} takes one axis or None (the flattened array), got {axis!r}")
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keepdims or i not in axes)
    x = x.reshape(x.shape or (1,))
    result, target = _out(out, shape, (x,), np.int64 if arg else np.float32)
    count = math.prod(x.shape[i] for i in axes)
    now = _Now()
    if count == 0:
        if op not in (SUM, MEAN):
            raise ValueError(f"{_NAMES[op]} of an empty selection: it has no identity")
        target[...] = 0 if op == SUM else np.nan
        return _finish(now, device, result, target)
    if result.size == 0:
        return result
    src = _packed(now, x)
    if arg:
        if axis is None:
            a, r, b = 1, src.size, 1
        else:
            (ax,) = axes
            a, r, b = math.prod(src.shape[:ax]), src.shape[ax], math.prod(src.shape[ax + 1:])
        if r > 1 << 24:
            raise ValueError(f"{_NAMES[op]} over {r} elements: the kernel's indices are exact up "
                             f"to 2**24")
        if b > 1:   # the kernel takes the innermost axis: move the reduced axis there
            moved = np.empty((a, b, r), np.float32)
            now.copy(src.reshape(a, r, b).transpose(0, 2, 1), moved)
            src = moved
        indices = np.empty(a * b, np.float32)
        _reduce_command(now, op, FEATURE_CHANNELS, (1, 1, a * b, r), src, (0, 0, r, 1),
                        indices, (0, 0, 1, 1))
        return _finish(now, device, result, indices.reshape(shape))
    groups = _groups([(d, i in axes) for i, d in enumerate(src.shape) if d > 1])
    if groups == [(src.size, True)] and len([d for d in src.shape if d > 1]) > 1:
        first = next(d for d in src.shape if d > 1)   # two steps: the first one in parallel
        groups = [(first, True), (src.size // first, True)]
    if not any(reduced for _, reduced in groups):   # only axes of extent 1: a copy
        copy_op(now, now.op(src, "x"), now.op(target.reshape(src.shape), "out"), "ops: copy")
        return _finish(now, device, result, target)
    while True:
        i = builtins.max(j for j, (_, reduced) in enumerate(groups) if reduced)
        a = math.prod(e for e, _ in groups[:i])
        r = groups[i][0]
        b = math.prod(e for e, _ in groups[i + 1:])
        groups = _groups(groups[:i] + groups[i + 1:])
        last = not any(reduced for _, reduced in groups)
        dst = target if last else np.empty(a * b, np.float32)
        if b == 1:   # the innermost axis: across "channels", one result per "pixel"
            _reduce_command(now, op, FEATURE_CHANNELS, (1, 1, a, r), src, (0, 0, r, 1),
                            dst, (0, 0, 1, 1))
        else:        # down the "columns" of (a, r, b): b contiguous results per a
            _reduce_command(now, op, COLUMN, (a, r, 1, b), src, (r * b, b, b, 1),
                            dst, (b, b, b, 1))
        if last:
            return _finish(now, device, result, target)
        src = dst


def sum(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.sum over axis (None: all, an int, or a tuple); float32, accumulated in float32 in
    a fixed order (docs/reduction.md)."""
    return _reduce(SUM, x, axis, keepdims, out, device)


def mean(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.mean over axis (None, an int or a tuple)."""
    return _reduce(MEAN, x, axis, keepdims, out, device)


def amax(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.max over axis (None, an int or a tuple); NaN if any element is NaN."""
    return _reduce(MAX, x, axis, keepdims, out, device)


def amin(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.min over axis (None, an int or a tuple); NaN if any element is NaN."""
    return _reduce(MIN, x, axis, keepdims, out, device)


def argmax(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.argmax: int64 indices along one axis, or into the flattened array (axis=None);
    the first of ties, the first NaN if any. An axis other than the last costs a copy."""
    return _reduce(ARGMAX, x, axis, keepdims, out, device)


def argmin(x, axis=None, keepdims=False, *, out=None, device=None):
    """np.argmin, as argmax."""
    return _reduce(ARGMIN, x, axis, keepdims, out, device)


# ==== row kernels (src/nn): softmax, layer normalisation, erf, hard-swish ===================

_ROW = 4096   # elementwise row ops run on rows this long, so the rows spread over the threads


def _rows_command(now, op, src, dst, rows, n, epsilon=0.0, scale=None, bias=None):
    """One mk_nn_rows call: `rows` rows of n contiguous floats, n apart, in src and dst."""
    if rows > _INT32_MAX:
        raise ValueError(f"ops: {rows} rows are too many for one kernel call (at most 2**31 - 1)")
    command = _native.NNRowsCommand((1, 1, rows, n), op, epsilon, scale, bias)
    command.set_operand(0, _address(src), _F32, 0, 0, n, 1)
    command.set_operand(1, _address(dst), _F32, 0, 0, n, 1)
    command.description = "ops: row kernel"
    now.keep += [src, dst]
    now.commands.append(command)


def _elementwise_rows(op, x, out, device):
    device = _device(device)
    x = _array(x, "x")
    result, target = _out(out, x.shape, (x,))
    if x.size == 0:
        return result
    now = _Now()
    src, dst = _packed(now, x).reshape(-1), target.reshape(-1)
    full, tail = divmod(x.size, _ROW)
    if full:
        _rows_command(now, op, src, dst, full, _ROW)
    if tail:
        _rows_command(now, op, src[full * _ROW:], dst[full * _ROW:], 1, tail)
    return _finish(now, device, result, target)


def erf(x, *, out=None, device=None):
    """The error function."""
    return _elementwise_rows(_native.NN_ERF, x, out, device)


def hardswish(x, *, out=None, device=None):
    """x * clamp((x + 3) / 6, 0, 1), as torch.nn.functional.hardswish."""
    return _elementwise_rows(_native.NN_HARD_SWISH, x, out, device)


def softmax(x, axis=-1, *, out=None, device=None):
    """exp(x - max) / sum exp(x - max) along one axis (torch's dim). An axis other than the
    last costs a copy in and out (the kernel runs along contiguous rows)."""
    device = _device(device)
    x = _array(x, "x")
    if isinstance(axis, tuple):
        raise TypeError(f"softmax takes one axis, got {axis!r}")
    shape = x.shape or (1,)
    (ax,) = _axes(axis, len(shape))
    result, target = _out(out, x.shape, (x,))
    if x.size == 0:
        return result
    a, r, b = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])
    now = _Now()
    if b == 1:
        _rows_command(now, _native.NN_SOFTMAX, _packed(now, x), target, a, r)
    else:   # the axis moved last, and back
        moved, y = np.empty((a, b, r), np.float32), np.empty((a, b, r), np.float32)
        now.copy(_readable(x).reshape(a, r, b).transpose(0, 2, 1), moved)
        _rows_command(now, _native.NN_SOFTMAX, moved, y, a * b, r)
        now.copy(y, target.reshape(a, r, b).transpose(0, 2, 1))
    return _finish(now, device, result, target)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               device=None):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape)
    dimensions, as torch.nn.functional.layer_norm (weight and bias of normalized_shape)."""
    device = _device(device)
    x = _array(x, "x")
    dims = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) \
        else tuple(normalized_shape)
    if not dims or x.shape[x.ndim - len(dims):] != dims or len(dims) > x.ndim:
        raise ValueError(f"layer_norm: normalized_shape {normalized_shape!r} must be the last "
                         f"dimensions of x {x.shape}")
    n = math.prod(dims)
    params = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and _array(p, name).shape != dims:
            raise ValueError(f"layer_norm: {name} has shape {p.shape}; normalized_shape is {dims}")
        params.append(None if p is None else np.ascontiguousarray(p).reshape(-1))
    result, target = _out(out, x.shape, (x,))
    if x.size == 0:
        return result
    now = _Now()
    _rows_command(now, _native.NN_LAYER_NORM, _packed(now, x), target, x.size // n, n,
                  float(eps), *params)
    return _finish(now, device, result, target)


max, min, abs = amax, amin, absolute   # NumPy's names (this module's, not the builtins)
