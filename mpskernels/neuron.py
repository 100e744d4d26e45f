"""Neurons (MPSCNNNeuron and its per-type subclasses): f(x) per pixel and channel.
The C kernels: src/elementwise/."""
import numpy as np

from mpskernels import _native
from mpskernels.enums import CNNNeuronType
from mpskernels.errors import ValidationError
from mpskernels.kernel import CNNKernel


class NNNeuronDescriptor:
    """MPSNNNeuronDescriptor: a neuron type and its parameters a, b, c (and PReLU's slopes)."""

    def __init__(self, neuron_type=CNNNeuronType.NONE, a=0.0, b=0.0, c=0.0, data=None):
        try:
            self.neuron_type = CNNNeuronType(neuron_type)
        except ValueError:
            raise ValidationError(f"unknown neuron type {neuron_type!r}") from None
        if self.neuron_type == CNNNeuronType.COUNT:
            raise ValidationError("CNNNeuronType.COUNT is not a neuron")
        self.a, self.b, self.c = float(a), float(b), float(c)
        self.data = data

    @classmethod
    def cnn_neuron_descriptor(cls, neuron_type, a=0.0, b=0.0, c=0.0):
        return cls(neuron_type, a, b, c)

    @classmethod
    def cnn_neuron_prelu_descriptor(cls, data, no_copy=False):
        array = np.asarray(data, dtype=np.float32).reshape(-1)
        if array.size == 0:
            raise ValidationError("PReLU needs at least one slope")
        return cls(CNNNeuronType.PRELU, data=array if no_copy else array.copy())

    def copy(self):
        return NNNeuronDescriptor(self.neuron_type, self.a, self.b, self.c,
                                  None if self.data is None else np.array(self.data))

    def __repr__(self):
        return f"NNNeuronDescriptor({self.neuron_type.name}, a={self.a}, b={self.b}, c={self.c})"


class CNNNeuron(CNNKernel):
    """MPSCNNNeuron: applies neuron_descriptor's function to every channel of every pixel."""

    _replayable = True   # elementwise commands only read their arguments

    def __init__(self, device, neuron_descriptor):
        super().__init__(device)
        if not isinstance(neuron_descriptor, NNNeuronDescriptor):
            raise ValidationError(f"expected an NNNeuronDescriptor, got {neuron_descriptor!r}")
        d = neuron_descriptor
        self.neuron_type, self.a, self.b, self.c = d.neuron_type, d.a, d.b, d.c
        self.data = None
        if d.neuron_type == CNNNeuronType.PRELU:
            if d.data is None:
                raise ValidationError("a PRELU neuron needs data: one slope per feature channel "
                                      "(NNNeuronDescriptor.cnn_neuron_prelu_descriptor)")
            self.data = np.ascontiguousarray(d.data, dtype=np.float32).reshape(-1)

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return f"<{type(self).__name__}{name} {self.neuron_type.name} a={self.a} b={self.b} c={self.c}>"

    def _slopes(self, first, count):
        if self.data.size == 1:
            return np.full(count, self.data[0], dtype=np.float32)
        if first + count > self.data.size:
            raise ValidationError(
                f"PReLU has {self.data.size} slopes; channels {first}..{first + count - 1} need them")
        return self.data[first:first + count]

    def _encode(self, command_buffer, source, destination):
        slopes = None
        if self.neuron_type == CNNNeuronType.PRELU:
            slopes = self._slopes(self.source_feature_channel_offset, self._source_channels(source))
        t, a, b, c = int(self.neuron_type), self.a, self.b, self.c

        def make(extent):
            return _native.ElementwiseCommand.neuron(extent, t, a, b, c, slopes)

        self._encode_pointwise(command_buffer, source, destination, make)


def _neuron_class(name, neuron_type, params, doc):
    def __init__(self, device, *args, **kwargs):
        if len(args) > len(params):
            raise TypeError(f"{name}() takes {len(params)} parameters ({', '.join(params)})")
        values = dict(zip(params, args))
        for key, value in kwargs.items():
            if key not in params or key in values:
                raise TypeError(f"{name}() got an unexpected or repeated argument {key!r}")
            values[key] = value
        missing = [p for p in params if p not in values]
        if missing:
            raise TypeError(f"{name}() needs {', '.join(missing)}")
        if neuron_type == CNNNeuronType.PRELU:
            descriptor = NNNeuronDescriptor.cnn_neuron_prelu_descriptor(values["a"])
        else:
            descriptor = NNNeuronDescriptor(neuron_type, **values)
        CNNNeuron.__init__(self, device, descriptor)

    return type(name, (CNNNeuron,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


T = CNNNeuronType
CNNNeuronReLU = _neuron_class("CNNNeuronReLU", T.RELU, ("a",), "x >= 0 ? x : a*x")
CNNNeuronLinear = _neuron_class("CNNNeuronLinear", T.LINEAR, ("a", "b"), "a*x + b")
CNNNeuronSigmoid = _neuron_class("CNNNeuronSigmoid", T.SIGMOID, (), "1 / (1 + e^-x)")
CNNNeuronHardSigmoid = _neuron_class("CNNNeuronHardSigmoid", T.HARD_SIGMOID, ("a", "b"),
                                     "clamp(a*x + b, 0, 1)")
CNNNeuronTanH = _neuron_class("CNNNeuronTanH", T.TANH, ("a", "b"), "a * tanh(b*x)")
CNNNeuronAbsolute = _neuron_class("CNNNeuronAbsolute", T.ABSOLUTE, (), "|x|")
CNNNeuronSoftPlus = _neuron_class("CNNNeuronSoftPlus", T.SOFT_PLUS, ("a", "b"), "a * log(1 + e^(b*x))")
CNNNeuronSoftSign = _neuron_class("CNNNeuronSoftSign", T.SOFT_SIGN, (), "x / (1 + |x|)")
CNNNeuronELU = _neuron_class("CNNNeuronELU", T.ELU, ("a",), "x >= 0 ? x : a*(e^x - 1)")
CNNNeuronPReLU = _neuron_class("CNNNeuronPReLU", T.PRELU, ("a",),
                               "x >= 0 ? x : a[channel]*x (a: one slope per feature channel)")
CNNNeuronReLUN = _neuron_class("CNNNeuronReLUN", T.RELUN, ("a", "b"), "min(x >= 0 ? x : a*x, b)")
CNNNeuronPower = _neuron_class("CNNNeuronPower", T.POWER, ("a", "b", "c"), "(a*x + b)^c")
CNNNeuronExponential = _neuron_class("CNNNeuronExponential", T.EXPONENTIAL, ("a", "b", "c"),
                                     "c^(a*x + b); c = -1 means base e")
CNNNeuronLogarithm = _neuron_class("CNNNeuronLogarithm", T.LOGARITHM, ("a", "b", "c"),
                                   "log_c(a*x + b); c = -1 means the natural log")
CNNNeuronGeLU = _neuron_class("CNNNeuronGeLU", T.GELU, (), "0.5*x*(1 + erf(x/sqrt(2)))")
del T
