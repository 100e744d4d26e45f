"""The convolution family (MPS_REFERENCE.md §4–§5): descriptors, the data-source protocol,
CNNConvolution, CNNFullyConnected, CNNConvolutionTranspose and the weights-and-biases state.
The C kernels: src/conv/ (the kernel chosen per shape is `implementation`); the binding:
mpskernels/_conv.pxi. See docs/convolution.md."""
import abc
import math
from enum import IntEnum, IntFlag

import numpy as np

from mpskernels import _native
from mpskernels.enums import CNNNeuronType, DataType, ImageFeatureChannelFormat, ImageEdgeMode
from mpskernels.errors import TemporaryImageError, ValidationError
from mpskernels.image import ImageDescriptor
from mpskernels.kernel import (CNNKernel, _check_destination_channels, _integer,
                               clipped_region)
from mpskernels.neuron import CNNNeuron, NNNeuronDescriptor


class CNNConvolutionFlags(IntFlag):
    NONE = 0


class NNConvolutionAccumulatorPrecisionOption(IntEnum):
    HALF = 0
    FLOAT = 1


class CNNWeightsQuantizationType(IntEnum):
    NONE = 0
    LINEAR = 1
    LOOKUP_TABLE = 2


_MAX = (1 << 31) - 1


def _count(name, value, maximum=_MAX):
    return _integer(name, value, 1, maximum)


# ---- descriptors -----------------------------------------------------------------------------

class CNNConvolutionDescriptor:
    """MPSCNNConvolutionDescriptor. Values are checked when a convolution is made from it."""

    def __init__(self, kernel_width=3, kernel_height=3, input_feature_channels=1,
                 output_feature_channels=1):
        self.kernel_width = kernel_width
        self.kernel_height = kernel_height
        self.input_feature_channels = input_feature_channels
        self.output_feature_channels = output_feature_channels
        self.stride_in_pixels_x = self.stride_in_pixels_y = 1
        self.dilation_rate_x = self.dilation_rate_y = 1
        self.groups = 1
        self.fused_neuron_descriptor = NNNeuronDescriptor(CNNNeuronType.NONE)
        self._batch_norm = None

    def set_batch_normalization_parameters_for_inference(self, mean, variance, gamma, beta,
                                                         epsilon):
        """Fold y = gamma*(x - mean)/sqrt(variance + epsilon) + beta into weights and bias
        (arrays of output_feature_channels floats; None for gamma/beta means 1/0)."""
        n = _count("output_feature_channels", self.output_feature_channels)
        arrays = []
        for name, value, default in (("mean", mean, 0.0), ("variance", variance, 1.0),
                                     ("gamma", gamma, 1.0), ("beta", beta, 0.0)):
            a = np.full(n, default) if value is None else np.asarray(value, dtype=np.float64).reshape(-1)
            if a.size != n:
                raise ValidationError(f"batch normalization {name} has {a.size} values; "
                                      f"output_feature_channels is {n}")
            arrays.append(a.copy())
        self._batch_norm = (*arrays, float(epsilon))

    # deprecated neuron API (MPS keeps it on the descriptor)
    def set_neuron_type(self, neuron_type, parameter_a=0.0, parameter_b=0.0):
        self.fused_neuron_descriptor = NNNeuronDescriptor(neuron_type, parameter_a, parameter_b)

    def set_neuron_to_prelu(self, parameters_a):
        self.fused_neuron_descriptor = NNNeuronDescriptor.cnn_neuron_prelu_descriptor(parameters_a)

    def neuron_type(self):
        return self.fused_neuron_descriptor.neuron_type

    def copy(self):
        import copy as _copy
        d = _copy.copy(self)
        d.fused_neuron_descriptor = self.fused_neuron_descriptor.copy()
        return d

    def __repr__(self):
        return (f"{type(self).__name__}({self.kernel_width}x{self.kernel_height}, "
                f"{self.input_feature_channels}->{self.output_feature_channels}, "
                f"stride {self.stride_in_pixels_x}x{self.stride_in_pixels_y}, "
                f"dilation {self.dilation_rate_x}x{self.dilation_rate_y}, groups {self.groups})")


class CNNDepthWiseConvolutionDescriptor(CNNConvolutionDescriptor):
    """Each input channel k makes channel_multiplier outputs k*m + q from its own filter;
    weights [output][kernel_height][kernel_width]. Any integer multiplier (MPS: only 1)."""

    @property
    def channel_multiplier(self):
        return self.output_feature_channels // self.input_feature_channels


class CNNSubPixelConvolutionDescriptor(CNNConvolutionDescriptor):
    """The result is rearranged depth-to-space: output channels N become N / r^2 channels of
    an r-times larger image (r = sub_pixel_scale_factor), written directly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sub_pixel_scale_factor = 1


# ---- data source and state -----------------------------------------------------------------

class CNNConvolutionDataSource(abc.ABC):
    """MPSCNNConvolutionDataSource: what a convolution loads its weights from. load() is called
    before the weights are read and purge() after they are packed (once per load)."""

    @abc.abstractmethod
    def data_type(self):
        ...

    @abc.abstractmethod
    def descriptor(self):
        ...

    @abc.abstractmethod
    def weights(self):
        """A C-contiguous array [out][kh][kw][in/groups] (depthwise: [out][kh][kw])."""

    @abc.abstractmethod
    def bias_terms(self):
        """float32 [out], or None."""

    def load(self):
        return True

    def purge(self):
        pass

    def label(self):
        return None


class CNNConvolutionWeightsAndBiasesState:
    """MPSCNNConvolutionWeightsAndBiasesState: float32 weights [out][kh][kw][in/groups] and
    biases [out]. A temporary one lives on one command buffer and cannot be read by the CPU."""

    def __init__(self, weights, biases=None):
        self._weights = np.array(weights, dtype=np.float32)
        self._biases = None if biases is None else np.array(biases, dtype=np.float32).reshape(-1)
        self.is_temporary = False
        self.read_count = 1

    @classmethod
    def from_descriptor(cls, device, descriptor):
        shape = _weight_shape(descriptor)
        return cls(np.zeros(shape, np.float32), np.zeros(descriptor.output_feature_channels, np.float32))

    @classmethod
    def temporary(cls, command_buffer, descriptor):
        command_buffer._check_encodable()
        state = cls.from_descriptor(command_buffer.device, descriptor)
        state.is_temporary = True
        state._cb = command_buffer
        return state

    def _check_cpu(self):
        if self.is_temporary:
            raise TemporaryImageError("a temporary CNNConvolutionWeightsAndBiasesState cannot be "
                                      "read by the CPU: export with result_state_can_be_temporary=False")

    @property
    def weights(self):
        self._check_cpu()
        return self._weights

    @property
    def biases(self):
        self._check_cpu()
        return self._biases

    def synchronize(self, command_buffer):
        """Nothing to do: CPU memory is coherent."""


class _ArraySource(CNNConvolutionDataSource):
    """The data source behind from_arrays (MPS's deprecated float initializer)."""

    def __init__(self, descriptor, weights, bias):
        self._descriptor, self._weights, self._bias = descriptor, weights, bias

    def data_type(self):
        return DataType.FLOAT16 if np.asarray(self._weights).dtype == np.float16 else DataType.FLOAT32

    def descriptor(self):
        return self._descriptor

    def weights(self):
        return self._weights

    def bias_terms(self):
        return self._bias


# ---- weights: checks, folding, packing ---------------------------------------------------------

def _weight_shape(d):
    kh, kw = d.kernel_height, d.kernel_width
    if isinstance(d, CNNDepthWiseConvolutionDescriptor):
        return (d.output_feature_channels, kh, kw)
    return (d.output_feature_channels, kh, kw, d.input_feature_channels // max(d.groups, 1))


def _shape(d, transpose=False):
    """Check a descriptor; the C shape of the convolution it describes."""
    if not isinstance(d, CNNConvolutionDescriptor):
        raise TypeError(f"expected a CNNConvolutionDescriptor, got {type(d).__name__}")
    kw, kh = _count("kernel_width", d.kernel_width), _count("kernel_height", d.kernel_height)
    cin = _count("input_feature_channels", d.input_feature_channels)
    cout = _count("output_feature_channels", d.output_feature_channels)
    groups = _count("groups", d.groups)
    sx, sy = _count("stride_in_pixels_x", d.stride_in_pixels_x, 4096), _count("stride_in_pixels_y", d.stride_in_pixels_y, 4096)
    dx, dy = _count("dilation_rate_x", d.dilation_rate_x, 4096), _count("dilation_rate_y", d.dilation_rate_y, 4096)
    shape = dict(kh=kh, kw=kw, sy=sy, sx=sx, dy=dy, dx=dx)
    if isinstance(d, CNNDepthWiseConvolutionDescriptor):
        if groups != 1:
            raise ValidationError(f"a depthwise convolution has groups 1, got {groups}")
        if cout % cin:
            raise ValidationError(f"depthwise: output_feature_channels {cout} must be a multiple of "
                                  f"input_feature_channels {cin} (the channel multiplier)")
        shape.update(groups=cin, cin_g=1, cout_g=cout // cin)
    else:
        if cin % groups or cout % groups:
            raise ValidationError(f"groups {groups} must divide input_feature_channels {cin} and "
                                  f"output_feature_channels {cout}")
        shape.update(groups=groups, cin_g=cin // groups, cout_g=cout // groups)
    r = getattr(d, "sub_pixel_scale_factor", 1)
    r = _count("sub_pixel_scale_factor", r, 64)
    if r > 1:
        if transpose:
            raise ValidationError("a transposed convolution cannot be sub-pixel")
        if cout % (r * r):
            raise ValidationError(f"sub-pixel: output_feature_channels {cout} must be a multiple "
                                  f"of sub_pixel_scale_factor^2 = {r * r}")
    shape["sub_pixel"] = r
    if transpose:
        shape.update(up_y=sy, up_x=sx, sy=1, sx=1)
    return shape


def _weights_array(d, data_type, weights, source):
    """The data source's weights as float32 or float16 [out][kh][kw][in/groups]."""
    expected = _weight_shape(d)
    if not isinstance(weights, np.ndarray):
        raise TypeError(f"weights must be a NumPy array, got {type(weights).__name__}")
    data_type = DataType(data_type)
    if data_type == DataType.UINT8:
        weights = _dequantize(weights, source, d)
    elif data_type not in (DataType.FLOAT32, DataType.FLOAT16):
        raise ValidationError(f"convolution weights are FLOAT32, FLOAT16 or UINT8, got {data_type!r}")
    dtype = {DataType.FLOAT32: np.float32, DataType.FLOAT16: np.float16}.get(data_type, np.float32)
    if weights.dtype != dtype:
        raise TypeError(f"weights have dtype {weights.dtype}; data type {data_type.name} needs {np.dtype(dtype)}")
    if not weights.flags.c_contiguous:
        raise ValidationError("weights must be a C-contiguous array (np.ascontiguousarray)")
    if weights.shape != expected and not (weights.ndim == 1 and weights.size == np.prod(expected)):
        raise ValidationError(f"weights have shape {weights.shape}; this descriptor needs "
                              f"{expected} ([output][kernel_height][kernel_width][input/groups])")
    return weights.reshape(expected)


def _dequantize(weights, source, d):
    if weights.dtype != np.uint8:
        raise TypeError(f"UINT8 weights must be a uint8 array, got {weights.dtype}")
    kind = CNNWeightsQuantizationType(getattr(source, "weights_quantization_type", lambda: 0)())
    if kind == CNNWeightsQuantizationType.LINEAR:
        ranges = np.asarray(source.ranges_for_uint8_kernel(), dtype=np.float32).reshape(-1, 2)
        if ranges.shape[0] != d.output_feature_channels:
            raise ValidationError(f"ranges_for_uint8_kernel has {ranges.shape[0]} (min, max) pairs; "
                                  f"one per output channel ({d.output_feature_channels}) is needed")
        lo, hi = ranges[:, 0], ranges[:, 1]
        scale = (hi - lo) / np.float32(255)
        w = weights.reshape(d.output_feature_channels, -1).astype(np.float32)
        return np.ascontiguousarray((w * scale[:, None] + lo[:, None]).reshape(weights.shape), np.float32)
    if kind == CNNWeightsQuantizationType.LOOKUP_TABLE:
        table = np.asarray(source.lookup_table_for_uint8_kernel(), dtype=np.float32).reshape(-1)
        if table.size != 256:
            raise ValidationError(f"lookup_table_for_uint8_kernel has {table.size} entries, not 256")
        return table[weights]
    raise ValidationError("UINT8 weights need weights_quantization_type() LINEAR or LOOKUP_TABLE")


def _bias_array(bias, cout):
    if bias is None:
        return None
    if not isinstance(bias, np.ndarray):
        raise TypeError(f"bias_terms must be a float32 NumPy array or None, got {type(bias).__name__}")
    if bias.dtype != np.float32:
        raise TypeError(f"bias_terms must be float32 (always, whatever the weights), got {bias.dtype}")
    if bias.size != cout or bias.ndim != 1:
        raise ValidationError(f"bias_terms has shape {bias.shape}; ({cout},) is needed")
    if not bias.flags.c_contiguous:
        raise ValidationError("bias_terms must be a C-contiguous array")
    return bias


def _fold_batch_norm(d, weights, bias):
    """W' = W*I[o], B' = B*I + J with I = gamma/sqrt(variance + eps), J = beta - I*mean."""
    mean, variance, gamma, beta, eps = d._batch_norm
    scale = gamma / np.sqrt(variance + eps)
    w = weights.astype(np.float64) * scale.reshape((-1,) + (1,) * (weights.ndim - 1))
    b = (np.zeros(len(scale)) if bias is None else bias.astype(np.float64)) * scale + beta - scale * mean
    return np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)


# ---- kernels -----------------------------------------------------------------------------------

class _ConvolutionBase(CNNKernel):
    """What CNNConvolution and CNNConvolutionTranspose share: weights from a data source,
    the fused neuron, the plan cache and the recorded command."""

    _transpose = False

    def _init_from_source(self, device, data_source):
        super().__init__(device)
        if not isinstance(data_source, CNNConvolutionDataSource):
            raise TypeError(f"weights must be a CNNConvolutionDataSource, got {type(data_source).__name__}")
        self._data_source = data_source
        self.accumulator_precision_option = NNConvolutionAccumulatorPrecisionOption.FLOAT
        self._load(data_source)
        self.label = data_source.label()

    def _load(self, source):
        if not source.load():
            raise ValidationError(f"the data source {source!r} failed to load (load() returned False)")
        try:
            d = source.descriptor()
            shape = _shape(d, self._transpose)
            data_type = source.data_type()
            if self._transpose and DataType(data_type) != DataType.FLOAT32:
                raise ValidationError("a transposed convolution takes FLOAT32 weights only")
            weights = _weights_array(d, data_type, source.weights(), source)
            bias = _bias_array(source.bias_terms(), d.output_feature_channels)
            if d._batch_norm is not None:
                weights, bias = _fold_batch_norm(d, weights, bias)
            self._set_descriptor(d, shape)
            self._pack(weights, bias)
        finally:
            source.purge()

    def _set_descriptor(self, d, shape):
        self._descriptor = d.copy()
        self._shape = shape
        self.kernel_width, self.kernel_height = shape["kw"], shape["kh"]
        self.stride_in_pixels_x, self.stride_in_pixels_y = d.stride_in_pixels_x, d.stride_in_pixels_y
        self.dilation_rate_x, self.dilation_rate_y = shape["dx"], shape["dy"]
        self.input_feature_channels = d.input_feature_channels
        self.output_feature_channels = d.output_feature_channels
        self.groups = d.groups
        neuron = d.fused_neuron_descriptor or NNNeuronDescriptor(CNNNeuronType.NONE)
        if not isinstance(neuron, NNNeuronDescriptor):
            raise TypeError(f"fused_neuron_descriptor must be an NNNeuronDescriptor, got {neuron!r}")
        self._neuron = neuron.copy()
        self._slopes = None
        if neuron.neuron_type == CNNNeuronType.PRELU:
            slopes = np.asarray(neuron.data, dtype=np.float32).reshape(-1)
            n = d.output_feature_channels
            if slopes.size not in (1, n):
                raise ValidationError(f"PReLU has {slopes.size} slopes; one, or one per output "
                                      f"channel ({n}), is needed")
            self._slopes = np.ascontiguousarray(np.broadcast_to(slopes, (n,)), np.float32)

    def _pack(self, weights, bias):
        if weights.ndim == 3:   # depthwise [out][kh][kw]
            weights = weights[..., None]
        self._weights = _native.ConvWeights(self._shape, weights, bias)
        self._plans = {}

    # ---- properties of MPSCNNConvolution ----------------------------------------------------

    @property
    def data_source(self):
        return self._data_source

    @property
    def fused_neuron_descriptor(self):
        return self._neuron

    @property
    def neuron_type(self):
        return self._neuron.neuron_type

    @property
    def neuron_parameter_a(self):
        return self._neuron.a if self._neuron.neuron_type != CNNNeuronType.NONE else 1.0

    @property
    def neuron_parameter_b(self):
        return self._neuron.b if self._neuron.neuron_type != CNNNeuronType.NONE else 1.0

    @property
    def neuron_parameter_c(self):
        return self._neuron.c if self._neuron.neuron_type != CNNNeuronType.NONE else 1.0

    @property
    def neuron(self):
        """Deprecated: the fused neuron as a CNNNeuron, or None."""
        if self._neuron.neuron_type == CNNNeuronType.NONE:
            return None
        return CNNNeuron(self.device, self._neuron)

    @property
    def implementation(self):
        """The C kernel the next encode uses with the ISA active now, e.g. "igemm_12x32__avx512"."""
        return self._weights.implementation()

    # ---- weights ------------------------------------------------------------------------------

    def export_weights_and_biases(self, command_buffer, result_state_can_be_temporary=False):
        """A CNNConvolutionWeightsAndBiasesState holding the weights and biases in use now
        (BN folded), float32 [out][kh][kw][in/groups] and [out]."""
        command_buffer._check_encodable()
        weights, bias = self._weights.export()
        weights = weights.reshape(_weight_shape(self._descriptor))
        state = CNNConvolutionWeightsAndBiasesState(weights, bias)
        if result_state_can_be_temporary:
            state.is_temporary = True
            state._cb = command_buffer
        return state

    def reload_weights_and_biases(self, command_buffer=None, state=None, data_source=None):
        """From a state (encoded: commands recorded before keep the old weights; a temporary
        state's read_count drops by one), or — with no state — from the data source (MPS
        ignores the data_source argument of this deprecated form, so do we)."""
        if state is None:
            return self.reload_weights_and_biases_from_data_source()
        if not isinstance(state, CNNConvolutionWeightsAndBiasesState):
            raise TypeError(f"state must be a CNNConvolutionWeightsAndBiasesState, got {type(state).__name__}")
        if command_buffer is None:
            raise ValidationError("reloading from a state needs the command buffer it is encoded on")
        command_buffer._check_encodable()
        if state.is_temporary:
            if state._cb is not command_buffer:
                raise TemporaryImageError("a temporary state can only be used on its own command buffer")
            if state.read_count <= 0:
                raise TemporaryImageError("this temporary state's read_count is 0: it was released")
        weights = np.ascontiguousarray(state._weights, np.float32)
        expected = _weight_shape(self._descriptor)
        if weights.size != np.prod(expected):
            raise ValidationError(f"the state holds {weights.shape} weights; this convolution needs {expected}")
        bias = None if state._biases is None else _bias_array(
            np.ascontiguousarray(state._biases, np.float32), self.output_feature_channels)
        self._pack(weights.reshape(expected), bias)
        if state.is_temporary:
            state.read_count -= 1

    def reload_weights_and_biases_from_data_source(self):
        if self._data_source is None:
            raise ValidationError(f"{self!r} was made from arrays: it has no data source to reload from")
        self._load(self._data_source)

    # ---- encoding ------------------------------------------------------------------------------

    def _destination_channels(self):
        return self.output_feature_channels // (self._shape["sub_pixel"] ** 2)

    def destination_image_descriptor(self, source_images, source_states=None):
        """The image-returning encode's destination (sets offset, as MPS does). Unorm sources
        give a FLOAT32 result, FLOAT16 sources FLOAT16."""
        source = source_images[0]
        self._source_channels_checked(source)
        descriptor, self.offset = self._descriptor_for(source, self._destination_channels(), self.offset)
        r = self._shape["sub_pixel"]
        descriptor.width *= r
        descriptor.height *= r
        if descriptor.channel_format not in (ImageFeatureChannelFormat.FLOAT16, ImageFeatureChannelFormat.FLOAT32):
            descriptor.channel_format = ImageFeatureChannelFormat.FLOAT32
        return self._custom_padding(descriptor, source_images, source_states)

    def _source_channels_checked(self, source):
        channels = self._source_channels(source)
        if channels != self.input_feature_channels:
            raise ValidationError(
                f"{self!r} takes {self.input_feature_channels} input channels but reads {channels} from "
                f"{source!r} (source_feature_channel_offset {self.source_feature_channel_offset}); set "
                f"source_feature_channel_offset / source_feature_channel_max_count to select "
                f"{self.input_feature_channels} channels")
        return channels

    def _first_tap(self, region):
        """(left, top): up-sampled source coordinate of the first output's first tap."""
        raise NotImplementedError

    def _encode(self, command_buffer, source, destination, accumulate=False):
        """accumulate: destination = neuron(convolution + bias + destination) (a residual
        add fused by the ML pipeline; not an MPS option)."""
        self._source_channels_checked(source)
        if self.edge_mode not in (ImageEdgeMode.ZERO, ImageEdgeMode.CLAMP):
            raise ValidationError(f"edge_mode {self.edge_mode!r}: convolutions take ZERO or CLAMP")
        channels = self._destination_channels()
        _check_destination_channels(self, destination, channels)
        x0, y0, z0, w, h, depth = region = clipped_region(self.clip_rect, destination)
        if min(region[3:]) <= 0:
            return
        oz = self.offset.z
        if oz < 0 or oz + depth > source.number_of_images:
            raise ValidationError(
                f"{source!r} has {source.number_of_images} images; the convolution reads images "
                f"{oz}..{oz + depth - 1} (offset.z and clip_rect depth)")
        n = self._neuron
        c0 = _integer("source_feature_channel_offset", self.source_feature_channel_offset)
        sn, sy, sx, sc = destination._strides
        for weights, (left, top, out_w, out_h, dst_w, dst_h), (px, py), (mx, my) in self._parts(source, w, h):
            placement = dict(n=depth, src_h=source.height, src_w=source.width, out_h=out_h,
                             out_w=out_w, dst_h=dst_h, dst_w=dst_w, top=top, left=left,
                             edge_mode=int(self.edge_mode))
            plan = self._plan(weights, placement, source, destination)
            command = _native.ConvCommand(plan, int(n.neuron_type), n.a, n.b, n.c, self._slopes,
                                          accumulate)
            command_buffer._add(command, [
                (source, source._byte_offset(oz, 0, 0, c0), source._strides),
                (destination, destination._byte_offset(z0, y0 + py, x0 + px,
                                                       self.destination_feature_channel_offset),
                 (sn, sy * my, sx * mx, sc))], self)

    def _parts(self, source, w, h):
        """[(weights, (left, top, out_w, out_h, dst_w, dst_h), destination pixel offset (x, y),
        destination stride multipliers (x, y))]: one convolution per part."""
        r = self._shape["sub_pixel"]
        left, top, out_w, out_h = self._placement(source, w, h, r)
        return [(self._weights, (left, top, out_w, out_h, w, h), (0, 0), (1, 1))]

    def _plan(self, weights, placement, source, destination):
        """The plan of one geometry (built once, then reused by every encode that matches)."""
        key = (weights, tuple(placement.values()), source._format, source._strides,
               destination._format, _native.active_isa())
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 32:
                self._plans.clear()
            plan = self._plans[key] = _native.ConvPlan(weights, placement, int(source._format),
                                                       source._strides, int(destination._format))
        return plan

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return (f"<{type(self).__name__}{name} {self.kernel_width}x{self.kernel_height} "
                f"{self.input_feature_channels}->{self.output_feature_channels}>")


class CNNConvolution(_ConvolutionBase):
    """MPSCNNConvolution: CNNConvolution(device, weights=data_source), or from_arrays(...).
    Output pixel i's window is centred on offset + i*stride (§4.5)."""

    def __init__(self, device, weights):
        self._init_from_source(device, weights)

    @classmethod
    def from_arrays(cls, device, descriptor, kernel_weights, bias_terms=None,
                    flags=CNNConvolutionFlags.NONE):
        """MPS's float initializer: weights [out][kh][kw][in/groups] (depthwise [out][kh][kw]),
        float32 or float16; bias float32 [out] or None. data_source is None afterwards."""
        if int(flags) != 0:
            raise ValidationError(f"flags must be CNNConvolutionFlags.NONE, got {flags!r}")
        kernel = cls(device, _ArraySource(descriptor, kernel_weights, bias_terms))
        kernel._data_source = None
        return kernel

    @property
    def sub_pixel_scale_factor(self):
        return self._shape["sub_pixel"]

    @property
    def channel_multiplier(self):
        """0 for a regular convolution, the multiplier for a depthwise one."""
        if isinstance(self._descriptor, CNNDepthWiseConvolutionDescriptor):
            return self._descriptor.channel_multiplier
        return 0

    def _placement(self, source, w, h, r):
        kwd = (self.kernel_width - 1) * self.dilation_rate_x + 1
        khd = (self.kernel_height - 1) * self.dilation_rate_y + 1
        return (self.offset.x - (kwd >> 1), self.offset.y - (khd >> 1), -(-w // r), -(-h // r))

    def is_result_state_reused_across_batch(self):
        return True


class CNNFullyConnected(CNNConvolution):
    """MPSCNNFullyConnected: a convolution whose window is the whole source (kernel size =
    source size), one 1x1 output per image; offset is ignored. Weights [out][kh][kw][in]
    (the convolution layout; Apple's text also mentions a W-major order, see the docs)."""

    def _placement(self, source, w, h, r):
        if (source.width, source.height) != (self.kernel_width, self.kernel_height):
            raise ValidationError(
                f"{self!r} needs a {self.kernel_width}x{self.kernel_height} source (its window), got "
                f"{source.width}x{source.height}")
        if (w, h) != (1, 1):
            raise ValidationError(f"a fully connected layer writes one pixel; the clip_rect ∩ "
                                  f"destination is {w}x{h}")
        return 0, 0, 1, 1

    def destination_image_descriptor(self, source_images, source_states=None):
        source = source_images[0]
        self._source_channels_checked(source)
        fmt = source.feature_channel_format
        if fmt != ImageFeatureChannelFormat.FLOAT16:
            fmt = ImageFeatureChannelFormat.FLOAT32
        descriptor = ImageDescriptor(fmt, 1, 1, self.destination_feature_channel_offset
                                     + self.output_feature_channels, source.number_of_images)
        return self._custom_padding(descriptor, source_images, source_states)


class CNNConvolutionTranspose(_ConvolutionBase):
    """MPSCNNConvolutionTranspose: the source is zero-stuffed (stride - 1 zeros between
    pixels) and correlated with the weights as given (no rotation). Output pixel i reads the
    stuffed source at  offset.x*stride + kernel_offset_x + i + p*dilation,  tap p = 0..kw-1
    (a window start, not a centre). Equal to ONNX ConvTranspose with the kernel flipped; see
    docs/convolution.md."""

    _transpose = True

    def __init__(self, device, weights):
        self._init_from_source(device, weights)
        self.kernel_offset_x = self.kernel_offset_y = 0
        self.is_backwards = True

    def _placement(self, source, w, h, r):
        kx = _integer("kernel_offset_x", self.kernel_offset_x, -(1 << 30), 1 << 30)
        ky = _integer("kernel_offset_y", self.kernel_offset_y, -(1 << 30), 1 << 30)
        return (self.offset.x * self.stride_in_pixels_x + kx,
                self.offset.y * self.stride_in_pixels_y + ky, w, h)

    def _pack(self, weights, bias):
        """Besides the whole kernel, one sub-kernel per phase (output x mod stride, y mod
        stride): the taps that land on real source pixels. With ZERO edges each phase is a
        plain convolution of the real source, skipping the stuffed zeros."""
        super()._pack(weights, bias)
        shape = self._shape
        sx, sy = shape["up_x"], shape["up_y"]
        self._phases = {}
        if sx == sy == 1:
            return
        tx = [[p for p in range(shape["kw"]) if (rx + p * shape["dx"]) % sx == 0] for rx in range(sx)]
        ty = [[q for q in range(shape["kh"]) if (ry + q * shape["dy"]) % sy == 0] for ry in range(sy)]
        for ry in range(sy):
            for rx in range(sx):
                if not tx[rx] or not ty[ry]:   # no tap reaches a real pixel: bias only
                    self._phases[ry, rx] = None
                    continue
                sub = np.ascontiguousarray(weights[:, ty[ry]][:, :, tx[rx]])
                sub_shape = dict(shape, kh=len(ty[ry]), kw=len(tx[rx]), sy=1, sx=1, up_y=1, up_x=1,
                                 dy=shape["dy"] // math.gcd(shape["dy"], sy),
                                 dx=shape["dx"] // math.gcd(shape["dx"], sx))
                self._phases[ry, rx] = (_native.ConvWeights(sub_shape, sub, bias), ty[ry][0], tx[rx][0])
        self._bias_only = None
        if None in self._phases.values():
            zero = np.zeros((self.output_feature_channels, 1, 1, shape["cin_g"]), np.float32)
            self._bias_only = _native.ConvWeights(dict(shape, kh=1, kw=1, sy=1, sx=1, up_y=1, up_x=1),
                                                  zero, bias)

    def _parts(self, source, w, h):
        left, top, _, _ = self._placement(source, w, h, 1)
        if not self._phases or self.edge_mode != ImageEdgeMode.ZERO:
            return [(self._weights, (left, top, w, h, w, h), (0, 0), (1, 1))]
        shape, parts = self._shape, []
        sx, sy = shape["up_x"], shape["up_y"]
        far = -(1 << 30)   # a tap far outside the source: reads zero
        for fy in range(min(sy, h)):
            for fx in range(min(sx, w)):
                out_w, out_h = -(-(w - fx) // sx), -(-(h - fy) // sy)
                u, v = left + fx, top + fy   # up-sampled coordinate of the phase's tap 0
                phase = self._phases[v % sy, u % sx]
                if phase is None:
                    weights, first_x, first_y = self._bias_only, far, far
                else:
                    weights, q0, p0 = phase
                    first_x = (u + p0 * shape["dx"]) // sx
                    first_y = (v + q0 * shape["dy"]) // sy
                parts.append((weights, (first_x, first_y, out_w, out_h, out_w, out_h), (fx, fy), (sx, sy)))
        return parts


__all__ = ["CNNConvolutionFlags", "NNConvolutionAccumulatorPrecisionOption",
           "CNNWeightsQuantizationType", "CNNConvolutionDescriptor",
           "CNNDepthWiseConvolutionDescriptor", "CNNSubPixelConvolutionDescriptor",
           "CNNConvolutionDataSource", "CNNConvolutionWeightsAndBiasesState", "CNNConvolution",
           "CNNFullyConnected", "CNNConvolutionTranspose"]
