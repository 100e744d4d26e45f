"""Kernel bases (MPSKernel, MPSCNNKernel, MPSCNNBinaryKernel), padding policies, and the
geometry every pointwise kernel shares: which source pixel feeds which destination pixel."""
import abc
import copy as _copy
import weakref

import numpy as np

from mpskernels.enums import (ImageEdgeMode, ImageFeatureChannelFormat, KernelOptions,
                              NNPaddingMethod)
from mpskernels.errors import ValidationError
from mpskernels.geometry import NO_CLIP, RECT_NO_CLIP, Offset, as_offset, as_region
from mpskernels.image import ImageDescriptor, TemporaryImage

ULONG_MAX = 2 ** 64 - 1


class Kernel:
    """MPSKernel: bound to one device; `copy(device)` makes one for another device or thread."""

    def __init__(self, device):
        self.device = device
        self.label = None
        self.options = KernelOptions.NONE

    def copy(self, device=None):
        kernel = _copy.copy(self)
        if device is not None:
            kernel.device = device
        return kernel

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return f"<{type(self).__name__}{name}>"


# ---- padding ---------------------------------------------------------------------------------

class NNPadding(abc.ABC):
    """MPSNNPadding: the policy an image-returning encode uses to size its result."""

    @abc.abstractmethod
    def padding_method(self):
        ...

    def label(self):
        return type(self).__name__

    def destination_image_descriptor(self, source_images, source_states, kernel, suggested_descriptor):
        """Called when the CUSTOM bit is set; may change the descriptor and must set kernel.offset."""
        return suggested_descriptor

    def inverse(self):
        return None


class NNDefaultPadding(NNPadding):
    def __init__(self, method):
        self._method = NNPaddingMethod(method)

    def padding_method(self):
        return self._method

    def label(self):
        return f"NNDefaultPadding({self._method!r})"

    @classmethod
    def padding_for_tensorflow_average_pooling(cls):
        return cls(NNPaddingMethod.SIZE_SAME | NNPaddingMethod.ALIGN_CENTERED
                   | NNPaddingMethod.ADD_REMAINDER_TO_BOTTOM_RIGHT)

    @classmethod
    def padding_for_tensorflow_average_pooling_valid_only(cls):
        return cls(NNPaddingMethod.SIZE_VALID_ONLY | NNPaddingMethod.ALIGN_CENTERED
                   | NNPaddingMethod.ADD_REMAINDER_TO_BOTTOM_RIGHT)


DEFAULT_PADDING = NNDefaultPadding(NNPaddingMethod.SIZE_SAME | NNPaddingMethod.ALIGN_CENTERED
                                   | NNPaddingMethod.ADD_REMAINDER_TO_TOP_LEFT)


def padded_size_and_offset(n, k, stride, method, axis, backwards=False):
    """Destination size and offset (window centre) along one axis, MPS_REFERENCE.md §4.4.
    n: source size, k: (dilated) window, axis: 'x' or 'y'."""
    size_bits = int(method) & int(NNPaddingMethod.SIZE_MASK)
    style = {0: -1, 16: 0, 32: 1}.get(size_bits)
    if style is None:
        raise ValidationError(f"padding method {method!r} has no valid size policy")
    if backwards:
        return (n - 1) * stride + 1 + style * (k - 1), 0
    dest = (n + style * (k - 1) + stride - 1) // stride
    if dest < 1:
        raise ValidationError(f"a source of {n} pixels is too small for a {k}-pixel window "
                              f"with this padding ({method!r})")
    extra = (dest - 1) * stride + k - n
    align = int(method) & 3
    if align == NNPaddingMethod.ALIGN_TOP_LEFT:
        left = extra
    elif align == NNPaddingMethod.ALIGN_BOTTOM_RIGHT:
        left = 0
    else:
        remainder = int(method) & 12
        to_far_side = (remainder & 4) if axis == "x" else (remainder & 8)
        left = (extra + (0 if to_far_side else 1)) // 2
    return dest, k // 2 - left


# ---- pointwise geometry --------------------------------------------------------------------

class _Zero:
    """A constant zero operand: what an out-of-range read returns with ImageEdgeMode.ZERO."""
    _is_temporary = False
    _format = ImageFeatureChannelFormat.FLOAT32

    def __init__(self):
        self._root = self
        self._array = np.zeros(16, dtype=np.float32)

    def _address(self):
        return self._array.ctypes.data


_ZERO = _Zero()


class PointwiseSource:
    """How a pointwise kernel reads one source: destination pixel (x0+i, y0+j) of batch entry
    b reads source pixel (ox + i*sx, oy + j*sy) of image oz + b, channels c0 + k*sc."""
    __slots__ = ("image", "ox", "oy", "oz", "sx", "sy", "c0", "sc", "edge_mode")

    def __init__(self, image, offset, sx, sy, c0, sc, edge_mode):
        self.image = image
        self.ox, self.oy, self.oz = offset
        self.sx, self.sy, self.c0, self.sc = sx, sy, c0, sc
        if edge_mode != 0 and edge_mode != 1:
            raise ValidationError(f"edge mode {edge_mode!r} is not for kernels: they take "
                                  f"ImageEdgeMode.ZERO or CLAMP (MIRROR etc. are only for NNPad)")
        self.edge_mode = edge_mode

    def inside(self, w, h):
        """Whether a w x h destination region reads only pixels inside the image."""
        img = self.image
        return (0 <= self.ox and self.ox + (w - 1) * self.sx < img.width
                and 0 <= self.oy and self.oy + (h - 1) * self.sy < img.height)

    def operand(self, i, j):
        """(image, byte offset, element strides) for the band starting at (x0+i, y0+j)."""
        img = self.image
        cx, cy = self.ox + i * self.sx, self.oy + j * self.sy
        sn, sy, sx, _ = img._strides
        if 0 <= cx < img.width and 0 <= cy < img.height:
            return (img, img._byte_offset(self.oz, cy, cx, self.c0), (sn, sy * self.sy, sx * self.sx, self.sc))
        if self.edge_mode == ImageEdgeMode.ZERO:
            return (_ZERO, 0, (0, 0, 0, 0))
        in_x, in_y = 0 <= cx < img.width, 0 <= cy < img.height
        cx, cy = min(max(cx, 0), img.width - 1), min(max(cy, 0), img.height - 1)
        strides = (sn, sy * self.sy if in_y else 0, sx * self.sx if in_x else 0, self.sc)
        return (img, img._byte_offset(self.oz, cy, cx, self.c0), strides)


def _segments(d0, d1, axes):
    """Split [d0, d1) where any source crosses its image edge; axes: (origin, stride, size)."""
    cuts = {d0, d1}
    for origin, stride, size in axes:
        if stride > 0:
            # first i with origin + i*stride >= 0, and first with origin + i*stride >= size
            for c in (d0 - (origin // stride), d0 + (size - 1 - origin) // stride + 1):
                if d0 < c < d1:
                    cuts.add(c)
    points = sorted(cuts)
    return list(zip(points, points[1:]))


def clipped_region(clip_rect, destination):
    """clip_rect ∩ destination: (x, y, z, width, height, depth); sizes may be <= 0 (nothing)."""
    if clip_rect is RECT_NO_CLIP:
        return (0, 0, 0, destination.width, destination.height, destination.number_of_images)
    (x, y, z), (w, h, d) = clip_rect
    return (x, y, z, min(x + w, destination.width) - x, min(y + h, destination.height) - y,
            min(z + d, destination.number_of_images) - z)


def record_pointwise(command_buffer, make_command, kernel, sources, destination,
                     dst_c0, channels, region):
    """Record one command per band of the destination region in which every source is
    uniformly inside, before or after its image (at most 9 for one source; usually 1)."""
    x0, y0, z0, w, h, depth = region
    inside = True
    for s in sources:
        if s.oz < 0 or s.oz + depth > s.image.number_of_images:
            raise ValidationError(
                f"{s.image!r} has {s.image.number_of_images} images; the kernel reads images "
                f"{s.oz}..{s.oz + depth - 1} (offset.z and clip_rect depth)")
        inside = inside and s.inside(w, h)
    if inside:  # the common case: one command
        operands = [s.operand(0, 0) for s in sources]
        operands.append((destination, destination._byte_offset(z0, y0, x0, dst_c0), destination._strides))
        command_buffer._add(make_command((depth, h, w, channels)), operands, kernel)
        return
    xs = _segments(x0, x0 + w, [(s.ox, s.sx, s.image.width) for s in sources])
    ys = _segments(y0, y0 + h, [(s.oy, s.sy, s.image.height) for s in sources])
    for ya, yb in ys:
        for xa, xb in xs:
            operands = [s.operand(xa - x0, ya - y0) for s in sources]
            operands.append((destination, destination._byte_offset(z0, ya, xa, dst_c0),
                             destination._strides))
            command_buffer._add(make_command((depth, yb - ya, xb - xa, channels)), operands, kernel)


def _integer(name, value, minimum=0, maximum=1 << 31):
    """A kernel property must be an int in [minimum, maximum] (ULONG_MAX counts as maximum)."""
    if type(value) is int and minimum <= value <= maximum:   # the usual case, checked fast
        return value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValidationError(f"{name} must be an integer, got {value!r}")
    value = value.__index__()
    if value == ULONG_MAX:
        return maximum
    if not minimum <= value <= maximum:
        raise ValidationError(f"{name} must be in {minimum}..{maximum}, got {value}")
    return value


def _channels(image, offset, max_count, role):
    offset = _integer(f"{role} feature channel offset", offset)
    max_count = _integer(f"{role} feature channel max count", max_count)
    if not 0 <= offset < image.feature_channels:
        raise ValidationError(f"{role} feature channel offset {offset} is outside the "
                              f"{image.feature_channels} channels of {image!r}")
    if max_count < 1:
        raise ValidationError(f"{role} feature channel max count must be at least 1, got {max_count}")
    return min(image.feature_channels - offset, max_count)


def _check_destination_channels(kernel, destination, channels):
    offset = _integer("destination_feature_channel_offset", kernel.destination_feature_channel_offset)
    if offset < 0 or offset + channels > destination.feature_channels:
        raise ValidationError(
            f"{kernel!r} writes {channels} channels at destination_feature_channel_offset {offset}, "
            f"but {destination!r} has {destination.feature_channels}")


def _check_no_alias(destination, *sources):
    for source in sources:
        if source._overlaps(destination):
            raise ValidationError(f"the destination {destination!r} shares storage with the source "
                                  f"{source!r}: a kernel's destination must not alias its sources")


def _consume(*sources):
    """A kernel read these: each temporary's read_count drops by one."""
    for source in sources:
        if source._is_temporary:
            source._decrement()


class _Encoding:
    """What unary and binary CNN kernels share: clip rect, allocator, padding, batches, replay."""

    # Kernels whose commands only read their arguments (elementwise) set this: their last
    # encode on persistent images is kept and replayed until an attribute of the kernel is set.
    _replayable = False
    _recorded = None   # (weak references to the images, commands)

    def __setattr__(self, name, value):
        # Any change drops the recorded encode. (Comparing a snapshot of the attributes at
        # every encode cost ~5 us when a large kernel had just evicted them from the caches.)
        self.__dict__.pop("_recorded", None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_recorded", None)
        object.__delattr__(self, name)

    def _init_encoding(self):
        self.clip_rect = RECT_NO_CLIP
        self.destination_feature_channel_offset = 0
        self.padding = DEFAULT_PADDING
        self.destination_image_allocator = TemporaryImage.default_allocator()
        self.is_backwards = False
        self.is_state_modified = False

    @property
    def clip_rect(self):
        return self._clip_rect

    @clip_rect.setter
    def clip_rect(self, value):
        self._clip_rect = as_region(value)

    def _record(self, command_buffer, first, images):
        """Keep the commands recorded since index `first`, when they can be replayed: the
        loop that encodes one kernel on the same persistent images again, with no attribute
        of the kernel set since, then skips validation and geometry (CommandBuffer._replay)."""
        if self._replayable and not any(i._root._is_temporary for i in images):
            self.__dict__["_recorded"] = (tuple([weakref.ref(i) for i in images]),
                                          command_buffer._commands[first:])

    def _make_destination(self, command_buffer, sources):
        descriptor = self.destination_image_descriptor(sources)
        return self.destination_image_allocator.image(command_buffer, descriptor, self)

    def _descriptor_for(self, primary, channels, offset):
        """Size by the padding policy; returns (descriptor, new offset)."""
        method = self.padding.padding_method()
        kw = (self.kernel_width - 1) * self.dilation_rate_x + 1
        kh = (self.kernel_height - 1) * self.dilation_rate_y + 1
        width, ox = padded_size_and_offset(primary.width, kw, self.stride_in_pixels_x, method, "x",
                                           self.is_backwards)
        height, oy = padded_size_and_offset(primary.height, kh, self.stride_in_pixels_y, method, "y",
                                            self.is_backwards)
        descriptor = ImageDescriptor(primary.feature_channel_format, width, height,
                                     self.destination_feature_channel_offset + channels,
                                     primary.number_of_images)
        new_offset = Offset(ox, oy, offset.z)
        return descriptor, new_offset

    def _custom_padding(self, descriptor, source_images, source_states):
        if int(self.padding.padding_method()) & int(NNPaddingMethod.CUSTOM):
            descriptor = self.padding.destination_image_descriptor(
                source_images, source_states, self, descriptor)
        return descriptor

    def result_state(self, *args, **kwargs):
        return None

    def temporary_result_state(self, *args, **kwargs):
        return None

    def is_result_state_reused_across_batch(self):
        return False

    def append_batch_barrier(self):
        return False

    def encoding_storage_size(self, *args, **kwargs):
        return 0


class CNNKernel(Kernel, _Encoding):
    """MPSCNNKernel: one source image → one destination image."""

    kernel_width = kernel_height = 1
    stride_in_pixels_x = stride_in_pixels_y = 1
    dilation_rate_x = dilation_rate_y = 1

    def __init__(self, device):
        super().__init__(device)
        self._init_encoding()
        self.offset = Offset()
        self.source_feature_channel_offset = 0
        self.source_feature_channel_max_count = ULONG_MAX
        self.edge_mode = ImageEdgeMode.ZERO

    @property
    def offset(self):
        return self._offset

    @offset.setter
    def offset(self, value):
        self._offset = as_offset(value)

    def _source_channels(self, source):
        return _channels(source, self.source_feature_channel_offset,
                         self.source_feature_channel_max_count, "source")

    def destination_image_descriptor(self, source_images, source_states=None):
        """The descriptor the image-returning encode uses; sets self.offset (as MPS does)."""
        source = source_images[0]
        descriptor, self.offset = self._descriptor_for(
            source, self._source_channels(source), self.offset)
        return self._custom_padding(descriptor, source_images, source_states)

    def encode(self, command_buffer, source, destination=None, destination_state=None):
        """With a destination: uses offset and clip_rect as set, ignores padding. Without:
        sizes the result by `padding` (setting offset), makes it with
        destination_image_allocator (a TemporaryImage by default) and returns it."""
        recorded = self._recorded
        if (recorded is not None and destination is not None
                and command_buffer._replay(recorded, (source, destination))):
            return destination
        command_buffer._check_encodable()
        source._check_use(command_buffer, reading=True)
        if destination is None:
            destination = self._make_destination(command_buffer, [source])
        destination._check_use(command_buffer, reading=False)
        images = (source, destination)
        _check_no_alias(destination, source)
        first = len(command_buffer._commands)
        self._encode(command_buffer, source, destination)
        self._record(command_buffer, first, images)
        _consume(source)
        return destination

    def encode_batch(self, command_buffer, sources, destinations=None, destination_states=None):
        sources = list(sources)
        if destinations is not None:
            destinations = list(destinations)
            if len(destinations) != len(sources):
                raise ValidationError(f"encode_batch got {len(sources)} sources and "
                                      f"{len(destinations)} destinations")
            for d in destinations:
                _check_no_alias(d, *sources)
        for image in sources + (destinations or []):
            if image.number_of_images != 1:
                raise ValidationError(f"images in a batch must each hold one image; {image!r} "
                                      f"holds {image.number_of_images}")
        if destinations is None:
            return [self.encode(command_buffer, s) for s in sources]
        for s, d in zip(sources, destinations):
            self.encode(command_buffer, s, d)
        return destinations

    def _encode(self, command_buffer, source, destination):
        raise NotImplementedError

    def _encode_pointwise(self, command_buffer, source, destination, make_command):
        channels = self._source_channels(source)
        _check_destination_channels(self, destination, channels)
        region = clipped_region(self.clip_rect, destination)
        if min(region[3:]) <= 0:
            return
        src = PointwiseSource(source, self.offset, 1, 1,
                              _integer("source_feature_channel_offset", self.source_feature_channel_offset),
                              1, self.edge_mode)
        record_pointwise(command_buffer, make_command, self, [src], destination,
                         self.destination_feature_channel_offset, channels, region)


class CNNBinaryKernel(Kernel, _Encoding):
    """MPSCNNBinaryKernel: a primary and a secondary source image → one destination image."""

    kernel_width = kernel_height = 1
    dilation_rate_x = dilation_rate_y = 1

    def __init__(self, device):
        super().__init__(device)
        self._init_encoding()
        self.primary_offset = Offset()
        self.secondary_offset = Offset()
        self.primary_source_feature_channel_offset = 0
        self.secondary_source_feature_channel_offset = 0
        self.primary_source_feature_channel_max_count = ULONG_MAX
        self.secondary_source_feature_channel_max_count = ULONG_MAX
        self.primary_edge_mode = ImageEdgeMode.ZERO
        self.secondary_edge_mode = ImageEdgeMode.ZERO
        self.primary_kernel_width = self.primary_kernel_height = 1
        self.secondary_kernel_width = self.secondary_kernel_height = 1
        self.primary_stride_in_pixels_x = self.primary_stride_in_pixels_y = 1
        self.secondary_stride_in_pixels_x = self.secondary_stride_in_pixels_y = 1
        self.primary_dilation_rate_x = self.primary_dilation_rate_y = 1
        self.secondary_dilation_rate_x = self.secondary_dilation_rate_y = 1

    @property
    def primary_offset(self):
        return self._primary_offset

    @primary_offset.setter
    def primary_offset(self, value):
        self._primary_offset = as_offset(value)

    @property
    def secondary_offset(self):
        return self._secondary_offset

    @secondary_offset.setter
    def secondary_offset(self, value):
        self._secondary_offset = as_offset(value)

    # the padding policy sizes the result from the primary source
    @property
    def stride_in_pixels_x(self):
        return self.primary_stride_in_pixels_x

    @property
    def stride_in_pixels_y(self):
        return self.primary_stride_in_pixels_y

    def _primary_channels(self, primary):
        return _channels(primary, self.primary_source_feature_channel_offset,
                         self.primary_source_feature_channel_max_count, "primary")

    def destination_image_descriptor(self, source_images, source_states=None):
        """The descriptor the image-returning encode uses; sets primary_offset."""
        primary = source_images[0]
        descriptor, self.primary_offset = self._descriptor_for(
            primary, self._primary_channels(primary), self.primary_offset)
        return self._custom_padding(descriptor, source_images, source_states)

    def encode(self, command_buffer, primary, secondary, destination=None, destination_state=None):
        recorded = self._recorded
        if (recorded is not None and destination is not None
                and command_buffer._replay(recorded, (primary, secondary, destination))):
            return destination
        command_buffer._check_encodable()
        primary._check_use(command_buffer, reading=True)
        secondary._check_use(command_buffer, reading=True)
        if primary is secondary and primary._is_temporary and primary.read_count < 2:
            raise ValidationError(
                f"{primary!r} is both primary and secondary source, so this kernel reads it twice, "
                f"but its read_count is {primary.read_count}: set read_count to cover both reads")
        if destination is None:
            destination = self._make_destination(command_buffer, [primary, secondary])
        destination._check_use(command_buffer, reading=False)
        images = (primary, secondary, destination)
        _check_no_alias(destination, primary, secondary)
        first = len(command_buffer._commands)
        self._encode(command_buffer, primary, secondary, destination)
        self._record(command_buffer, first, images)
        _consume(primary, secondary)
        return destination

    def encode_batch(self, command_buffer, primaries, secondaries, destinations=None,
                     destination_states=None):
        primaries, secondaries = list(primaries), list(secondaries)
        if len(primaries) != len(secondaries) or (destinations is not None and len(destinations) != len(primaries)):
            raise ValidationError("encode_batch needs lists of equal length")
        for image in primaries + secondaries + list(destinations or []):
            if image.number_of_images != 1:
                raise ValidationError(f"images in a batch must each hold one image; {image!r} "
                                      f"holds {image.number_of_images}")
        if destinations is None:
            return [self.encode(command_buffer, p, s) for p, s in zip(primaries, secondaries)]
        for d in destinations:
            _check_no_alias(d, *primaries, *secondaries)
        for p, s, d in zip(primaries, secondaries, destinations):
            self.encode(command_buffer, p, s, d)
        return list(destinations)

    def _encode(self, command_buffer, primary, secondary, destination):
        raise NotImplementedError

    def _encode_pointwise(self, command_buffer, primary, secondary, destination, make_command,
                          primary_channel_stride=1, secondary_channel_stride=1):
        channels = self._primary_channels(primary)
        secondary_channels = _channels(secondary, self.secondary_source_feature_channel_offset,
                                       self.secondary_source_feature_channel_max_count, "secondary")
        if secondary_channel_stride and secondary_channels < channels:
            raise ValidationError(
                f"the secondary source {secondary!r} offers {secondary_channels} channels but the "
                f"primary {primary!r} has {channels}: give it as many, or set "
                f"secondary_stride_in_feature_channels = 0 to repeat its first channel")
        _check_destination_channels(self, destination, channels)
        region = clipped_region(self.clip_rect, destination)
        if min(region[3:]) <= 0:
            return
        strides = [_integer(name, getattr(self, name), 0, 1 << 20) for name in (
            "primary_stride_in_pixels_x", "primary_stride_in_pixels_y",
            "secondary_stride_in_pixels_x", "secondary_stride_in_pixels_y")]
        sources = [
            PointwiseSource(primary, self.primary_offset, strides[0], strides[1],
                            _integer("primary_source_feature_channel_offset",
                                     self.primary_source_feature_channel_offset), primary_channel_stride,
                            self.primary_edge_mode),
            PointwiseSource(secondary, self.secondary_offset, strides[2], strides[3],
                            _integer("secondary_source_feature_channel_offset",
                                     self.secondary_source_feature_channel_offset), secondary_channel_stride,
                            self.secondary_edge_mode),
        ]
        record_pointwise(command_buffer, make_command, self, sources, destination,
                         self.destination_feature_channel_offset, channels, region)


__all__ = ["Kernel", "CNNKernel", "CNNBinaryKernel", "NNPadding", "NNDefaultPadding",
           "padded_size_and_offset", "NO_CLIP"]
