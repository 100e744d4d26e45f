"""Arithmetic (MPSCNNArithmetic: CNNAdd, CNNSubtract, CNNMultiply, CNNDivide):
dst = clamp((primary_scale*x) OP (secondary_scale*y) + bias, minimum_value, maximum_value).
Broadcasting is MPS's: secondary_stride_in_pixels_x/_y = 0 repeats one column / row (a 1x1
secondary with both at 0 is a per-channel vector), secondary_stride_in_feature_channels = 0
repeats its first channel. The C kernels: src/elementwise/."""
import math

from mpskernels import _native
from mpskernels.errors import ValidationError
from mpskernels.kernel import CNNBinaryKernel


class CNNArithmetic(CNNBinaryKernel):
    _replayable = True   # elementwise commands only read their arguments
    _op = None

    def __init__(self, device):
        super().__init__(device)
        self.primary_scale = 1.0
        self.secondary_scale = 1.0
        self.bias = 0.0
        self.primary_stride_in_feature_channels = 1
        self.secondary_stride_in_feature_channels = 1
        self.minimum_value = float("-inf")
        self.maximum_value = float("inf")

    def _encode(self, command_buffer, primary, secondary, destination):
        for name in ("primary_stride_in_feature_channels", "secondary_stride_in_feature_channels"):
            if getattr(self, name) not in (0, 1):
                raise ValidationError(f"{name} must be 0 (repeat the first channel) or 1, "
                                      f"got {getattr(self, name)}")
        values = (self.primary_scale, self.secondary_scale, self.bias, self.minimum_value, self.maximum_value)
        if any(math.isnan(float(v)) for v in values):
            raise ValidationError(f"{self!r}: scales, bias, minimum_value and maximum_value must not be NaN")
        if self.minimum_value > self.maximum_value:
            raise ValidationError(f"minimum_value {self.minimum_value} > maximum_value {self.maximum_value}")
        args = (self._op, self.primary_scale, self.secondary_scale, self.bias,
                self.minimum_value, self.maximum_value)

        def make(extent):
            return _native.ElementwiseCommand.arithmetic(extent, *args)

        self._encode_pointwise(command_buffer, primary, secondary, destination, make,
                               self.primary_stride_in_feature_channels,
                               self.secondary_stride_in_feature_channels)


class CNNAdd(CNNArithmetic):
    _op = 0


class CNNSubtract(CNNArithmetic):
    _op = 1


class CNNMultiply(CNNArithmetic):
    _op = 2


class CNNDivide(CNNArithmetic):
    _op = 3
