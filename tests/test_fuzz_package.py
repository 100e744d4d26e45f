"""Fuzz the model loaders with malformed files: hypothesis mutations of a small valid .mpkg
package (bit flips, overwritten, inserted and deleted bytes, truncation, preamble fields set
to 0, odd or huge values, the header JSON edited anywhere: values replaced by huge numbers,
NaN, wrong types, deep nesting; keys and list entries dropped or repeated) and of a small
valid ONNX model (its bytes, and its protobuf edited: attributes, op types, edges,
initializer shapes and data, input shapes, opset).

Checks, for every file: the loader returns networks or raises the loader's own exception
(PackageError for a package, ValidationError for ONNX), never another type, a crash or a
hang (20 s of CPU per call), and never allocates much more than the file (tracemalloc
peak, which sees NumPy's buffers too). A network that loads must also compile and run when its shapes are small
(result or ValidationError, nothing else), and an ONNX model that imports must survive the
package round trip.

CI runs a short fixed fuzz (test_package_fuzz, test_onnx_fuzz); scripts/fuzz_long.py runs
these with fresh seeds as part of the 100,000-call long run.
"""
import collections
import contextlib
import faulthandler
import json
import math
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mpskernels as mk
from mpskernels import ml, ml_package
from mpskernels.ml_package import PackageError

STATS = collections.Counter()   # loads and outcomes, over every example of the process
HANG_SECONDS = 60               # one file taking this long is a hang: dump stacks and abort
MAX_PEAK = 32 << 20             # bytes a load may allocate (the files are a few KB)
MAX_RUN_BYTES = 4 << 20         # run a loaded network only if its tensors are this small
PREAMBLE = struct.Struct("<8sIIQQ")
ML_USAGE = mk.TensorUsage.COMPUTE | mk.TensorUsage.MACHINE_LEARNING


# ---- the valid files the mutations start from ------------------------------------------------

def small_network():
    """Every op of the IR, on tiny shapes (a package of a few KB)."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    net = ml.Network("small")
    x = net.input("x", (-1, 5, 4, 3))
    c = net.conv2d(x, f(4, 3, 3, 3), f(4), pads=(1, 1, 1, 1),
                   neuron=mk.NNNeuronDescriptor(mk.CNNNeuronType.RELU))
    p = net.pool2d(c, "max", (2, 2), (2, 2), ceil_mode=True)
    s = net.add(p, net.constant(f(4)), clamp=(-1.0, 2.0))
    n = net.neuron(s, mk.CNNNeuronType.PRELU, prelu=f(4))
    m = net.concat(net.sub(n, net.constant(0.5)), net.div(n, net.constant(f(1, 1, 1, 4))), axis=3)
    g = net.pool2d(net.mul(m, m), "average")
    r = net.reshape(net.transpose(g, (0, 3, 1, 2)), (-1, 8))
    net.output(net.gemm(r, f(2, 8), f(2), mk.NNNeuronDescriptor(mk.CNNNeuronType.SIGMOID)), "y")
    net.output(p, "pooled")
    two = ml.Network("two")    # the ops of transformers and decoders
    a = two.input("a", (2, 3, 4))
    t = two.layer_norm(two.softmax(a), f(4), f(4))
    u = two.unary(two.matmul(t, two.constant(f(4, 5)), alpha=0.5), "gelu_tanh")
    v = two.gather(two.reduce(u, "mean", (2,)), [None, [0, -1, 2], [0]], value=1.0)
    img = two.reshape(v, (1, 2, 3, 1))
    up = two.conv_transpose2d(img, f(2, 2, 2, 1), f(2), strides=(2, 2), pads=(0, 1, 0, 0))
    two.output(two.resize_linear(up, [0, 1, 3], [1, 2, 3], [0.5, 0.25, 0.0], [0, 2], [1, 3], [0.5, 1.0]), "b")
    return {"small": net, "two": two}


_GOOD = {}


def good_package():
    if "mpkg" not in _GOOD:
        _GOOD["mpkg"] = ml_package.package_bytes(small_network())
    return _GOOD["mpkg"]


def good_onnx():
    """A small ONNX model (NCHW) through the importer's CNN ops, serialized."""
    if "onnx" not in _GOOD:
        from onnx import TensorProto, helper, numpy_helper
        rng = np.random.default_rng(1)
        init = []

        def const(name, *shape, positive=False):
            a = rng.standard_normal(shape)
            init.append(numpy_helper.from_array((np.abs(a) + 0.1 if positive else a).astype(np.float32), name))
            return name
        init.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
        init.append(numpy_helper.from_array(np.array(-1.0, np.float32), "lo"))
        init.append(numpy_helper.from_array(np.array(1.0, np.float32), "hi"))
        node = helper.make_node
        nodes = [
            node("Conv", ["x", const("w", 4, 3, 3, 3), const("b", 4)], ["c"], pads=[1, 1, 1, 1],
                 strides=[1, 1], dilations=[1, 1], group=1),
            node("BatchNormalization", ["c", const("g", 4), const("be", 4), const("m", 4),
                                        const("v", 4, positive=True)], ["n"], epsilon=1e-5),
            node("Relu", ["n"], ["r"]),
            node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
            node("AveragePool", ["p"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            node("Add", ["p", "ap"], ["s"]),
            node("PRelu", ["s", const("slope", 4, 1, 1)], ["pr"]),
            node("Clip", ["pr", "lo", "hi"], ["cl"]),
            node("Concat", ["cl", "p"], ["cc"], axis=1),
            node("Transpose", ["cc"], ["t"], perm=[0, 2, 3, 1]),
            node("GlobalAveragePool", ["cc"], ["gap"]),
            node("Flatten", ["gap"], ["f"], axis=1),
            node("Gemm", ["f", const("fw", 3, 8), const("fb", 3)], ["y0"], transB=1),
            node("Sigmoid", ["y0"], ["y"]),
            node("Reshape", ["t", "flat"], ["z0"]),
            node("MatMul", ["z0", const("mw", 96, 2)], ["z"]),
        ]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])], init)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        _GOOD["onnx"] = model.SerializeToString()
    return _GOOD["onnx"]


def good_onnx2():
    """A small ONNX model through the importer's other ops (normalisation, softmax, slices,
    pads, gathers, reductions, splits, transposed convolution, resize), serialized."""
    if "onnx2" not in _GOOD:
        from onnx import TensorProto, helper, numpy_helper
        rng = np.random.default_rng(2)
        init = []

        def const(name, a):
            init.append(numpy_helper.from_array(np.asarray(a), name))
            return name
        f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        i64 = lambda v: np.array(v, np.int64)  # noqa: E731
        node = helper.make_node
        nodes = [
            node("LayerNormalization", ["x", const("ls", f32(8)), const("lb", f32(8))], ["ln"], axis=-1),
            node("Softmax", ["ln"], ["sm"], axis=-1),
            node("Slice", ["sm", const("st", i64([1])), const("en", i64([7])), const("ax", i64([2])),
                           const("sp", i64([2]))], ["sl"]),
            node("Pad", ["sl", const("pads", i64([0, 0, 1, 0, 0, 1])), const("pv", np.float32(0.5))], ["pd"],
                 mode="constant"),
            node("ReduceMean", ["pd"], ["rm"], axes=[2], keepdims=1),
            node("Gather", ["pd", const("gi", i64([0, 2]))], ["ga"], axis=1),
            node("Erf", ["ga"], ["e"]),
            node("HardSwish", ["e"], ["hs"]),
            node("Split", ["hs", const("split", i64([2, 3]))], ["s1", "s2"], axis=2),
            node("Unsqueeze", ["s2", const("ua", i64([1]))], ["un"]),
            node("ConvTranspose", ["un", const("ctw", f32(1, 2, 2, 2))], ["ct"], strides=[2, 2]),
            node("Resize", ["ct", "", const("sc", np.array([1, 1, 0.5, 0.5], np.float32))], ["rs"], mode="linear"),
        ]
        value = helper.make_tensor_value_info
        graph = helper.make_graph(nodes, "g2", [value("x", TensorProto.FLOAT, [2, 3, 8])],
                                  [value("rs", TensorProto.FLOAT, [2, 2, 2, 3]),
                                   value("rm", TensorProto.FLOAT, [2, 3, 1]),
                                   value("s1", TensorProto.FLOAT, [2, 2, 2])], init)
        _GOOD["onnx2"] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return _GOOD["onnx2"]


# ---- mutations ---------------------------------------------------------------------------------

# numbers that break arithmetic: zero, negatives, off by one, the edges of integer types, huge
INTS = [0, 1, 2, 3, -1, -2, 7, 63, 64, 65, 255, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 62,
        2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 30]
JSON_VALUES = INTS + [0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), True,
                      False, None, "", "x", "float32", "object", "max", "conv2d", "__class__", [],
                      [1], [[]], [0, 0], [-1, 8], {}, {"$array": 0}, {"$array": -1},
                      {"$neuron": [1, 0, 0, 0, None]}, {"$neuron": []}, {"$array": 0, "x": 1}]


def _paths(node, path=()):
    """Every position in the JSON tree: (path, value)."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def edit_header(data, draw):
    """The package with its header JSON edited (the preamble made consistent again)."""
    _, version, hlen, base, blen = PREAMBLE.unpack_from(data)
    header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hlen])
    text = None
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(header))
        path, value = paths[draw(st.integers(1, len(paths) - 1))]
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "repeat", "number", "deep"]))
        key = path[-1]
        if how == "drop":
            del parent[key]
        elif how == "repeat" and isinstance(parent, list):
            parent.insert(key, parent[key])
        elif how == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = value + draw(st.sampled_from([-1, 1, 64, -64, 2 ** 40, 0.5]))
        elif how == "deep":
            text = "[" * 100_000 + "]" * 100_000   # deeper than any parser's stack
            parent[key] = "@DEEP@"
        else:
            parent[key] = draw(st.sampled_from(JSON_VALUES))
    out = json.dumps(header, separators=(",", ":"))
    if text is not None:
        out = out.replace('"@DEEP@"', text)
    return with_header(out.encode(), data[base:], version)


def with_header(text, blob, version=ml_package.VERSION):
    base = -(-(PREAMBLE.size + len(text)) // 64) * 64
    return (PREAMBLE.pack(ml_package.MAGIC, version, len(text), base, len(blob)) + text
            + b"\0" * (base - PREAMBLE.size - len(text)) + blob)


def edit_preamble(data, draw):
    field = draw(st.sampled_from([(8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q")]))
    size = struct.calcsize(field[1])
    value = draw(st.sampled_from([0, 1, 32, 64, len(data), len(data) - 64, 2 ** (8 * size) - 1,
                                  2 ** (8 * size - 1)]))
    value += draw(st.sampled_from([0, 0, 1, -1]))
    value %= 2 ** (8 * size)
    return data[:field[0]] + struct.pack(field[1], value) + data[field[0] + size:]


def edit_bytes(data, draw):
    """Byte-level damage, anywhere (positions biased to the start, where the structure is)."""
    n = len(data)
    at = draw(st.one_of(st.integers(0, min(n, 64)), st.integers(0, n)))
    how = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
    if how == "flip" and at < n:
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    if how == "set" and at < n:
        return data[:at] + bytes([draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord('"')]))]) + data[at + 1:]
    if how == "truncate":
        return data[:at]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if how == "delete":
        return data[:at] + data[at + draw(st.integers(1, 64)):]
    if how == "duplicate":
        return data[:at] + data[at:at + draw(st.integers(1, 256))] + data[at:]
    return data[:at]


def mutated_package(draw):
    data = good_package()
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["header", "header", "header", "preamble", "bytes", "bytes"]))
        try:
            if how == "header":
                data = edit_header(data, draw)
            elif how == "preamble":
                data = edit_preamble(data, draw)
            else:
                data = edit_bytes(data, draw)
        except (ValueError, struct.error, IndexError, KeyError, TypeError, RecursionError):
            pass   # a previous edit broke what this one parses: keep the bytes as they are
    return data


# ---- checking one file -------------------------------------------------------------------------

@contextlib.contextmanager
def _watched():
    """One file's check: tracemalloc on, and within that the hang watchdog armed.
    tracemalloc.start() and stop() swap CPython's raw allocator without a lock: a thread
    calling PyMem_RawFree meanwhile can read the new free function with the old context and
    die of SIGSEGV (cpython#131566). faulthandler.dump_traceback_later() starts a fresh watchdog
    thread whose first act is such a free, so the allocator must not change while a watchdog
    is armed: cancelling it joins its thread."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if started:
            tracemalloc.stop()


def _loads(fn, allowed, what):
    """fn() must return or raise one of `allowed`; it must not allocate much (tracemalloc
    peak above what was traced when it began) nor take long. Returns (result or None, the
    exception or None)."""
    STATS["calls"] += 1
    STATS[what] += 1
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.process_time()   # CPU time: a paused or starved process is not slow (a hang: HANG_SECONDS)
    try:
        result = fn()
    except allowed as exc:
        STATS["raised " + type(exc).__name__] += 1
        return None, exc
    except RecursionError as exc:
        raise AssertionError(f"{what}: RecursionError: {exc}") from None
    except Exception as exc:   # noqa: BLE001 - any other type is the finding
        raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
        assert peak < MAX_PEAK, f"{what}: allocated {peak} bytes at peak"
        assert time.process_time() - t0 < 20, f"{what}: took {time.process_time() - t0:.1f} s of CPU"
    STATS[what + " loaded"] += 1
    return result, None


def run_network(net, device):
    """Compile and run a loaded network if its shapes are small: it must give results or
    raise ValidationError (never another exception, a crash or a huge allocation)."""
    shapes = []
    for v in net.inputs:
        shape = tuple(2 if d == -1 else d for d in v.shape)
        if math.prod(shape) * 4 > MAX_RUN_BYTES or v.data_type != mk.TensorDataType.FLOAT32:
            return
        shapes.append(shape)

    def compile_and_run():
        d = ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor(net.name, ml.Library(device, net)))
        for i, shape in enumerate(shapes):
            d.set_input_dimensions(mk.TensorExtents.from_shape(shape), i)
        state = device.make_compiler().make_machine_learning_pipeline_state(d)
        sizes = [math.prod(b.dimensions.shape) * 4 for b in state.reflection.bindings]
        if state.intermediates_heap_size > MAX_RUN_BYTES or max(sizes, default=0) > MAX_RUN_BYTES:
            STATS["run skipped (large)"] += 1
            return None
        rng = np.random.default_rng(0)
        table = device.make_argument_table(ml.ArgumentTableDescriptor(
            max_buffer_bind_count=max(8, len(state.reflection.bindings))))
        outputs = []
        for b in state.reflection.bindings:
            array = rng.uniform(-2, 2, b.dimensions.shape).astype(np.float32)
            t = mk.Tensor.from_numpy(device, array, usage=ML_USAGE)
            table.set_tensor(t, b.index)
            outputs.append(t)
        cb = device.make_command_queue().make_command_buffer()
        enc = cb.make_machine_learning_command_encoder()
        enc.set_pipeline_state(state)
        enc.set_argument_table(table)
        enc.dispatch_network(device.make_heap(mk.HeapDescriptor(size=max(state.intermediates_heap_size, 64))))
        enc.end_encoding()
        cb.commit()
        cb.wait_until_completed()
        assert cb.error is None, cb.error
        return [t.to_numpy() for t in outputs[len(shapes):]]

    _loads(compile_and_run, mk.ValidationError, "run a loaded network")


def check_package(data, device):
    with _watched():
        nets, _ = _loads(lambda: ml_package.load_package_bytes(data, "fuzz.mpkg"), PackageError,
                         "load_package_bytes")
        for net in (nets or {}).values():
            run_network(net, device)


def check_onnx(data, device):
    with _watched():
        from mpskernels.onnx_import import import_onnx
        net, _ = _loads(lambda: import_onnx(data), mk.ValidationError, "import_onnx")
        if net is None:
            return
        # what imports must package and load back (load_networks does exactly this)
        nets, exc = _loads(lambda: ml_package.load_package_bytes(ml_package.package_bytes(net), "round trip"),
                           (), "package round trip")
        run_network(nets[net.name], device)


# ---- ONNX mutations ------------------------------------------------------------------------------

OPS = ["Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "Add", "Mul", "Div", "PRelu",
       "Clip", "Concat", "Transpose", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm",
       "Sigmoid", "Reshape", "MatMul", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Constant",
       "LeakyRelu", "Softplus", "Log", "Shape", "Resize", ""]
SMALL = [-2, -1, 0, 1, 2, 3, 4, 5, 8]
FLOATS = [0.0, -1.0, 0.5, 1e30, -1e30, float("nan"), float("inf"), 1e-30, 1e-45]


def _factorization(n, draw):
    """Dims (1-5 of them) whose product is n."""
    dims = []
    for _ in range(draw(st.integers(0, 4))):
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        d = draw(st.sampled_from(divisors))
        dims.append(d)
        n //= d
    return dims + [n]


def _edit_onnx(model, draw):
    """One edit of the model, most of them ones the ONNX checker lets through (so that the
    importer, not the checker, has to cope): attribute values, initializer shapes and values,
    input shapes, edges, op types, dropped nodes and outputs, the opset."""
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    how = draw(st.sampled_from(["attribute"] * 4 + ["initializer"] * 3 + ["input shape"] * 2
                               + ["edge", "op", "new attribute", "drop node", "opset", "output"]))
    if how in ("attribute", "new attribute", "op", "edge", "drop node") and not g.node:
        return
    pick = lambda items: items[draw(st.integers(0, len(items) - 1))]  # noqa: E731 - prints short
    node = pick(g.node) if g.node else None
    if how == "attribute" and node.attribute:
        a = pick(node.attribute)
        if a.type == a.INTS:
            values = list(a.ints)
            if values and draw(st.integers(0, 3)):
                values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(SMALL + [2 ** 31, 2 ** 62]))
            else:
                values = draw(st.lists(st.sampled_from(SMALL + [-2 ** 63, 2 ** 62]), max_size=6))
            a.ClearField("ints")
            a.ints.extend(values)
        elif a.type == a.INT:
            a.i = draw(st.sampled_from(SMALL + [-2 ** 63, 2 ** 62]))
        elif a.type == a.FLOAT:
            a.f = draw(st.sampled_from(FLOATS))
    elif how == "new attribute":
        name = draw(st.sampled_from(["axis", "perm", "pads", "strides", "kernel_shape", "group",
                                     "dilations", "auto_pad", "ceil_mode", "transA", "transB",
                                     "alpha", "beta", "axes", "allowzero", "count_include_pad"]))
        value = draw(st.sampled_from([0, 1, -1, 2, [0], [1, 1], [2, 2], [0, 0, 0, 0], [1, 2, 1, 2],
                                      [3, 2, 1, 0], [0, 3, 1, 2], "SAME_UPPER", "VALID", 0.5]))
        for a in list(node.attribute):
            if a.name == name:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(name, value))
    elif how == "op":
        node.op_type = draw(st.sampled_from(OPS))
    elif how == "edge":
        names = ([i.name for i in g.initializer] + [n.output[0] for n in g.node if n.output]
                 + ["x", "", "nowhere"])
        k = draw(st.integers(0, len(node.input)))
        if k < len(node.input) and draw(st.integers(0, 3)):
            node.input[k] = draw(st.sampled_from(names))
        elif k < len(node.input):
            del node.input[k]
        else:
            node.input.append(draw(st.sampled_from(names)))
    elif how == "initializer" and g.initializer:
        t = pick(g.initializer)
        try:
            array = numpy_helper.to_array(t)
        except ValueError:   # damaged by an earlier edit
            return
        what = draw(st.sampled_from(["reshape", "reshape", "values", "type", "truncate", "huge"]))
        if what == "reshape":
            array = array.reshape(_factorization(array.size, draw))
        elif what == "values" and array.size and array.dtype.kind == "f":
            array = array.copy()
            array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(FLOATS))
        elif what == "type":
            array = array.astype(draw(st.sampled_from([np.float16, np.float64, np.int64, np.int32,
                                                       np.uint8, np.bool_, np.float32])))
        if what in ("truncate", "huge"):
            if what == "truncate":
                t.raw_data = t.raw_data[:draw(st.integers(0, len(t.raw_data)))]
            else:
                del t.dims[:]
                t.dims.extend([2 ** 31, 2 ** 31, 2 ** 20])
        else:
            t.CopyFrom(numpy_helper.from_array(array, t.name))
    elif how == "input shape" and g.input:
        tt = g.input[0].type.tensor_type
        dims = tt.shape.dim
        choice = draw(st.integers(0, 5))
        if dims and choice:
            d = dims[draw(st.integers(0, len(dims) - 1))]
            if choice == 1:
                d.dim_param = "N"
            else:
                d.dim_value = draw(st.sampled_from([1, 2, 3, 5, 64, 2 ** 31, 2 ** 62]))
        elif dims:
            del dims[draw(st.integers(0, len(dims) - 1))]
        if draw(st.integers(0, 5)) == 0:
            tt.elem_type = draw(st.sampled_from([TensorProto.FLOAT16, TensorProto.DOUBLE,
                                                 TensorProto.INT64]))
    elif how == "drop node":
        g.node.remove(node)
    elif how == "opset" and model.opset_import:   # an earlier edit may have emptied it
        model.opset_import[0].version = draw(st.sampled_from([7, 9, 11, 12, 13, 18, 21]))
    elif how == "output" and g.output:
        if draw(st.booleans()):
            g.output[0].name = draw(st.sampled_from(["x", "c", "p", "nowhere", "w"]))
        else:
            del g.output[0]


def mutated_onnx(draw):
    from onnx import ModelProto
    data = draw(st.sampled_from([good_onnx, good_onnx2]))()
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 11)) == 0:
            data = edit_bytes(data, draw)
            continue
        model = ModelProto()
        try:
            model.ParseFromString(data)
        except Exception:   # noqa: BLE001 - damaged by an earlier edit: damage it further
            data = edit_bytes(data, draw)
            continue
        _edit_onnx(model, draw)
        data = model.SerializeToString()
    return data


# ---- running -----------------------------------------------------------------------------------

_DEVICE = []


def _device():
    if not _DEVICE:
        _DEVICE.append(mk.Device(num_threads=2))
    return _DEVICE[0]


def run_fuzz(max_examples, steps, derandomize=True, formats=("mpkg", "onnx")):
    """Fuzz each format: max_examples examples of `steps` mutated files each. Returns the
    Counter of loads and outcomes this run added."""
    before = STATS.copy()
    device = _device()
    for fmt in formats:
        make, check = ((mutated_package, check_package) if fmt == "mpkg"
                       else (mutated_onnx, check_onnx))

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck), print_blob=True)
        @given(st.data())
        def fuzz(data):
            for _ in range(steps):
                check(make(data.draw), device)
        fuzz()
    return STATS - before


def test_good_files_load(device):
    """The starting points are valid (else the fuzz would only test the first check)."""
    nets = ml_package.load_package_bytes(good_package())
    assert set(nets) == {"small", "two"}
    assert {n.kind for net in nets.values() for n in net.nodes} == set(ml.Network.OPS)
    before = STATS["run a loaded network loaded"]
    for net in nets.values():
        run_network(net, device)
    assert STATS["run a loaded network loaded"] == before + 2


def test_package_fuzz():
    """The short run CI does: a fixed set of damaged packages, each raising PackageError or
    loading (and then running) cleanly."""
    added = run_fuzz(max_examples=150, steps=4, formats=("mpkg",))
    assert added["load_package_bytes"] >= 600, added
    assert added["raised PackageError"] > 300 and added["load_package_bytes loaded"] >= 5, added


def test_onnx_fuzz():
    pytest.importorskip("onnx", reason="the ONNX fuzz needs the onnx package")
    check_onnx(good_onnx(), _device())
    check_onnx(good_onnx2(), _device())
    assert STATS["import_onnx loaded"] >= 2
    added = run_fuzz(max_examples=100, steps=3, formats=("onnx",))
    assert added["import_onnx"] >= 300, added
    assert added["raised ValidationError"] > 100 and added["import_onnx loaded"] > 10, added


# ---- what the fuzz found (regressions) ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mpkg", "onnx"])
def test_fuzz_does_not_swap_the_allocator_while_a_watchdog_is_armed(fmt, monkeypatch):
    """test_onnx_fuzz died of SIGSEGV in about 1 run in 20: each check armed faulthandler's
    watchdog (a fresh thread) and then _loads started tracemalloc, swapping CPython's raw
    allocator while that thread freed its start-up block: it called tracemalloc's free with
    the old allocator's NULL context (the core: tracemalloc_free(ctx=0x0) under
    pythread_wrapper; faulthandler named no "Current thread", so the Python frames it printed,
    in onnx or hypothesis, were the main thread's, not the crash's). See _watched."""
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="the ONNX fuzz needs the onnx package")
    calls = []

    def recorded(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call
    for module, name in [(faulthandler, "dump_traceback_later"), (faulthandler, "cancel_dump_traceback_later"),
                         (tracemalloc, "start"), (tracemalloc, "stop")]:
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    added = run_fuzz(max_examples=5, steps=2, formats=(fmt,))
    assert added["calls"] >= 10, added
    armed = False
    for name in calls:
        assert not (armed and name in ("start", "stop")), f"tracemalloc.{name}() while a watchdog was armed: {calls}"
        armed = {"dump_traceback_later": True, "cancel_dump_traceback_later": False}.get(name, armed)
    assert "start" in calls and not armed, calls


def test_deeply_nested_header_is_a_package_error():
    """json.loads raised RecursionError (not a PackageError) on a header nested 100,000 deep."""
    text = b'{"networks":{},"arrays":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(PackageError, match="is not JSON"):
        ml_package.load_package_bytes(with_header(text, b""))


def test_infinite_array_dimension_is_a_package_error():
    """int(inf) in an array entry's shape raised OverflowError."""
    text = json.dumps({"networks": {}, "arrays": [["float32", [float("inf")], 0, 4]]}).encode()
    with pytest.raises(PackageError, match="array 0: malformed entry"):
        ml_package.load_package_bytes(with_header(text, b"\0" * 64))


@pytest.mark.parametrize("op, message", [
    (lambda n, x: n.pool2d(x, "max", (2, 2), strides=(0, 1)), "pool2d: strides"),
    (lambda n, x: n.pool2d(x, "max", (2, 2), strides=(2 ** 31, 1)), "pool2d: strides"),
    (lambda n, x: n.conv2d(x, np.ones((2, 1, 1, 3)), pads=(0, 0, 2 ** 31, 0)), "conv2d: pads"),
    (lambda n, x: n.conv2d(x, np.ones((2, 1, 1, 3)), strides=(1, 0)), "conv2d: strides"),
    (lambda n, x: n.conv2d(x, np.ones((2, 1, 1, 3)), neuron=0), "conv2d: neuron"),
    (lambda n, x: n.conv2d(x, np.ones((2, 1, 1, 1)), groups=3), "groups 3 must divide"),
    (lambda n, x: n.gemm(x, np.ones((2, 3)), neuron={"a": 1}), "gemm: neuron"),
    (lambda n, x: n.transpose(x, (0, 1, 2, float("inf"))), "transpose: perm"),
    (lambda n, x: n.concat(x, x, axis=float("inf")), "concat: axis"),
    (lambda n, x: n.reshape(x, (1, "x")), "reshape: shape"),
    (lambda n, x: n.gather(x, [None, [2 ** 31], None, None]), "gather: index"),
    (lambda n, x: n.resize_linear(x, [0], [1], [0.5], [0], [2 ** 40], [0.5]), "resize_linear: tables"),
    (lambda n, x: n.conv_transpose2d(x, np.ones((2, 1, 1, 3)), strides=(0, 1)), "conv_transpose2d: strides"),
    (lambda n, x: n.reduce(x, "sum", (float("inf"),)), "reduce: axes"),
    (lambda n, x: n.layer_norm(x, scale=np.ones((1, 3))), "scale of shape \\(1, 3\\) does not broadcast"),
])
def test_network_checks_op_arguments(op, message):
    """Found through packages: a stride of 0 divided by zero, int(inf) overflowed, a stride of
    2**31 did not fit the kernel's int32 (OverflowError at compile), and a neuron that was not an NNNeuronDescriptor loaded and failed only when compiled."""
    net = ml.Network()
    with pytest.raises(mk.ValidationError, match=message):
        op(net, net.input("x", (1, 4, 4, 3)))


def test_pipeline_of_huge_shapes_is_a_validation_error(device):
    """An input of 2**62 rows gave OverflowError when the intermediates were planned."""
    net = ml.Network()
    net.output(net.neuron(net.neuron(net.input("x", (2 ** 62, 4)), mk.CNNNeuronType.RELU),
                          mk.CNNNeuronType.TANH), "y")
    d = ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor(net.name, ml.Library(device, net)))
    with pytest.raises(mk.ValidationError, match="more than 2\\*\\*40"):
        device.make_compiler().make_machine_learning_pipeline_state(d)


def test_onnx_initializer_not_matching_its_dims_is_a_validation_error():
    """numpy_helper.to_array's ValueError came through import_onnx as it was."""
    onnx = pytest.importorskip("onnx")
    model = onnx.ModelProto()
    model.ParseFromString(good_onnx())
    flat = next(t for t in model.graph.initializer if t.name == "flat")
    del flat.dims[:]                    # 2 int64 values, declared a scalar
    with pytest.raises(mk.ValidationError, match="initializer 'flat'"):
        from mpskernels.onnx_import import import_onnx
        import_onnx(model.SerializeToString())


def test_onnx_malformed_node_is_a_validation_error():
    """A TypeError inside an op's importer (here Concat with an axis beyond the rank) came
    through as it was; it now names the node."""
    onnx = pytest.importorskip("onnx")
    from mpskernels.onnx_import import import_onnx
    model = onnx.ModelProto()
    model.ParseFromString(good_onnx())
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    concat.attribute[0].i = 7
    with pytest.raises(mk.ValidationError, match="node 'cc' \\(Concat"):
        import_onnx(model.SerializeToString())


@pytest.mark.parametrize("op", ["Pad", "Slice", "Resize"])
def test_onnx_huge_index_table_is_a_validation_error(op):
    """Pad, Slice and Resize become gathers with an index table per dimension: pads of 2**29
    (the long fuzz: 4 GiB allocated, and the process killed by the kernel's OOM killer in its
    first run), a slice of a declared 2**40 dimension or a scale of 10**6 asked for gigabytes.
    Tables are now limited to 2**20 elements, naming the node."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from mpskernels.onnx_import import import_onnx
    shape = [1, 3, 4, 2 ** 40 if op == "Slice" else 4]
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    init, inputs = {"Pad": ([ints("pads", [0, 0, 0, 2 ** 29, 0, 0, 0, 0])], ["x", "pads"]),
                    "Slice": ([ints("starts", [0]), ints("ends", [2 ** 40]), ints("axes", [3])],
                              ["x", "starts", "ends", "axes"]),
                    "Resize": ([numpy_helper.from_array(np.array([1, 1, 1, 1e6], np.float32), "scales")],
                               ["x", "", "scales"])}[op]
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], name="big")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list("nchw"))], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    tracemalloc.start()
    try:
        with pytest.raises(mk.ValidationError, match="node 'big'.*at most 1048576 are supported"):
            import_onnx(model.SerializeToString())
        assert tracemalloc.get_traced_memory()[1] < MAX_PEAK
    finally:
        tracemalloc.stop()
