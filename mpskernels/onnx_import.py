"""ONNX → mpskernels.ml.Network (needs the optional `onnx` package; loading a .mpkg does not).

What the importer does, in one pass over the graph in topological order:
- checks the model (onnx.checker), every input is float32, every op is one it knows;
- folds constants: initializers and Constant nodes are NumPy arrays, and ops whose inputs are
  all constant are evaluated here (Shape of a static shape too), never at run time;
- layout: our kernels are NHWC. A rank-4 value is kept as NCHW ("plain") or NHWC; Conv and
  pooling take NHWC, so the first one transposes its input once, and everything between stays
  NHWC (elementwise ops and their constant operands follow); a graph output or an op that
  needs the logical order transposes back (a value with H = W = 1 has the same bytes either way
  and is only reshaped);
- fuses into the convolution / GEMM epilogue a BatchNormalization (folded into the weights)
  and one activation after it (Relu, LeakyRelu, Clip(0, b), Sigmoid, Tanh, ...), and a Relu or
  Clip after an Add into the add's clamp, when the intermediate value has no other reader
  (the pipeline then folds such an Add of a convolution's or GEMM's result into that
  convolution: ml._fuse_residual_adds).
"""
import numpy as np

from mpskernels.enums import CNNNeuronType as T
from mpskernels.errors import ValidationError
from mpskernels.ml import Network
from mpskernels.neuron import NNNeuronDescriptor

NCHW_TO_NHWC, NHWC_TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("reading ONNX models needs the onnx package: pip install 'mpskernels[onnx]'") from None
    return onnx, numpy_helper


def load_model(source):
    """An onnx ModelProto from a path, bytes or a ModelProto; checked. ValidationError if it
    is not a readable, valid model."""
    onnx, _ = _onnx()
    if isinstance(source, onnx.ModelProto):
        model, where = source, "the model"
    else:
        where = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        try:
            model = onnx.load_model_from_string(bytes(source)) if isinstance(source, (bytes, bytearray)) \
                else onnx.load(str(source))
        except OSError as e:
            raise ValidationError(f"cannot read {where}: {e.strerror or e}") from None
        except Exception as e:   # protobuf's DecodeError and friends
            raise ValidationError(f"{where} is not a readable ONNX model: {type(e).__name__}: {e}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ValidationError(f"{where} fails the ONNX checker: {e}") from None
    return model


def import_onnx(source, name="main"):
    """A Network from an ONNX model (path, bytes or ModelProto)."""
    return _Importer(load_model(source), name).network


class _Importer:
    def __init__(self, model, name):
        _, self.numpy_helper = _onnx()
        self.opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx", 1)
        graph = model.graph
        self.net = Network(name)
        self.consts = {t.name: self._array(t, f"initializer {t.name!r}") for t in graph.initializer}
        self.values = {}       # ONNX name -> (Value, layout "plain" | "nhwc")
        self.converted = {}    # (Value, perm or shape) -> its transposed / reshaped copy
        self.graph_outputs = {o.name for o in graph.output}
        for inp in graph.input:
            if inp.name in self.consts:
                continue
            tt = inp.type.tensor_type
            if tt.elem_type != 1:
                raise ValidationError(f"input {inp.name!r} has ONNX element type {tt.elem_type}; "
                                      f"the importer takes float32 inputs only")
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if 0 in shape:
                raise ValidationError(f"input {inp.name!r} has shape {shape}: tensors with a zero-sized "
                                      f"dimension are not supported")
            self.values[inp.name] = (self.net.input(inp.name, shape), "plain")
        self.skip = set()
        nodes = list(graph.node)
        self.consumers = {}
        for n in nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        for node in nodes:   # Constant nodes have no inputs: known before any fusion looks
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self.consts[node.output[0]] = self._constant_attr(node)
                self.skip.add(id(node))
        for node in nodes:
            if id(node) not in self.skip:
                try:
                    self._node(node)
                except ValidationError:
                    raise
                except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as e:
                    self._fail(node, f"malformed node: {type(e).__name__}: {e}")   # e.g. wrong attribute types
        for o in graph.output:
            if o.name not in self.values and o.name in self.consts:
                raise ValidationError(f"output {o.name!r} is a constant; the importer needs "
                                      f"outputs computed from the inputs")
            v = self._plain(o.name)
            if v.producer is None or v in self.net.outputs:
                v = self.net.transpose(v, range(len(v.shape)), name=f"{o.name}__copy")
            self.net.output(v, o.name)
        self.network = self.net

    # ---- helpers ------------------------------------------------------------------------------

    def _where(self, node):
        return f"node {node.name or node.output[0]!r} ({node.op_type}, opset {self.opset})"

    def _fail(self, node, what):
        raise ValidationError(f"{self._where(node)}: {what}")

    def _array(self, tensor, what):
        try:
            return self.numpy_helper.to_array(tensor)
        except Exception as e:   # onnx's own errors on malformed data: ValueError, TypeError...
            raise ValidationError(f"{what}: {type(e).__name__}: {e}") from None

    def _const(self, name):
        return self.consts.get(name) if name else None

    def _value(self, name):
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            return self.net.constant(self.consts[name], name=self._fresh(name)), "plain"
        raise ValidationError(f"value {name!r} is read before any node computes it")

    def _fresh(self, name):
        """An unused value name; graph output names are kept for the outputs."""
        n, k = name, 0
        while n in self.net._names or n in self.graph_outputs:
            k += 1
            n = f"{name}_{k}"
        return n

    def _convert(self, value, perm):
        key = (value, perm)
        if key not in self.converted:
            self.converted[key] = self.net.transpose(value, perm, name=self._fresh(f"{value.name}_t"))
        return self.converted[key]

    def _nhwc(self, name, node):
        value, layout = self._value(name)
        if layout == "nhwc":
            return value
        if value.shape is None or len(value.shape) != 4:
            self._fail(node, f"takes a rank-4 NCHW input; {name!r} has shape {value.shape}")
        return self._convert(value, NCHW_TO_NHWC)

    def _plain(self, name):
        value, layout = self._value(name)
        if layout == "plain":
            return value
        n, h, w, c = value.shape
        if h == 1 and w == 1:   # the same bytes in either order
            return self._convert_reshape(value, (n, c, 1, 1))
        return self._convert(value, NHWC_TO_NCHW)

    def _convert_reshape(self, value, shape):
        key = (value, shape)
        if key not in self.converted:
            self.converted[key] = self.net.reshape(value, shape, name=self._fresh(f"{value.name}_r"))
        return self.converted[key]

    def _sole_reader(self, name, op_types):
        """The one node reading `name`, if it is of op_types and name is not a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) == 1 and name not in self.graph_outputs and readers[0].op_type in op_types:
            return readers[0]
        return None

    def _set(self, node, value, layout="plain", index=0):
        self.values[node.output[index]] = (value, layout)

    def _attrs(self, node):
        onnx, _ = _onnx()
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    # ---- activations that fuse --------------------------------------------------------------

    def _activation(self, node):
        """An NNNeuronDescriptor for an activation node, or None if it has no neuron form."""
        op, a = node.op_type, self._attrs(node)
        if op == "Relu":
            return NNNeuronDescriptor(T.RELU)
        if op == "LeakyRelu":
            return NNNeuronDescriptor(T.RELU, a.get("alpha", 0.01))
        if op == "Sigmoid":
            return NNNeuronDescriptor(T.SIGMOID)
        if op == "Tanh":
            return NNNeuronDescriptor(T.TANH, 1.0, 1.0)
        if op == "Elu":
            return NNNeuronDescriptor(T.ELU, a.get("alpha", 1.0))
        if op == "HardSigmoid":
            return NNNeuronDescriptor(T.HARD_SIGMOID, a.get("alpha", 0.2), a.get("beta", 0.5))
        if op == "Softplus":
            return NNNeuronDescriptor(T.SOFT_PLUS, 1.0, 1.0)
        if op == "Gelu" and a.get("approximate", b"none") in (b"none", "none"):
            return NNNeuronDescriptor(T.GELU)
        if op == "Softsign":
            return NNNeuronDescriptor(T.SOFT_SIGN)
        if op == "Abs":
            return NNNeuronDescriptor(T.ABSOLUTE)
        if op == "Exp":
            return NNNeuronDescriptor(T.EXPONENTIAL, 1.0, 0.0, -1.0)
        if op == "Log":
            return NNNeuronDescriptor(T.LOGARITHM, 1.0, 0.0, -1.0)
        if op == "Clip":
            lo, hi = self._clip_bounds(node)
            if lo == 0.0:
                return NNNeuronDescriptor(T.RELUN, 0.0, hi)
        return None

    def _clip_bounds(self, node):
        a = self._attrs(node)
        if self.opset < 11:
            lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
            return min(lo, hi), hi
        bounds = []
        for k, default in ((1, -np.inf), (2, np.inf)):
            name = node.input[k] if len(node.input) > k else ""
            if not name:
                bounds.append(default)
                continue
            c = self._const(name)
            if c is None:
                self._fail(node, "min and max must be constants")
            bounds.append(float(c))
        return bounds[0] if bounds[0] <= bounds[1] else bounds[1], bounds[1]   # min > max: all max

    def _fuse_activation(self, node, output):
        """(descriptor, the node whose output is the result) for output's sole activation reader."""
        reader = self._sole_reader(output, ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Elu",
                                            "HardSigmoid", "Softplus", "Gelu"))
        if reader is not None:
            d = self._activation(reader)
            if d is not None and all(i in self.consts or not i or i == output for i in reader.input):
                self.skip.add(id(reader))
                return d, reader
        return None, node

    # ---- ops ------------------------------------------------------------------------------

    def _node(self, node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self._fail(node, f"domain {node.domain!r} is not supported")
        inputs_const = [self._const(i) if i else None for i in node.input]
        if all(c is not None for c, i in zip(inputs_const, node.input) if i) and op in _FOLD:
            self.consts[node.output[0]] = np.asarray(_FOLD[op](self, node, inputs_const))
            return
        if op == "Shape":   # of the logical (NCHW-order) shape; start / end (opset 15) slice it
            shape = _shape_part(self, node, self._logical_shape(node.input[0], node))
            if -1 in shape:
                self._fail(node, "Shape of a value with free dimensions is not supported (fix the input shapes)")
            self.consts[node.output[0]] = np.array(shape, np.int64)
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None and op in _FOLD:
            live = [i for i, c in zip(node.input, inputs_const) if i and c is None]
            self._fail(node, f"op {op} is supported on constants only (shape arithmetic, folded at build "
                             f"time); {live[0]!r} is computed at run time")
        if handler is None:
            self._fail(node, f"op {op} is not supported by the importer; supported: "
                             f"{', '.join(sorted(SUPPORTED))}")
        try:
            handler(node)
        except ValidationError as e:   # the IR's own checks: say which node
            if str(e).startswith(self._where(node)):
                raise
            raise ValidationError(f"{self._where(node)}: {e}") from None

    def _constant_attr(self, node):
        a = node.attribute[0]
        if a.name == "value":
            return self._array(a.t, self._where(node))
        if a.name in ("value_float", "value_int"):
            return np.array(a.f if a.name == "value_float" else a.i, np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(a.floats) if a.name == "value_floats" else list(a.ints),
                            np.float32 if a.name == "value_floats" else np.int64)
        self._fail(node, f"Constant with attribute {a.name!r} is not supported")

    def _op_Identity(self, node):
        self.values[node.output[0]] = self._value(node.input[0])

    def _op_Dropout(self, node):
        training = self._const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        ratio = self._const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        random = ratio is None or float(ratio) != 0.0
        if (training is not None and bool(training) and random) or self._attrs(node).get("is_test", 1) == 0:
            self._fail(node, "training-mode dropout (random) is not supported; export the model in eval mode")
        if len(node.output) > 1 and node.output[1]:
            self._fail(node, "the mask output is not supported")
        self._op_Identity(node)

    def _conv_weights(self, node, layout):
        """Constant 4-D weights and bias (or None) of Conv / ConvTranspose."""
        w = self._const(node.input[1])
        if w is None or w.ndim != 4:
            self._fail(node, f"the weights must be a constant {layout} (2-D only)")
        b = self._const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and b is None:
            self._fail(node, "the bias must be a constant")
        return w, b

    def _op_Conv(self, node):
        a = self._attrs(node)
        w, b = self._conv_weights(node, "[out][in/groups][kh][kw]")
        x = self._nhwc(node.input[0], node)
        w = w.astype(np.float64)
        b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        out, last = node.output[0], node
        bn = self._sole_reader(out, ("BatchNormalization",))
        if bn is not None and all(i in self.consts for i in bn.input[1:]):
            scale, shift = self._bn_affine(bn)
            w = w * scale[:, None, None, None]
            b = b * scale + shift
            self.skip.add(id(bn))
            out, last = bn.output[0], bn
        neuron, last = self._fuse_activation(last, out)
        kh, kw = w.shape[2:]
        strides = tuple(a.get("strides", (1, 1)))
        dilations = tuple(a.get("dilations", (1, 1)))
        pads = self._pads(node, a, x.shape[1:3] if x.shape else None, (kh, kw), strides, dilations)
        y = self.net.conv2d(x, w.transpose(0, 2, 3, 1).astype(np.float32), b.astype(np.float32), strides,
                            dilations, pads, a.get("group", 1), neuron, name=self._fresh(last.output[0]))
        self.values[last.output[0]] = (y, "nhwc")

    def _bn_affine(self, node):
        a = self._attrs(node)
        gamma, beta, mean, var = (self.consts[i].astype(np.float64) for i in node.input[1:5])
        denominator = var + a.get("epsilon", 1e-5)
        if not np.all(denominator > 0):   # a NaN, or a negative variance: no model has one
            self._fail(node, "variance + epsilon must be positive in every channel")
        scale = gamma / np.sqrt(denominator)
        return scale, beta - mean * scale

    def _pads(self, node, a, hw, kernel, strides, dilations):
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            pads = tuple(a.get("pads", (0, 0, 0, 0)))
            if len(pads) != 4:
                self._fail(node, f"pads {pads}: 2-D only")
            return pads
        if auto == "VALID":
            return (0, 0, 0, 0)
        if hw is None or -1 in hw:
            self._fail(node, f"auto_pad {auto} needs a static input size")
        total = [max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
                 for i, k, s, d in zip(hw, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
        return (begin[0], begin[1], end[0], end[1])

    def _op_BatchNormalization(self, node):
        if not all(i in self.consts for i in node.input[1:5]):
            self._fail(node, "scale, bias, mean and variance must be constants (inference form)")
        if len(node.output) > 1 and any(node.output[1:]):
            self._fail(node, "training-mode outputs (running mean / variance) are not supported")
        scale, shift = self._bn_affine(node)
        value, layout = self._value(node.input[0])
        rank = len(value.shape)
        if layout == "nhwc":
            shape = (scale.size,)
        else:
            shape = (scale.size,) + (1,) * (rank - 2)
        s = self.net.constant(scale.astype(np.float32).reshape(shape), self._fresh(f"{node.output[0]}_scale"))
        t = self.net.constant(shift.astype(np.float32).reshape(shape), self._fresh(f"{node.output[0]}_shift"))
        y = self.net.mul(value, s, name=self._fresh(f"{node.output[0]}_mul"))
        neuron, last = self._fuse_activation(node, node.output[0])
        clamp = self._clamp_of(neuron)
        if neuron is not None and clamp is None:
            last = node
        self.values[last.output[0]] = (self.net.add(y, t, clamp=clamp, name=self._fresh(last.output[0])), layout)

    @staticmethod
    def _clamp_of(neuron):
        if neuron is None:
            return None
        if neuron.neuron_type == T.RELU and neuron.a == 0.0:
            return (0.0, np.inf)
        if neuron.neuron_type == T.RELUN and neuron.a == 0.0:
            return (0.0, neuron.b)
        return None

    def _binary(self, node):
        op = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}[node.op_type]
        names = node.input[:2]
        vals = [self.values.get(n) for n in names]
        layout = "nhwc" if any(v is not None and v[1] == "nhwc" for v in vals) else "plain"
        rank = max(len(self.values[n][0].shape) if n in self.values else self.consts[n].ndim for n in names)
        if layout == "nhwc" and rank != 4:
            layout = "plain"
        operands = []
        for n in names:
            if n in self.values:
                operands.append(self._nhwc(n, node) if layout == "nhwc" else self._plain(n))
            else:
                c = self.consts[n].astype(np.float32)
                if layout == "nhwc":
                    c = c.reshape((1,) * (4 - c.ndim) + c.shape).transpose(NCHW_TO_NHWC)
                operands.append(self.net.constant(c, self._fresh(n)))
        for v, n in zip(operands, names):
            if v.data_type.name != "FLOAT32":
                self._fail(node, f"{n!r} is not float32")
        clamp, last = None, node
        if op == "add":
            reader = self._sole_reader(node.output[0], ("Relu", "Clip"))
            if reader is not None:
                c = self._clamp_of(self._activation(reader))
                if reader.op_type == "Clip" and all(i in self.consts or not i for i in reader.input[1:]):
                    c = self._clip_bounds(reader)
                if c is not None:
                    clamp, last = c, reader
                    self.skip.add(id(reader))
        y = getattr(self.net, op)(*operands, clamp=clamp, name=self._fresh(last.output[0]))
        self.values[last.output[0]] = (y, layout)

    _op_Add = _op_Sub = _op_Mul = _op_Div = _binary

    def _unary(self, node):
        value, layout = self._value(node.input[0])
        d = self._activation(node)
        if node.op_type == "Clip":
            lo, hi = self._clip_bounds(node)
            one = self.net.constant(np.float32(1.0), self._fresh(f"{node.output[0]}_one"))
            self._set(node, self.net.mul(value, one, clamp=(lo, hi), name=self._fresh(node.output[0])), layout)
            return
        self._set(node, self.net.neuron(value, d.neuron_type, d.a, d.b, d.c, name=self._fresh(node.output[0])), layout)

    _op_Relu = _op_LeakyRelu = _op_Sigmoid = _op_Tanh = _op_Elu = _op_HardSigmoid = _unary
    _op_Softplus = _op_Softsign = _op_Abs = _op_Exp = _op_Log = _op_Clip = _unary

    def _op_PRelu(self, node):
        slope = self._const(node.input[1])
        if slope is None:
            self._fail(node, "the slope must be a constant")
        value, layout = self._value(node.input[0])
        if slope.size > 1:   # one slope per channel: channels innermost (NHWC, or rank 2)
            rank = len(value.shape)
            if rank not in (2, 4) or slope.ndim > rank or \
                    slope.reshape((1,) * (rank - slope.ndim) + slope.shape).shape[1] != slope.size:
                self._fail(node, f"slope of shape {slope.shape}: one slope, or one per channel of a rank-2 or 4 input")
            if rank == 4:
                value, layout = self._nhwc(node.input[0], node), "nhwc"
        self._set(node, self.net.neuron(value, T.PRELU, prelu=slope.reshape(-1).astype(np.float32),
                                        name=self._fresh(node.output[0])), layout)

    def _pool(self, node, mode, global_):
        a = self._attrs(node)
        if len(node.output) > 1 and node.output[1]:
            self._fail(node, "the Indices output is not supported")
        x = self._nhwc(node.input[0], node)
        if global_:
            y = self.net.pool2d(x, mode, name=self._fresh(node.output[0]))
        else:
            kernel = tuple(a["kernel_shape"])
            if len(kernel) != 2:
                self._fail(node, f"kernel_shape {kernel}: 2-D pooling only")
            strides = tuple(a.get("strides", (1, 1)))
            dilations = tuple(a.get("dilations", (1, 1)))
            pads = self._pads(node, a, x.shape[1:3] if x.shape else None, kernel, strides, dilations)
            y = self.net.pool2d(x, mode, kernel, strides, dilations, pads,
                                count_include_pad=bool(a.get("count_include_pad", 0)),
                                ceil_mode=bool(a.get("ceil_mode", 0)), name=self._fresh(node.output[0]))
        self._set(node, y, "nhwc")

    def _op_MaxPool(self, node):
        self._pool(node, "max", False)

    def _op_AveragePool(self, node):
        self._pool(node, "average", False)

    def _op_GlobalAveragePool(self, node):
        self._pool(node, "average", True)

    def _op_GlobalMaxPool(self, node):
        self._pool(node, "max", True)

    def _logical_shape(self, name, node):
        """The NCHW-order shape (-1: free)."""
        value, layout = self._value(name)
        if value.shape is None:
            self._fail(node, f"the shape of {name!r} is unknown")
        return tuple(value.shape[p] for p in NHWC_TO_NCHW) if layout == "nhwc" else value.shape

    def _reshape_to(self, node, shape, source=None):
        """node's output = its first input (or the value named source) in a new shape."""
        if list(shape).count(-1) > 1:
            self._fail(node, f"gives shape {shape} with more than one free dimension: fix the input shapes")
        source = source or node.input[0]
        value, layout = self._value(source)
        if layout == "nhwc" and value.shape[1:3] != (1, 1):   # H = W = 1: the same bytes as NCHW
            value = self._plain(source)
        self._set(node, self.net.reshape(value, shape, name=self._fresh(node.output[0])))

    def _op_Flatten(self, node):
        axis = self._attrs(node).get("axis", 1)
        shape = self._logical_shape(node.input[0], node)
        axis = axis + len(shape) if axis < 0 else axis
        self._reshape_to(node, tuple(-1 if -1 in part else int(np.prod(part)) for part in (shape[:axis], shape[axis:])))

    def _op_Reshape(self, node):
        target = self._const(node.input[1])
        if target is None:
            self._fail(node, "the target shape must be a constant")
        shape = self._logical_shape(node.input[0], node)
        self._reshape_to(node, _reshape_shape(shape, target, self._attrs(node).get("allowzero", 0)))

    def _op_Squeeze(self, node):
        shape = self._logical_shape(node.input[0], node)
        self._reshape_to(node, _squeeze(self, node, shape))

    def _op_Unsqueeze(self, node):
        shape = self._logical_shape(node.input[0], node)
        self._reshape_to(node, _unsqueeze(self, node, shape))

    def _op_Transpose(self, node):
        value = self._plain(node.input[0])
        perm = self._attrs(node).get("perm", tuple(reversed(range(len(value.shape)))))
        self._set(node, self.net.transpose(value, perm, name=self._fresh(node.output[0])))

    def _op_Concat(self, node):
        names = [n for n in node.input if n]
        ranks = {len(self.values[n][0].shape) if n in self.values else self.consts[n].ndim for n in names}
        axis = self._attrs(node)["axis"]
        rank = ranks.pop() if len(ranks) == 1 else self._fail(node, "inputs of different ranks")
        axis = axis + rank if axis < 0 else axis
        nhwc = rank == 4 and any(n in self.values and self.values[n][1] == "nhwc" for n in names)
        xs = []
        for n in names:
            if n in self.values:
                xs.append(self._nhwc(n, node) if nhwc else self._plain(n))
            else:
                c = self.consts[n].astype(np.float32)
                xs.append(self.net.constant(c.transpose(NCHW_TO_NHWC) if nhwc else c, self._fresh(n)))
        if nhwc:
            axis = NCHW_TO_NHWC.index(axis)
        self._set(node, self.net.concat(*xs, axis=axis, name=self._fresh(node.output[0])), "nhwc" if nhwc else "plain")

    def _gemm(self, node, x, w, bias, extra):
        out = node.output[0]
        neuron, last = (None, node) if extra is not None else self._fuse_activation(node, out)
        y = self.net.gemm(x, w.astype(np.float32), None if bias is None else bias.astype(np.float32),
                          neuron, name=self._fresh(last.output[0] if extra is None else f"{out}_mm"))
        if extra is not None:
            y = self.net.add(y, self.net.constant(extra.astype(np.float32), self._fresh(f"{out}_c")),
                             name=self._fresh(out))
        self._set(last, y)

    # ---- normalisation, activations without a neuron type -----------------------------------

    def _op_Softmax(self, node):
        axis = self._attrs(node).get("axis", 1 if self.opset < 13 else -1)
        value, layout = self._value(node.input[0])
        rank = len(self._logical_shape(node.input[0], node))
        if not -rank <= axis < rank:
            self._fail(node, f"axis {axis} is outside a rank-{rank} input")
        axis %= rank
        out = self._fresh(node.output[0])
        if layout == "nhwc" and axis == 1 and self.opset >= 13:   # channels: innermost in NHWC
            self._set(node, self.net.softmax(value, name=out), "nhwc")
            return
        value = self._plain(node.input[0])
        shape = value.shape
        if self.opset < 13 and axis < rank - 1:   # softmax of each row flattened from axis on
            if -1 in shape[axis:]:
                self._fail(node, "the flattened dimensions must be static")
            rows = self.net.reshape(value, (-1 if -1 in shape[:axis] else int(np.prod(shape[:axis])),
                                            int(np.prod(shape[axis:]))), name=self._fresh(f"{out}_rows"))
            y = self.net.softmax(rows, name=self._fresh(f"{out}_softmax"))
            self._set(node, self.net.reshape(y, shape, name=out))
        elif axis == rank - 1:
            self._set(node, self.net.softmax(value, name=out))
        else:   # move the axis innermost and back
            perm = tuple(i for i in range(rank) if i != axis) + (axis,)
            t = self.net.transpose(value, perm, name=self._fresh(f"{out}_in"))
            y = self.net.softmax(t, name=self._fresh(f"{out}_softmax"))
            self._set(node, self.net.transpose(y, tuple(np.argsort(perm)), name=out))

    def _op_LayerNormalization(self, node):
        a = self._attrs(node)
        scale = self._const(node.input[1])
        bias = self._const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (len(node.input) > 2 and node.input[2] and bias is None):
            self._fail(node, "Scale and B must be constants")
        value = self._plain(node.input[0])
        rank = len(value.shape)
        axis = a.get("axis", -1)
        if not -rank <= axis < rank:
            self._fail(node, f"axis {axis} is outside a rank-{rank} input")
        for k, output in enumerate(self.net.LAYER_NORM_OUTPUTS):
            if len(node.output) > k and node.output[k]:
                self._set(node, self.net.layer_norm(value, scale, bias, axis, a.get("epsilon", 1e-5), output,
                                                    name=self._fresh(node.output[k])), index=k)

    def _unary_function(self, node, function):
        value, layout = self._value(node.input[0])
        self._set(node, self.net.unary(value, function, name=self._fresh(node.output[0])), layout)

    def _op_Erf(self, node):
        self._unary_function(node, "erf")

    def _op_HardSwish(self, node):
        self._unary_function(node, "hard_swish")

    def _op_Gelu(self, node):
        approximate = self._attrs(node).get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        if approximate == "tanh":
            self._unary_function(node, "gelu_tanh")
        elif approximate == "none":
            self._unary(node)
        else:
            self._fail(node, f"approximate={approximate!r}: 'none' or 'tanh'")

    # ---- gathers: slices, splits, pads, index gathers, nearest resize -------------------------

    def _gather(self, node, tables, value=0.0, index=0, name=None):
        """A gather of node's first input with one table per logical (NCHW-order) dimension
        (None: all of it); an NHWC value stays NHWC."""
        x, layout = self._value(node.input[0])
        if layout == "nhwc":
            tables = [tables[p] for p in NCHW_TO_NHWC]
        y = self.net.gather(x, tables, value, name=self._fresh(name or node.output[index]))
        self._set(node, y, layout, index)

    def _table(self, node, length, axis):
        """Pad, Slice, Split and Resize become gathers with an index table per dimension,
        built here: refuse one longer than _MAX_TABLE (a few bytes of pads or scales could
        ask for gigabytes)."""
        if length > _MAX_TABLE:
            self._fail(node, f"{length} elements along dimension {axis}: at most {_MAX_TABLE} are supported")

    def _static(self, node, shape, axes):
        for a in axes:
            if shape[a] == -1:
                self._fail(node, f"dimension {a} must be static (it is free): fix the input shapes")

    def _input_ints(self, node, k, attr):
        """Integers from input k (opset >= 10 style) or attribute `attr`; None if neither."""
        if len(node.input) > k and node.input[k]:
            c = self._const(node.input[k])
            if c is None:
                self._fail(node, f"input {k} ({node.input[k]!r}) must be a constant")
            return [int(v) for v in c.reshape(-1)]
        a = self._attrs(node)
        return [int(v) for v in a[attr]] if attr in a else None

    def _op_Slice(self, node):
        shape = self._logical_shape(node.input[0], node)
        tables = _slice_tables(self, node, shape)
        if any(t is not None and t.size == 0 for t in tables):
            self._fail(node, "the slice is empty (tensors with a zero-sized dimension are not supported)")
        self._gather(node, tables)

    def _op_Split(self, node):
        shape = self._logical_shape(node.input[0], node)
        rank = len(shape)
        axis = self._attrs(node).get("axis", 0)
        if not -rank <= axis < rank:
            self._fail(node, f"axis {axis} is outside a rank-{rank} input")
        axis %= rank
        self._static(node, shape, [axis])
        sizes = self._input_ints(node, 1, "split")
        outputs = len(node.output)
        if sizes is None:   # equal parts; opset 18: the last may be smaller
            part = -(-shape[axis] // outputs)
            sizes = [min(part, shape[axis] - i * part) for i in range(outputs)]
        if len(sizes) != outputs or sum(sizes) != shape[axis] or min(sizes) < 1:
            self._fail(node, f"split sizes {sizes} do not divide dimension {axis} ({shape[axis]}) into "
                             f"{outputs} non-empty parts")
        start = 0
        for k, size in enumerate(sizes):
            self._table(node, size, axis)
            tables = [None] * rank
            tables[axis] = np.arange(start, start + size)
            self._gather(node, tables, index=k)
            start += size

    def _op_Pad(self, node):
        a = self._attrs(node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("constant", "reflect", "edge", "wrap"):
            self._fail(node, f"mode {mode!r}: constant, reflect, edge or wrap")
        shape = self._logical_shape(node.input[0], node)
        rank = len(shape)
        pads = self._input_ints(node, 1, "pads")
        if pads is None:
            self._fail(node, "pads are missing")
        value = 0.0
        if self.opset < 11:
            value = float(a.get("value", 0.0))
        elif len(node.input) > 2 and node.input[2]:
            c = self._const(node.input[2])
            if c is None:
                self._fail(node, "constant_value must be a constant")
            value = float(c.reshape(-1)[0]) if c.size else 0.0
        axes = self._input_ints(node, 3, "__none__") or list(range(rank))
        axes = [x % rank if -rank <= x < rank else self._fail(node, f"axis {x} is outside a rank-{rank} input")
                for x in axes]
        if len(pads) != 2 * len(axes):
            self._fail(node, f"{len(pads)} pads for {len(axes)} axes (want 2 per axis)")
        tables = [None] * rank
        for k, x in enumerate(axes):
            begin, end = pads[k], pads[k + len(axes)]
            if begin == end == 0:
                continue
            self._static(node, shape, [x])
            d = shape[x]
            if d + begin + end < 1:
                self._fail(node, f"pads {begin}, {end} leave nothing of dimension {x} ({d})")
            if mode in ("reflect", "wrap") and max(-begin, -end) > 0:
                self._fail(node, f"negative pads with mode {mode}")
            if mode == "reflect" and d > 1 and max(begin, end) >= d:
                self._fail(node, f"reflect pads {begin}, {end} must be smaller than dimension {x} ({d})")
            self._table(node, d + begin + end, x)
            tables[x] = _pad_table(np.arange(d + begin + end) - begin, d, mode)
        if all(t is None for t in tables):
            self._op_Identity(node)
            return
        self._gather(node, tables, value)

    def _op_Gather(self, node):
        indices = self._const(node.input[1])
        if indices is None:
            self._fail(node, "the indices must be a constant")
        shape = self._logical_shape(node.input[0], node)
        rank = len(shape)
        axis = self._attrs(node).get("axis", 0)
        if not -rank <= axis < rank:
            self._fail(node, f"axis {axis} is outside a rank-{rank} input")
        axis %= rank
        self._static(node, shape, [axis])
        flat = indices.astype(np.int64).reshape(-1)
        if flat.size == 0 or flat.min() < -shape[axis] or flat.max() >= shape[axis]:
            self._fail(node, f"indices must be non-empty and in -{shape[axis]}..{shape[axis] - 1}")
        tables = [None] * rank
        tables[axis] = flat % shape[axis]
        out = shape[:axis] + indices.shape + shape[axis + 1:]
        if indices.ndim == 1:
            self._gather(node, tables)
            return
        self._gather(node, tables, name=f"{node.output[0]}_flat")
        self._reshape_to(node, out, source=node.output[0])

    def _op_Resize(self, node):
        a = self._attrs(node)
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
        mode = text.get("mode", "nearest")
        mode_ct = text.get("coordinate_transformation_mode", "half_pixel" if self.opset >= 11 else "asymmetric")
        if mode not in ("nearest", "linear"):
            self._fail(node, f"mode {mode!r}: nearest or linear")
        if a.get("antialias", 0):
            self._fail(node, "antialias is not supported")
        if mode_ct not in _RESIZE_COORDINATES:
            self._fail(node, f"coordinate_transformation_mode {mode_ct!r}: one of {', '.join(_RESIZE_COORDINATES)}")
        shape = self._logical_shape(node.input[0], node)
        rank = len(shape)
        scale_input, size_input = (1, None) if self.opset < 11 else (2, 3)
        s = self._const(node.input[scale_input]) if len(node.input) > scale_input else None
        scales = [float(v) for v in s.reshape(-1)] if s is not None and s.size else None
        sizes = self._input_ints(node, size_input, "__none__") if size_input else None
        if scales is None and sizes is None:
            self._fail(node, "scales or sizes must be a non-empty constant")
        axes = [x % rank for x in a.get("axes", range(rank))]
        out, scale = _resize_sizes(self, node, shape, axes, scales, sizes, text.get("keep_aspect_ratio_policy", "stretch"))
        coordinates = [None] * rank   # (source coordinate per output index, source size)
        for x in axes:
            if out[x] != shape[x] or scale[x] != 1.0:
                self._table(node, out[x], x)
                coordinates[x] = (_resize_coordinates(mode_ct, shape[x], out[x], scale[x]), shape[x])
        if all(c is None for c in coordinates):
            self._op_Identity(node)
            return
        if mode == "nearest":
            nearest = text.get("nearest_mode", "round_prefer_floor")
            if nearest not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
                self._fail(node, f"nearest_mode {nearest!r} is not supported")
            self._gather(node, [None if c is None else _nearest(c, nearest) for c in coordinates])
            return
        if rank != 4 or coordinates[0] is not None or coordinates[1] is not None:
            self._fail(node, "linear resize works on the H and W dimensions of a rank-4 (NCHW) input only")
        x = self._nhwc(node.input[0], node)
        for k in (2, 3):
            self._table(node, shape[k], k)
        (y0, y1, wy), (x0, x1, wx) = (_linear(coordinates[k] or (np.arange(shape[k], dtype=np.float64), shape[k]))
                                      for k in (2, 3))
        self._set(node, self.net.resize_linear(x, y0, y1, wy, x0, x1, wx, name=self._fresh(node.output[0])), "nhwc")

    # ---- reductions ------------------------------------------------------------------------------

    def _reduce(self, node, op):
        a = self._attrs(node)
        shape = self._logical_shape(node.input[0], node)
        rank = len(shape)
        uses_input = self.opset >= 18 or (node.op_type == "ReduceSum" and self.opset >= 13)
        axes = self._input_ints(node, 1, "__none__") if uses_input else \
            ([int(x) for x in a["axes"]] if "axes" in a else None)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                self._op_Identity(node)
                return
            axes = list(range(rank))
        if any(not -rank <= x < rank for x in axes):
            self._fail(node, f"axes {axes} are outside a rank-{rank} input")
        axes = sorted({x % rank for x in axes})
        value, layout = self._value(node.input[0])
        physical = sorted(NCHW_TO_NHWC.index(x) for x in axes) if layout == "nhwc" else axes
        groups = [[physical[0]]]   # contiguous runs, one reduce node each
        for x in physical[1:]:
            if x == groups[-1][-1] + 1:
                groups[-1].append(x)
            else:
                groups.append([x])
        keep = a.get("keepdims", 1)
        out = node.output[0] if keep else f"{node.output[0]}_keep"
        for k, group in enumerate(groups):
            name = self._fresh(out if k == len(groups) - 1 else f"{out}_{k}")
            value = self.net.reduce(value, op, group, name=name)
        self.values[out] = (value, layout)
        if not keep:
            self._reshape_to(node, tuple(d for i, d in enumerate(shape) if i not in axes) or (1,), source=out)

    def _op_ReduceMean(self, node):
        self._reduce(node, "mean")

    def _op_ReduceSum(self, node):
        self._reduce(node, "sum")

    def _op_ReduceMax(self, node):
        self._reduce(node, "max")

    def _op_ReduceMin(self, node):
        self._reduce(node, "min")

    # ---- matrix products -----------------------------------------------------------------------

    def _op_Gemm(self, node):
        a = self._attrs(node)
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        b = self._const(node.input[1])
        c = self._const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is None or a.get("transA", 0) or (c is None and len(node.input) > 2 and node.input[2]):
            # a run-time operand (or A transposed): mk_sgemm
            x, w = self._plain(node.input[0]), self._operand(node.input[1])
            y = self.net.matmul(x, w, bool(a.get("transA", 0)), bool(a.get("transB", 0)), alpha,
                                name=self._fresh(node.output[0] if len(node.input) < 3 or not node.input[2]
                                                 else f"{node.output[0]}_mm"))
            if len(node.input) > 2 and node.input[2]:
                bias = self._operand(node.input[2], beta)
                y = self.net.add(y, bias, name=self._fresh(node.output[0]))
            self._set(node, y)
            return
        x = self._plain(node.input[0])
        w = b.astype(np.float64)
        w = (w if a.get("transB", 0) else w.T) * alpha
        bias, extra = None, None
        if c is not None:
            c = c.astype(np.float64) * beta
            if c.size == 1 or (c.ndim >= 1 and c.shape[-1] == w.shape[0] and c.size == w.shape[0]):
                bias = np.broadcast_to(c.reshape(-1), (w.shape[0],))
            else:
                extra = c
        self._gemm(node, x, w, bias, extra)

    def _operand(self, name, scale=1.0):
        """A plain value (a constant times scale, or a computed value times scale)."""
        c = self._const(name)
        if c is not None:
            return self.net.constant(c.astype(np.float64) * scale, self._fresh(name))
        x = self._plain(name)
        if scale != 1.0:
            x = self.net.mul(x, self.net.constant(np.float32(scale), self._fresh(f"{name}_scale")),
                             name=self._fresh(f"{name}_scaled"))
        return x

    def _op_MatMul(self, node):
        b = self._const(node.input[1])
        a_shape = self._logical_shape(node.input[0], node)
        if b is not None and b.ndim == 2 and len(a_shape) >= 2:   # weights: the GEMM of a layer
            bias, last = None, node
            add = self._sole_reader(node.output[0], ("Add",))   # + a constant row: the bias
            if add is not None:
                c = self._const(add.input[1] if add.input[0] == node.output[0] else add.input[0])
                if c is not None and c.size == b.shape[1] and c.shape[-1:] == (c.size,) and c.ndim <= len(a_shape):
                    bias, last = c.reshape(-1).astype(np.float64), add
                    self.skip.add(id(add))
            self._gemm(last, self._plain(node.input[0]), b.astype(np.float64).T, bias, None)
            return
        x, w = self._plain(node.input[0]), self._operand(node.input[1])
        out = node.output[0]
        vec_a, vec_b = len(x.shape) == 1, len(w.shape) == 1
        if vec_a:   # 1-D operands: a row / a column, dropped from the result
            x = self.net.reshape(x, (1,) + x.shape, name=self._fresh(f"{out}_a"))
        if vec_b:
            w = self.net.reshape(w, w.shape + (1,), name=self._fresh(f"{out}_b"))
        alpha, last = 1.0, node
        scale = self._sole_reader(out, ("Mul", "Div"))   # times / over a scalar: alpha
        if scale is not None and not (vec_a or vec_b):
            c = self._const(scale.input[1] if scale.input[0] == out else scale.input[0])
            rank = max(len(x.shape), len(w.shape))
            if c is not None and c.size == 1 and c.ndim <= rank and \
                    (scale.op_type == "Mul" or (scale.input[0] == out and float(c) != 0)):
                alpha = float(c) if scale.op_type == "Mul" else 1.0 / float(c)
                last = scale
                self.skip.add(id(scale))
        y = self.net.matmul(x, w, alpha=alpha, name=self._fresh(last.output[0] if not (vec_a or vec_b) else f"{out}_mm"))
        if vec_a or vec_b:
            shape = y.shape[:-2] + (() if vec_a else y.shape[-2:-1]) + (() if vec_b else y.shape[-1:])
            y = self.net.reshape(y, shape or (1,), name=self._fresh(out))
        self._set(last, y)

    def _op_ConvTranspose(self, node):
        a = self._attrs(node)
        w, b = self._conv_weights(node, "[in][out/groups][kh][kw]")
        x = self._nhwc(node.input[0], node)
        groups = a.get("group", 1)
        cin, cout_g, kh, kw = w.shape
        if cin % groups:
            self._fail(node, f"{cin} input channels do not split into {groups} groups")
        strides = tuple(a.get("strides", (1, 1)))
        dilations = tuple(a.get("dilations", (1, 1)))
        output_padding = tuple(a.get("output_padding", (0, 0)))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        hw = x.shape[1:3] if x.shape else None
        full = None if hw is None or -1 in hw else [
            s * (i - 1) + o + (k - 1) * d + 1 for i, k, s, d, o in zip(hw, (kh, kw), strides, dilations, output_padding)]
        out_shape = a.get("output_shape")
        if auto in ("SAME_UPPER", "SAME_LOWER") and out_shape is None and "pads" not in a:
            out_shape = None if hw is None or -1 in hw else [i * s for i, s in zip(hw, strides)]
        if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            if full is None or out_shape is None or len(out_shape) != 2:
                self._fail(node, "output_shape / auto_pad needs a static 2-D input size")
            out_shape = tuple(out_shape)[-2:]
            if "pads" in a:   # explicit pads with an output_shape: the window at pads' begin
                top, left = a["pads"][0], a["pads"][1]
            else:
                total = [f - o for f, o in zip(full, out_shape)]
                top, left = (t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total)
            pads = (top, left, full[0] - top - out_shape[0], full[1] - left - out_shape[1])
        else:
            pads = tuple(a.get("pads", (0, 0, 0, 0)))
        if len(pads) != 4 or len(strides) != 2:
            self._fail(node, "2-D ConvTranspose only")
        wt = w.reshape(groups, cin // groups, cout_g, kh, kw).transpose(0, 2, 3, 4, 1).reshape(groups * cout_g, kh, kw, cin // groups)
        neuron, last = self._fuse_activation(node, node.output[0])
        y = self.net.conv_transpose2d(x, wt, b, strides, dilations, pads, output_padding, groups, neuron,
                                      name=self._fresh(last.output[0]))
        self.values[last.output[0]] = (y, "nhwc")


_MAX_TABLE = 1 << 20   # elements of an index table (Importer._table)


def _slice_tables(imp, node, shape):
    """One index table per dimension (None: all of it) for Slice."""
    rank = len(shape)
    if imp.opset < 10:
        a = imp._attrs(node)
        starts, ends, axes, steps = list(a["starts"]), list(a["ends"]), a.get("axes"), None
    else:
        starts, ends, axes, steps = (imp._input_ints(node, k, "__none__") for k in (1, 2, 3, 4))
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        imp._fail(node, "starts, ends, axes and steps must have the same length")
    tables = [None] * rank
    for start, end, x, step in zip(starts, ends, axes, steps):
        if not -rank <= x < rank or tables[x % rank] is not None:
            imp._fail(node, f"axis {x} is outside a rank-{rank} input or repeated")
        x %= rank
        if step == 0:
            imp._fail(node, "a step of 0")
        imp._static(node, shape, [x])
        indices = range(*slice(start, end, step).indices(shape[x]))
        imp._table(node, len(indices), x)
        tables[x] = np.arange(indices.start, indices.stop, indices.step)
    return tables


def _pad_table(i, d, mode):
    """Source index of each padded position i (-1: the constant)."""
    if mode == "constant":
        return np.where((i >= 0) & (i < d), i, -1)
    if mode == "edge":
        return np.clip(i, 0, d - 1)
    if mode == "wrap":
        return i % d
    if d == 1:   # reflect: mirror about the edges without repeating them
        return np.zeros_like(i)
    j = i % (2 * (d - 1))
    return np.where(j >= d, 2 * (d - 1) - j, j)


_RESIZE_COORDINATES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")


def _resize_sizes(imp, node, shape, axes, scales, sizes, policy):
    """(output size, scale) per dimension of Resize."""
    out, scale = list(shape), [1.0] * len(shape)
    given = sizes if sizes is not None else scales
    if len(given) != len(axes):
        imp._fail(node, f"{len(given)} scales / sizes for {len(axes)} axes")
    if sizes is not None:
        imp._static(node, shape, axes)
        ratio = {x: sizes[i] / shape[x] for i, x in enumerate(axes)}
        if policy not in ("stretch", "not_larger", "not_smaller"):
            imp._fail(node, f"keep_aspect_ratio_policy {policy!r} is not supported")
        for i, x in enumerate(axes):
            if policy == "stretch":
                scale[x], out[x] = ratio[x], sizes[i]
            else:
                scale[x] = (min if policy == "not_larger" else max)(ratio.values())
                out[x] = int(scale[x] * shape[x] + 0.5)
    else:
        for i, x in enumerate(axes):
            if scales[i] <= 0:
                imp._fail(node, f"scale {scales[i]} must be positive")
            if scales[i] != 1.0:
                imp._static(node, shape, [x])
                scale[x], out[x] = scales[i], int(shape[x] * scales[i])
    if min(d for d in out if d != -1) < 1:
        imp._fail(node, f"the output {out} is empty")
    return out, scale


def _resize_coordinates(mode, d, out, scale):
    """The source coordinate of each output index along one dimension (ONNX's
    coordinate_transformation_mode; the width is scale * d, as the reference has it)."""
    y = np.arange(out, dtype=np.float64)
    width = scale * d
    if mode == "align_corners":
        return np.zeros(out) if width == 1 else y * (d - 1) / (width - 1)
    if mode == "asymmetric":
        return y / scale
    if mode == "pytorch_half_pixel" and width == 1:
        return np.full(out, -0.5)
    offset = d / 2 * (1 - out / width) if mode == "half_pixel_symmetric" else 0.0
    return offset + (y + 0.5) / scale - 0.5


def _nearest(coordinates, mode):
    x, d = coordinates
    i = np.floor(x)
    r = x - i
    up = {"round_prefer_floor": r > 0.5, "round_prefer_ceil": r >= 0.5, "floor": r < 0, "ceil": r > 0}[mode]
    return np.clip(i + up, 0, d - 1).astype(np.int32)


def _linear(coordinates):
    """(i0, i1, weight of i1) of linear interpolation, taps clamped to the edges."""
    x, d = coordinates
    i = np.floor(x)
    return (np.clip(i, 0, d - 1).astype(np.int32), np.clip(i + 1, 0, d - 1).astype(np.int32),
            (x - i).astype(np.float32))


def _reshape_shape(shape, target, allowzero):
    out = [int(d) for d in target]
    for i, d in enumerate(out):
        if d == 0 and not allowzero:
            out[i] = shape[i]
    if -1 in out and -1 not in shape and out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(shape)) // known if known else 0
    return tuple(out)


def _shape_part(imp, node, shape):
    a = imp._attrs(node)
    return tuple(shape)[a.get("start", 0):a.get("end", len(shape))]


def _axes(imp, node, rank):
    a = imp._attrs(node)
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        c = imp._const(node.input[1])
        if c is None:
            imp._fail(node, "axes must be a constant")
        axes = [int(x) for x in c.reshape(-1)]
    else:
        axes = None
    return None if axes is None else sorted(x + rank if x < 0 else x for x in axes)


def _squeeze(imp, node, shape):
    axes = _axes(imp, node, len(shape))
    if axes is None:
        return tuple(d for d in shape if d != 1)
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _unsqueeze(imp, node, shape):
    count = len(_axes(imp, node, 0) or [])   # negative axes count from the output's rank
    axes = _axes(imp, node, len(shape) + count)
    out = list(shape)
    for x in axes:
        out.insert(x, 1)
    return tuple(out)


# constant folding: op -> fn(importer, node, constant inputs) evaluated at build time
_FOLD = {
    "Identity": lambda imp, n, c: c[0],
    "Add": lambda imp, n, c: c[0] + c[1],
    "Sub": lambda imp, n, c: c[0] - c[1],
    "Mul": lambda imp, n, c: c[0] * c[1],
    "Div": lambda imp, n, c: _int_div(c[0], c[1]) if c[0].dtype.kind in "iu" else c[0] / c[1],
    "Reshape": lambda imp, n, c: c[0].reshape(_reshape_shape(c[0].shape, c[1], imp._attrs(n).get("allowzero", 0))),
    "Flatten": lambda imp, n, c: c[0].reshape(int(np.prod(c[0].shape[:imp._attrs(n).get("axis", 1)])), -1),
    "Squeeze": lambda imp, n, c: c[0].reshape(_squeeze(imp, n, c[0].shape)),
    "Unsqueeze": lambda imp, n, c: c[0].reshape(_unsqueeze(imp, n, c[0].shape)),
    "Transpose": lambda imp, n, c: c[0].transpose(imp._attrs(n).get("perm")),
    "Concat": lambda imp, n, c: np.concatenate(c, imp._attrs(n)["axis"]),
    "Gather": lambda imp, n, c: np.take(c[0], c[1], imp._attrs(n).get("axis", 0)),
    "Slice": lambda imp, n, c: c[0][np.ix_(*[np.arange(d) if t is None else t
                                             for t, d in zip(_slice_tables(imp, n, c[0].shape), c[0].shape)])],
    "Cast": lambda imp, n, c: c[0].astype(_onnx()[0].helper.tensor_dtype_to_np_dtype(imp._attrs(n)["to"])),
    "Shape": lambda imp, n, c: np.array(_shape_part(imp, n, c[0].shape), np.int64),
    # shape arithmetic exporters emit (torch's attention: Mod, Sqrt of head sizes, ...)
    "Mod": lambda imp, n, c: (np.fmod if imp._attrs(n).get("fmod", 0) else np.mod)(c[0], c[1]),
    "Sqrt": lambda imp, n, c: np.sqrt(c[0]),
    "Neg": lambda imp, n, c: -c[0],
    "Reciprocal": lambda imp, n, c: 1 / c[0],
    "Floor": lambda imp, n, c: np.floor(c[0]),
    "Ceil": lambda imp, n, c: np.ceil(c[0]),
    "Pow": lambda imp, n, c: np.power(c[0], c[1]).astype(c[0].dtype),
    "Min": lambda imp, n, c: np.minimum.reduce([x for x in c if x is not None]),
    "Max": lambda imp, n, c: np.maximum.reduce([x for x in c if x is not None]),
    "Equal": lambda imp, n, c: np.equal(c[0], c[1]),
    "Less": lambda imp, n, c: np.less(c[0], c[1]),
    "Greater": lambda imp, n, c: np.greater(c[0], c[1]),
    "Not": lambda imp, n, c: np.logical_not(c[0]),
    "And": lambda imp, n, c: np.logical_and(c[0], c[1]),
    "Or": lambda imp, n, c: np.logical_or(c[0], c[1]),
    "Where": lambda imp, n, c: np.where(c[0], c[1], c[2]),
    "Range": lambda imp, n, c: np.arange(c[0], c[1], c[2]).astype(c[0].dtype),
    "Size": lambda imp, n, c: np.array(c[0].size, np.int64),
    "CastLike": lambda imp, n, c: c[0].astype(c[1].dtype),
    "Expand": lambda imp, n, c: np.array(np.broadcast_to(c[0], np.broadcast_shapes(c[0].shape, tuple(c[1])))),
    "ConstantOfShape": lambda imp, n, c: np.full(tuple(c[0]), imp.numpy_helper.to_array(imp._attrs(n)["value"]).reshape(-1)[0]
                                                  if "value" in imp._attrs(n) else np.float32(0)),
}


def _int_div(a, b):
    """ONNX integer division: truncation toward zero (NumPy's // floors)."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))

# ops with a kernel (any input); ops folded at build time when all their inputs are constant
KERNEL_OPS = {op[4:] for op in dir(_Importer) if op.startswith("_op_")} | {"Constant"}
SUPPORTED = KERNEL_OPS | set(_FOLD)
