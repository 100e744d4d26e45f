"""Reductions (MPSNNReduceUnary, MPSNNReduceBinary and their subclasses): min, max, mean, sum
along rows, columns or across feature channels; argmin / argmax across channels; weighted
channel sums. The C kernels: src/reduce/. Rules, order of accumulation and NaN policy:
docs/reduction.md.

Geometry (MPS_REFERENCE.md §8): the source region is clip_rect_source ∩ the source (offset is
ignored). The result has the region's shape with the reduced axis set to 1 — a row reduction
gives width 1, a column reduction height 1, a channel reduction one channel — and is written
at clip_rect.origin in the destination, cut to clip_rect and the destination. Images: the
region's origin.z / depth pick the source images; the result goes to clip_rect.origin.z on."""
import math

from mpskernels import _native
from mpskernels.enums import ImageFeatureChannelFormat as F
from mpskernels.errors import ValidationError
from mpskernels.geometry import RECT_NO_CLIP, as_region
from mpskernels.image import ImageDescriptor
from mpskernels.kernel import (ULONG_MAX, CNNBinaryKernel, CNNKernel, _channels,
                               _check_destination_channels, _integer, clipped_region)

SUM, MEAN, MIN, MAX, ARGMIN, ARGMAX = range(6)          # mk_reduce_op
FEATURE_CHANNELS, ROW, COLUMN = range(3)                 # mk_reduce_axis
# largest channel count whose indices a destination format holds exactly
_INDEX_LIMIT = {F.FLOAT32: 1 << 24, F.FLOAT16: 2049, F.BFLOAT16: 257}


def _channel_range(image, offset, max_count, role):
    """(first channel, count) that a source's channel offset and max count select."""
    if type(offset) is int and offset == 0 and max_count is ULONG_MAX:   # the defaults
        return 0, image.feature_channels
    count = _channels(image, offset, max_count, role)   # raises if they are bad
    return _integer(f"{role} feature channel offset", offset), count


def _source_region(clip, image, name):
    """clip ∩ image: (x, y, z, width, height, depth); raises if they do not meet.
    (Encoding cost matters for small reductions: no min() calls, no NamedTuple unpacking.)"""
    if clip is RECT_NO_CLIP:
        return 0, 0, 0, image.width, image.height, image.number_of_images
    x, y, z = clip[0]
    w, h, d = clip[1]
    w = (x + w if x + w < image.width else image.width) - x
    h = (y + h if y + h < image.height else image.height) - y
    d = (z + d if z + d < image.number_of_images else image.number_of_images) - z
    if w <= 0 or h <= 0 or d <= 0:
        raise ValidationError(
            f"{name} (origin {x, y, z}, size {tuple(clip.size)}) does not meet {image!r}: it "
            f"must overlap the source's {image.width}x{image.height} pixels and "
            f"{image.number_of_images} images")
    return x, y, z, w, h, d


def _result_size(axis, width, height, channels):
    """(width, height, channels) of the result of reducing a width x height x channels region."""
    if axis == ROW:
        return 1, height, channels
    if axis == COLUMN:
        return width, 1, channels
    return width, height, 1


def _result_format(op, source_format):
    """Indices go to FLOAT32 images (a UNORM image cannot hold them); values keep the format."""
    return F.FLOAT32 if op in (ARGMIN, ARGMAX) else source_format


def _check_index_format(kernel, destination, channels):
    limit = _INDEX_LIMIT.get(destination.feature_channel_format)
    if limit is None or channels > limit:
        raise ValidationError(
            f"{kernel!r} writes channel indices 0..{channels - 1} to {destination!r}, whose "
            f"format cannot hold them exactly: use a FLOAT32 destination (FLOAT16 holds indices "
            f"up to 2048, BFLOAT16 up to 256)")


def _region_property(name, doc):
    """A Region attribute; accepts anything as_region does."""
    attr = "_" + name
    return property(lambda self: getattr(self, attr),
                    lambda self, value: setattr(self, attr, as_region(value)), doc=doc)


def _record(command_buffer, kernel, command, operands, destination, origin):
    """Add the command: operands (image, byte offset, strides), then the destination at origin."""
    x, y, z = origin
    offset = destination._byte_offset(z, y, x, kernel.destination_feature_channel_offset)
    command_buffer._add(command, [*operands, (destination, offset, destination._strides)], kernel)


class NNReduceUnary(CNNKernel):
    """MPSNNReduceUnary: reduces the source region clip_rect_source (offset is ignored)."""

    _axis = _op = None
    _replayable = True   # a reduction command only reads its arguments (kernel.py _replay)

    def __init__(self, device):
        super().__init__(device)
        self.clip_rect_source = RECT_NO_CLIP

    clip_rect_source = _region_property("clip_rect_source", "The source region reduced.")

    def _weight(self):
        return 1.0

    def destination_image_descriptor(self, source_images, source_states=None):
        """The result's shape (padding does not apply to reductions; offset is not touched)."""
        source = source_images[0]
        channels = self._source_channels(source)
        _, _, _, w, h, d = _source_region(self.clip_rect_source, source, "clip_rect_source")
        rw, rh, rc = _result_size(self._axis, w, h, channels)
        return ImageDescriptor(_result_format(self._op, source.feature_channel_format), rw, rh,
                               self.destination_feature_channel_offset + rc, d)

    def _encode(self, command_buffer, source, destination):
        if self._op is None:
            raise ValidationError(f"{type(self).__name__} is abstract: encode one of its subclasses")
        weight = self._weight()
        c0, channels = _channel_range(source, self.source_feature_channel_offset,
                                      self.source_feature_channel_max_count, "source")
        x, y, z, w, h, d = _source_region(self.clip_rect_source, source, "clip_rect_source")
        rw, rh, rc = _result_size(self._axis, w, h, channels)
        _check_destination_channels(self, destination, rc)
        if self._op in (ARGMIN, ARGMAX):
            _check_index_format(self, destination, channels)
        dx, dy, dz, dw, dh, dd = clipped_region(self.clip_rect, destination)
        n, rw, rh = d if d < dd else dd, rw if rw < dw else dw, rh if rh < dh else dh
        if n <= 0 or rw <= 0 or rh <= 0:
            return
        # the part of the region whose results fit
        extent = (n, rh if self._axis != COLUMN else h, rw if self._axis != ROW else w, channels)
        command = _native.ReduceCommand(extent, self._op, self._axis, weight)
        _record(command_buffer, self, command,
                [(source, source._byte_offset(z, y, x, c0), source._strides)], destination, (dx, dy, dz))


def _reduce_class(name, base, axis, op, doc):
    return type(name, (base,), {"_axis": axis, "_op": op, "__doc__": doc, "__module__": __name__})


NNReduceRowMin = _reduce_class("NNReduceRowMin", NNReduceUnary, ROW, MIN, "Minimum of each row, per channel (width 1).")
NNReduceRowMax = _reduce_class("NNReduceRowMax", NNReduceUnary, ROW, MAX, "Maximum of each row, per channel (width 1).")
NNReduceRowMean = _reduce_class("NNReduceRowMean", NNReduceUnary, ROW, MEAN, "Mean of each row, per channel (width 1).")
NNReduceRowSum = _reduce_class("NNReduceRowSum", NNReduceUnary, ROW, SUM, "Sum of each row, per channel (width 1).")
NNReduceColumnMin = _reduce_class("NNReduceColumnMin", NNReduceUnary, COLUMN, MIN,
                                  "Minimum of each column, per channel (height 1).")
NNReduceColumnMax = _reduce_class("NNReduceColumnMax", NNReduceUnary, COLUMN, MAX,
                                  "Maximum of each column, per channel (height 1).")
NNReduceColumnMean = _reduce_class("NNReduceColumnMean", NNReduceUnary, COLUMN, MEAN,
                                   "Mean of each column, per channel (height 1).")
NNReduceColumnSum = _reduce_class("NNReduceColumnSum", NNReduceUnary, COLUMN, SUM,
                                  "Sum of each column, per channel (height 1).")
NNReduceFeatureChannelsMin = _reduce_class("NNReduceFeatureChannelsMin", NNReduceUnary, FEATURE_CHANNELS, MIN,
                                           "Minimum across the channels of each pixel (1 channel).")
NNReduceFeatureChannelsMax = _reduce_class("NNReduceFeatureChannelsMax", NNReduceUnary, FEATURE_CHANNELS, MAX,
                                           "Maximum across the channels of each pixel (1 channel).")
NNReduceFeatureChannelsMean = _reduce_class("NNReduceFeatureChannelsMean", NNReduceUnary, FEATURE_CHANNELS, MEAN,
                                            "Mean across the channels of each pixel (1 channel).")
NNReduceFeatureChannelsArgumentMin = _reduce_class(
    "NNReduceFeatureChannelsArgumentMin", NNReduceUnary, FEATURE_CHANNELS, ARGMIN,
    "Index of the smallest channel of each pixel (1 channel; counted from the first channel "
    "read; ties: the lowest index; a NaN wins, the first one).")
NNReduceFeatureChannelsArgumentMax = _reduce_class(
    "NNReduceFeatureChannelsArgumentMax", NNReduceUnary, FEATURE_CHANNELS, ARGMAX,
    "Index of the largest channel of each pixel (1 channel; counted from the first channel "
    "read; ties: the lowest index; a NaN wins, the first one).")


class NNReduceFeatureChannelsSum(NNReduceUnary):
    """Sum across the channels of each pixel (1 channel), times `weight` (default 1.0)."""

    _axis, _op = FEATURE_CHANNELS, SUM

    def __init__(self, device):
        super().__init__(device)
        self.weight = 1.0

    def _weight(self):
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValidationError(f"weight must be a number, got {self.weight!r}") from None
        if math.isnan(weight):
            raise ValidationError("weight must not be NaN")
        return weight


class NNReduceBinary(CNNBinaryKernel):
    """MPSNNReduceBinary: reduces the primary source region primary_source_clip_rect with the
    secondary source (the weights) read from secondary_source_clip_rect; the offsets are
    ignored. The weights region is either 1x1 (one weight per channel for every pixel) or
    at least as large as the primary region (a weight per pixel and channel); its depth is
    1 (the same weights for every image) or at least the number of images reduced."""

    _op = None
    _replayable = True

    def __init__(self, device):
        super().__init__(device)
        self.primary_source_clip_rect = RECT_NO_CLIP
        self.secondary_source_clip_rect = RECT_NO_CLIP

    primary_source_clip_rect = _region_property("primary_source_clip_rect",
                                                "The primary region reduced.")
    secondary_source_clip_rect = _region_property("secondary_source_clip_rect",
                                                  "Where the weights are read.")

    def destination_image_descriptor(self, source_images, source_states=None):
        """One channel of the primary region's size (padding does not apply)."""
        primary = source_images[0]
        _, _, _, w, h, d = _source_region(self.primary_source_clip_rect, primary,
                                          "primary_source_clip_rect")
        return ImageDescriptor(primary.feature_channel_format, w, h,
                               self.destination_feature_channel_offset + 1, d)

    def _by_nonzero_weights(self):
        return False

    def _encode(self, command_buffer, primary, secondary, destination):
        if self._op is None:
            raise ValidationError(f"{type(self).__name__} is abstract: encode one of its subclasses")
        pc0, channels = _channel_range(primary, self.primary_source_feature_channel_offset,
                                       self.primary_source_feature_channel_max_count, "primary")
        sc0, weight_channels = _channel_range(secondary, self.secondary_source_feature_channel_offset,
                                              self.secondary_source_feature_channel_max_count,
                                              "secondary")
        if weight_channels < channels:
            raise ValidationError(
                f"the weights {secondary!r} offer {weight_channels} channels from "
                f"secondary_source_feature_channel_offset, but {channels} primary channels "
                f"are reduced: give one weight per channel")
        x, y, z, w, h, d = _source_region(self.primary_source_clip_rect, primary, "primary_source_clip_rect")
        sx, sy, sz, sw, sh, sd = _source_region(self.secondary_source_clip_rect, secondary,
                                                "secondary_source_clip_rect")
        _check_destination_channels(self, destination, 1)
        dx, dy, dz, dw, dh, dd = clipped_region(self.clip_rect, destination)
        n, rw, rh = d if d < dd else dd, w if w < dw else dw, h if h < dh else dh
        if n <= 0 or rw <= 0 or rh <= 0:
            return
        spread = (sw, sh) == (1, 1)
        if not spread and (sw < rw or sh < rh):
            raise ValidationError(
                f"the weights region of {secondary!r} is {sw}x{sh} pixels: it must be 1x1 (one "
                f"weight per channel) or cover the {rw}x{rh} primary pixels reduced")
        if sd != 1 and sd < n:
            raise ValidationError(
                f"the weights region of {secondary!r} has {sd} images: it must have 1 or at "
                f"least the {n} images reduced")
        s_n, s_y, s_x, _ = secondary._strides
        strides = (0 if sd == 1 else s_n, 0 if spread else s_y, 0 if spread else s_x, 1)
        weights = (secondary, secondary._byte_offset(sz, sy, sx, sc0), strides)
        command = _native.ReduceCommand((n, rh, rw, channels), self._op, FEATURE_CHANNELS, 1.0,
                                        self._by_nonzero_weights(), True)
        _record(command_buffer, self, command,
                [(primary, primary._byte_offset(z, y, x, pc0), primary._strides), weights],
                destination, (dx, dy, dz))


class NNReduceFeatureChannelsAndWeightsMean(NNReduceBinary):
    """Mean across channels of primary[c] * weights[c] (1 channel): the weighted sum / channels."""

    _op = MEAN


class NNReduceFeatureChannelsAndWeightsSum(NNReduceBinary):
    """Sum across channels of primary[c] * weights[c] (1 channel); with
    do_weighted_sum_by_non_zero_weights, divided by the number of non-zero weights (0/0 = NaN)."""

    _op = SUM

    def __init__(self, device, do_weighted_sum_by_non_zero_weights=False):
        super().__init__(device)
        self._do_weighted_sum_by_non_zero_weights = bool(do_weighted_sum_by_non_zero_weights)

    @property
    def do_weighted_sum_by_non_zero_weights(self):
        return self._do_weighted_sum_by_non_zero_weights

    def _by_nonzero_weights(self):
        return self._do_weighted_sum_by_non_zero_weights


__all__ = [name for name in dir() if name.startswith("NNReduce")]
