"""The ONNX importer (mpskernels/onnx_import.py), building a pipeline straight from an .onnx
file, ml.Session, and the `mpskernels package` / `mpskernels run` commands. Results are checked
against onnx's own reference evaluator (float64 NumPy inside), rtol 1e-4; the whole-graph
blocks (a UNet block, an attention / MLP block) against NumPy references written here."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the importer tests need the onnx package (pip install onnx)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import mpskernels as mk  # noqa: E402
from mpskernels import ml, ml_package, onnx_import  # noqa: E402

import conv_reference as cref  # noqa: E402


def residual_model(rng, batch="N"):
    """x -> Conv -> BN -> Relu -> Conv -> BN -> (+ x) -> Relu -> MaxPool -> GAP -> Flatten -> Gemm."""
    c = 8
    init = []

    def const(name, a):
        init.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    nodes = []
    for i in (1, 2):
        nodes.append(helper.make_node("Conv", ["x" if i == 1 else "r1", const(f"w{i}", rng.standard_normal((c, c, 3, 3)) * 0.2)],
                                      [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", const(f"g{i}", rng.uniform(0.5, 1.5, c)),
                                      const(f"b{i}", rng.uniform(-0.1, 0.1, c)), const(f"m{i}", rng.uniform(-0.1, 0.1, c)),
                                      const(f"v{i}", rng.uniform(0.5, 1.5, c))], [f"n{i}"], epsilon=1e-5))
        if i == 1:
            nodes.append(helper.make_node("Relu", ["n1"], ["r1"]))
    nodes += [helper.make_node("Add", ["n2", "x"], ["s"]), helper.make_node("Relu", ["s"], ["r2"]),
              helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
              helper.make_node("GlobalAveragePool", ["p"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["f"]),
              helper.make_node("Gemm", ["f", const("fw", rng.standard_normal((5, c))), const("fb", rng.standard_normal(5))],
                               ["y"], transB=1)]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(rng, tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(residual_model(rng), str(path))
    return str(path)


def test_import_fuses_and_keeps_nhwc(rng):
    net = onnx_import.import_onnx(residual_model(rng))
    kinds = [n.kind for n in net.nodes]
    # one transpose in (NCHW -> NHWC), BN and Relu folded into the convs, Relu into the add's clamp
    assert kinds == ["transpose", "conv2d", "conv2d", "add", "pool2d", "pool2d", "reshape", "gemm"], kinds
    assert net.nodes[1].attrs["neuron"].neuron_type == mk.CNNNeuronType.RELU
    assert net.nodes[2].attrs["neuron"] is None
    assert net.nodes[3].attrs["clamp"] == (0.0, np.inf)



def residual_add_model(rng, variant, order, activation):
    """r = Relu(Conv(x)) (3x3, stride 2 for "downsample"), c = Conv(Relu(Conv(r))) (3x3),
    s = Add(c, r) in `order`, then `activation` (None, "Relu", "Clip"). Variants: the residual
    is "in_place": r, read last by the add; "read_later": r, read again after the add;
    "input": x itself (its NHWC copy); "downsample": a 1x1 stride-2 Conv of x (two convs add);
    "conv_reads_residual": c = Conv(r) (the convolution reads the slot it would accumulate
    over); "conv_read_twice": c has another reader, so the add must not fuse."""
    c = 7
    init = []

    def const(name, a):
        init.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    stride = 2 if variant == "downsample" else 1
    nodes = [helper.make_node("Conv", ["x", const("w0", rng.standard_normal((c, c, 3, 3)) * 0.3), const("b0", rng.standard_normal(c))],
                              ["c0"], pads=[1, 1, 1, 1], strides=[stride, stride]),
             helper.make_node("Relu", ["c0"], ["r"]),
             helper.make_node("Conv", ["r", const("w1", rng.standard_normal((c, c, 3, 3)) * 0.3)], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["h"]),
             helper.make_node("Conv", ["r" if variant == "conv_reads_residual" else "h",
                                       const("w2", rng.standard_normal((c, c, 3, 3)) * 0.3), const("b2", rng.standard_normal(c))],
                              ["c"], pads=[1, 1, 1, 1])]
    residual = {"input": "x", "downsample": "d"}.get(variant, "r")
    if variant == "downsample":
        nodes.append(helper.make_node("Conv", ["x", const("wd", rng.standard_normal((c, c, 1, 1)))], ["d"], strides=[2, 2]))
    nodes.append(helper.make_node("Add", ["c", residual][::1 if order == "conv_first" else -1], ["s"]))
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["s"], ["y"]))
    elif activation == "Clip":
        nodes.append(helper.make_node("Clip", ["s", const("lo", 0.0), const("hi", 1.5)], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    h, w = (5, 5) if variant == "downsample" else (9, 10)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, h, w])]
    if variant in ("read_later", "conv_read_twice"):
        nodes.append(helper.make_node("Mul", ["y", "r" if variant == "read_later" else "c"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c, h, w]))
    graph = helper.make_graph(nodes, "res_add", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 9, 10])],
                              outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("activation", [None, "Relu", "Clip"])
@pytest.mark.parametrize("order", ["conv_first", "residual_first"])
@pytest.mark.parametrize("variant", ["in_place", "read_later", "input", "downsample", "conv_reads_residual",
                                     "conv_read_twice"])
def test_residual_add_fuses_into_the_convolution(rng, variant, order, activation):
    """Add(conv, r) (either order, a ReLU / Clip(0, b) after it) runs as one convolution that
    accumulates into its destination: over r's heap slot when the add is r's last reader, else
    into a copy of r (r read later, or a bound input); not at all when something else reads
    the convolution's result. Against onnx's reference evaluator, batch 2; 1 and 2 threads
    bitwise."""
    model = residual_add_model(rng, variant, order, activation)
    x = rng.standard_normal((2, 7, 9, 10)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})
    net = onnx_import.import_onnx(model)
    session = ml.Session(net, num_threads=2)
    state = session.compile([x.shape])[0]
    fused = [st.node for st in state._steps if st.node.attrs.get("residual")]
    assert len(fused) == (variant != "conv_read_twice")
    assert sum(st.node.kind == "add" for st in state._steps) == (variant == "conv_read_twice")
    if fused:
        assert (fused[0].outputs[0] in state._views) == (variant in ("in_place", "downsample", "input"))
        kind = {None: None, "Relu": mk.CNNNeuronType.RELU, "Clip": mk.CNNNeuronType.RELUN}[activation]
        assert (fused[0].attrs["neuron"] and fused[0].attrs["neuron"].neuron_type) == kind
    got = session.run({"x": x})
    for name, w in zip(("y", "z"), want):   # sums that cancel: absolute error vs the largest values
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    one = ml.Session(net, num_threads=1).run({"x": x})
    assert all(one[k].tobytes() == got[k].tobytes() for k in got)



@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("order", ["gemm_first", "residual_first"])
@pytest.mark.parametrize("rows", [1, 5])
def test_residual_add_fuses_into_the_gemm(rng, rows, order, relu):
    """r = x + 1; Sigmoid(Add(MatMul(Tanh(r), W) + b, r) (+ Relu)): one gemm node that
    accumulates over r's slot, on the 1x1 convolution (5 rows) or mk_sgemm's matrix-vector path
    (1 row, beta = 1)."""
    w, b = rng.standard_normal((13, 13)).astype(np.float32), rng.standard_normal(13).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "one"], ["r"]), helper.make_node("Tanh", ["r"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["g"]),
             helper.make_node("Add", ["g", "r"][::1 if order == "gemm_first" else -1], ["s"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["s"], ["t"]))
    nodes.append(helper.make_node("Sigmoid", ["t" if relu else "s"], ["y"]))   # s an intermediate
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 13])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                               numpy_helper.from_array(np.float32(1.0), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    net = onnx_import.import_onnx(model)
    state = ml.Session(net).compile([(rows, 13)])[0]
    assert [(st.node.kind, st.node.attrs.get("residual", False)) for st in state._steps] == [
        ("add", False), ("neuron", False), ("gemm", True), ("neuron", False)]
    assert state._views[state._steps[2].node.outputs[0]] is state._steps[0].node.outputs[0]   # r's slot
    x = rng.standard_normal((rows, 13)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ml.Session(net).run({"x": x})["y"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("batch", [1, 3])
def test_session_matches_reference(model_path, rng, batch):
    x = rng.standard_normal((batch, 8, 9, 10), dtype=np.float32)
    want = ReferenceEvaluator(model_path).run(None, {"x": x.astype(np.float32)})[0]
    for source in (model_path, ):
        got = ml.Session(source, num_threads=2).run({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_package_and_session_metadata(model_path, tmp_path, rng):
    out = tmp_path / "res.mpkg"
    ml.build_package(model_path, str(out))
    s = ml.Session(str(out))
    assert [(i.name, i.shape, i.type) for i in s.get_inputs()] == [("x", [None, 8, 9, 10], "tensor(float32)")]
    assert [(o.name, o.shape) for o in s.get_outputs()] == [("y", [None, 5])]
    x = rng.standard_normal((2, 8, 9, 10), dtype=np.float32)
    a = s.run({"x": x})["y"]
    b = ml.Session(model_path).run({"x": x})["y"]   # straight from the .onnx
    assert a.tobytes() == b.tobytes()
    one = ml.Session(str(out), num_threads=1).run({"x": x})["y"]
    assert one.tobytes() == a.tobytes()   # bitwise identical for any thread count


def test_session_rejects_bad_inputs(model_path):
    s = ml.Session(model_path)
    x = np.zeros((1, 8, 9, 10), np.float32)
    with pytest.raises(mk.ValidationError, match=r"unknown input 'X'; the model's inputs are \['x'\]"):
        s.run({"X": x})
    with pytest.raises(mk.ValidationError, match="input 'x' is missing"):
        s.run({})
    with pytest.raises(mk.ValidationError, match=r"input 'x' has shape \(1, 8, 9, 11\); the model takes \(None, 8, 9, 10\)"):
        s.run({"x": np.zeros((1, 8, 9, 11), np.float32)})
    with pytest.raises(mk.ValidationError, match="input 'x' has dtype float64; the model takes float32"):
        s.run({"x": x.astype(np.float64)})
    with pytest.raises(TypeError, match="must be a NumPy array"):
        s.run({"x": [[1.0]]})
    with pytest.raises(mk.ValidationError, match=r"unknown outputs \['z'\]"):
        s.run({"x": x}, ["z"])


def test_too_small_heap(model_path):
    s = ml.Session(model_path)
    state, _, table, _ = s.compile([(1, 8, 9, 10)])
    table.set_tensor(mk.Tensor.from_numpy(s.device, np.zeros((1, 8, 9, 10), np.float32)), 0)
    heap = s.device.make_heap(mk.HeapDescriptor(size=state.intermediates_heap_size - 64))
    enc = s.device.make_command_queue().make_command_buffer().make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table)
    with pytest.raises(mk.ValidationError, match=r"intermediates heap has \d+ bytes; the pipeline needs intermediates_heap_size"):
        enc.dispatch_network(heap)


def test_concat_of_nhwc_values(rng, tmp_path):
    """Two convolutions joined along channels (NHWC inside: axis 1 becomes 3) and a constant."""
    w1, w2 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal((5, 3, 1, 1)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 7)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Conv", ["x", "w2"], ["b"]),
         helper.make_node("Concat", ["a", "k", "b"], ["y"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 11, 6, 7])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(k, "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    net = onnx_import.import_onnx(model)
    assert [n.kind for n in net.nodes] == ["transpose", "conv2d", "conv2d", "concat", "transpose"]
    x = rng.standard_normal((1, 3, 6, 7)).astype(np.float32)
    got = ml.Session(net).run({"x": x})["y"]
    np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def _single(op, inputs, outputs, opset=17, **attrs):
    graph = helper.make_graph([helper.make_node(op, [i for i, _ in inputs], [o for o, _ in outputs], name="the_node", **attrs)],
                              "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, s) for i, s in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_names_node_op_and_opset():
    model = _single("Hardmax", [("x", [2, 3])], [("y", [2, 3])], opset=13)
    with pytest.raises(mk.ValidationError, match=r"node 'the_node' \(Hardmax, opset 13\): op Hardmax is not supported"):
        onnx_import.import_onnx(model)


def test_malformed_and_truncated_onnx(model_path, tmp_path, device):
    data = open(model_path, "rb").read()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(mk.ValidationError, match=f"{bad}"):
        device.make_library(str(bad))
    bad.write_bytes(b"\xff" * 100)
    with pytest.raises(mk.ValidationError, match="not a readable ONNX model|fails the ONNX checker"):
        ml.Session(str(bad))
    broken = residual_model(np.random.default_rng(0))
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(mk.ValidationError, match="fails the ONNX checker"):
        onnx_import.import_onnx(broken)


def test_non_float_input_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT32, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2])])
    with pytest.raises(mk.ValidationError, match="input 'x' has ONNX element type 6"):
        onnx_import.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_cli_package_and_run(model_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(mk.__file__))))
    out = tmp_path / "m.mpkg"
    r = subprocess.run([sys.executable, "-m", "mpskernels", "package", model_path, "-o", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "8 nodes" in r.stdout
    x = np.random.default_rng(1).standard_normal((2, 8, 9, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "mpskernels", "run", str(out), "--input", str(tmp_path / "x.npy"),
                        "--output", str(tmp_path / "y.npy"), "--repeat", "2", "--threads", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "output 'y': shape (2, 5)" in r.stdout and "median" in r.stdout and "lower bound" in r.stdout
    want = ReferenceEvaluator(model_path).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-4, atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "mpskernels", "run", model_path, "--batch", "3", "--repeat", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "shape (3, 5)" in r.stdout, r.stderr


# ---- whole graphs built with onnx.helper, against NumPy references written here -----------------

def _conv_nchw(x, w, b, pad):
    """Plain correlation, NCHW, stride 1, float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))   # n c h w kh kw
    return np.einsum("nchwij,ocij->nohw", patches, w) + b[None, :, None, None]


def _linear_matrix(d, out):
    """Resize weights along one axis: linear, half_pixel, taps clamped to the edges."""
    m = np.zeros((out, d))
    for o in range(out):
        x = min(max((o + 0.5) * d / out - 0.5, 0.0), d - 1.0)
        i = int(np.floor(x))
        m[o, i] += 1 - (x - i)
        m[o, min(i + 1, d - 1)] += x - i
    return m


def unet_block(rng):
    """Conv-Relu, MaxPool, Conv-Relu; up by ConvTranspose and by Resize (linear), Concat, Pad
    (reflect) back to the skip's size, Concat with the skip, a 1x1 Conv, Softmax over channels."""
    consts, nodes = {}, []

    def c(name, shape, scale=0.3):
        consts[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    def n(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))

    n("Conv", ["x", c("w1", (8, 3, 3, 3)), c("b1", 8)], "c1a", pads=[1, 1, 1, 1])
    n("Relu", ["c1a"], "c1")
    n("MaxPool", ["c1"], "p", kernel_shape=[2, 2], strides=[2, 2])
    n("Conv", ["p", c("w2", (16, 8, 3, 3)), c("b2", 16)], "c2a", pads=[1, 1, 1, 1])
    n("Relu", ["c2a"], "c2")
    n("ConvTranspose", ["c2", c("wt", (16, 4, 2, 2)), c("bt", 4)], "u1", strides=[2, 2])
    consts["scales"] = np.array([1, 1, 2, 2], np.float32)
    n("Resize", ["c2", "", "scales"], "u2", mode="linear")
    n("Concat", ["u1", "u2"], "u", axis=1)
    consts["pads"] = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)
    n("Pad", ["u", "pads"], "up", mode="reflect")
    n("Concat", ["c1", "up"], "cat", axis=1)
    n("Conv", ["cat", c("w3", (5, 28, 1, 1)), c("b3", 5)], "y")
    n("Softmax", ["y"], "prob", axis=1)
    graph = helper.make_graph(nodes, "unet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 9, 9]),
                               helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5, 9, 9])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])

    def reference(x):
        k = {name: v.astype(np.float64) for name, v in consts.items()}
        c1 = np.maximum(_conv_nchw(x, k["w1"], k["b1"], 1), 0)
        p = c1[:, :, :8, :8].reshape(1, 8, 4, 2, 4, 2).max((3, 5))
        c2 = np.maximum(_conv_nchw(p, k["w2"], k["b2"], 1), 0)
        u1 = cref.onnx_conv_transpose(c2, k["wt"], k["bt"], (2, 2), (0, 0, 0, 0))
        r = _linear_matrix(4, 8)
        u2 = np.einsum("yh,xw,nchw->ncyx", r, r, c2)
        up = np.pad(np.concatenate([u1, u2], 1), ((0, 0), (0, 0), (0, 1), (0, 1)), mode="reflect")
        y = _conv_nchw(np.concatenate([c1, up], 1), k["w3"], k["b3"], 0)
        e = np.exp(y - y.max(1, keepdims=True))
        return y, e / e.sum(1, keepdims=True)

    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), reference


def test_unet_block(rng):
    model, reference = unet_block(rng)
    net = onnx_import.import_onnx(model)
    kinds = [n.kind for n in net.nodes]
    assert {"conv_transpose2d", "resize_linear", "gather", "softmax"} <= set(kinds), kinds
    assert kinds.count("transpose") == 3, kinds   # NHWC inside: in once, out once per output
    x = rng.standard_normal((1, 3, 9, 9)).astype(np.float32)
    got = ml.Session(net, num_threads=2).run({"x": x})
    for name, want in zip(("y", "prob"), reference(x)):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


def attention_block(rng, batch=2, seq=5, dim=16, heads=2):
    """Pre-LN attention and MLP: LayerNormalization, MatMul (+ bias), Split / Slice into q, k,
    v, Reshape + Transpose into heads, batched Q.K^T, scale, Softmax, .V, back to tokens,
    projection, residual Add; LayerNormalization, MatMul, Gelu, MatMul, residual Add. A
    second output: ReduceMean over the tokens through the Erf form of GELU and HardSwish."""
    consts, nodes = {}, []
    hd = dim // heads

    def c(name, value):
        consts[name] = np.asarray(value, np.float32) if np.asarray(value).dtype.kind == "f" else np.asarray(value)
        return name

    def w(name, shape, scale=0.25):
        return c(name, rng.standard_normal(shape) * scale)

    def n(op, inputs, outputs, **attrs):
        outputs = [outputs] if isinstance(outputs, str) else outputs
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))

    n("LayerNormalization", ["x", w("g1", dim), w("be1", dim)], "h", axis=-1, epsilon=1e-5)
    n("MatMul", ["h", w("wqkv", (dim, 3 * dim))], "qkv0")
    n("Add", ["qkv0", w("bqkv", 3 * dim)], "qkv")
    n("Split", ["qkv", c("split", np.array([dim, 2 * dim], np.int64))], ["q", "kv"], axis=2)
    n("Slice", ["kv", c("s0", np.array([0], np.int64)), c("s1", np.array([dim], np.int64)),
                c("sa", np.array([2], np.int64))], "k")
    n("Slice", ["kv", c("s2", np.array([dim], np.int64)), c("s3", np.array([2 * dim], np.int64)),
                c("sb", np.array([-1], np.int64))], "v")
    heads_shape = c("hs", np.array([batch, seq, heads, hd], np.int64))
    for t in "qkv":
        n("Reshape", [t, heads_shape], f"{t}4")
    n("Transpose", ["q4"], "qh", perm=[0, 2, 1, 3])
    n("Transpose", ["k4"], "kt", perm=[0, 2, 3, 1])
    n("Transpose", ["v4"], "vh", perm=[0, 2, 1, 3])
    n("MatMul", ["qh", "kt"], "s")
    n("Mul", ["s", c("scale", np.float32(hd ** -0.5))], "ss")
    n("Softmax", ["ss"], "pr", axis=-1)
    n("MatMul", ["pr", "vh"], "ctx")
    n("Transpose", ["ctx"], "ctxt", perm=[0, 2, 1, 3])
    n("Reshape", ["ctxt", c("ts", np.array([batch, seq, dim], np.int64))], "ctxr")
    n("MatMul", ["ctxr", w("wo", (dim, dim))], "o")
    n("Add", ["o", "x"], "r1")
    n("LayerNormalization", ["r1", w("g2", dim), w("be2", dim)], "h2", axis=-1)
    n("MatMul", ["h2", w("w1", (dim, 4 * dim))], "m1")
    n("Add", ["m1", w("b1", 4 * dim)], "m1b")
    n("Gelu", ["m1b"], "m1g")
    n("MatMul", ["m1g", w("w2", (4 * dim, dim))], "m2")
    n("Add", ["m2", "r1"], "y")
    n("ReduceMean", ["y", c("axes", np.array([1], np.int64))], "pool", keepdims=0)
    n("Div", ["pool", c("sqrt2", np.float32(np.sqrt(2)))], "pz")
    n("Erf", ["pz"], "pe")
    n("Add", ["pe", c("one", np.float32(1))], "pe1")
    n("Mul", ["pool", "pe1"], "pg2")
    n("Mul", ["pg2", c("half", np.float32(0.5))], "pg")
    n("HardSwish", ["pg"], "pooled")
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, dim]),
                               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, dim])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])

    def reference(x):
        k = {name: v.astype(np.float64) for name, v in consts.items() if v.dtype.kind == "f"}

        def ln(t, g, b):
            m = t.mean(-1, keepdims=True)
            return (t - m) / np.sqrt(((t - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

        x = x.astype(np.float64)
        qkv = ln(x, k["g1"], k["be1"]) @ k["wqkv"] + k["bqkv"]
        q, kk, v = (qkv[..., i * dim:(i + 1) * dim].reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)
                    for i in range(3))
        s = q @ kk.transpose(0, 1, 3, 2) * hd ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx = (p / p.sum(-1, keepdims=True)) @ v
        r1 = ctx.transpose(0, 2, 1, 3).reshape(batch, seq, dim) @ k["wo"] + x
        m = ln(r1, k["g2"], k["be2"]) @ k["w1"] + k["b1"]
        gelu = 0.5 * m * (1 + np.vectorize(math.erf)(m / np.sqrt(2)))
        y = gelu @ k["w2"] + r1
        pool = y.mean(1)
        pg = 0.5 * pool * (1 + np.vectorize(math.erf)(pool / np.sqrt(2)))
        return y, pg * np.clip(pg / 6 + 0.5, 0, 1)

    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), reference


def test_attention_block(rng):
    model, reference = attention_block(rng)
    net = onnx_import.import_onnx(model)
    kinds = [n.kind for n in net.nodes]
    assert kinds.count("matmul") == 2 and {"layer_norm", "softmax", "gather", "unary", "reduce"} <= set(kinds), kinds
    # fused: the biases into the weight GEMMs, Gelu into the MLP's first, the scale into Q.K^T
    assert kinds.count("add") == 3 and "mul" not in kinds[:kinds.index("softmax")], kinds
    assert [n.attrs["neuron"] is not None for n in net.nodes if n.kind == "gemm"] == [False, False, True, False]
    assert net.nodes[kinds.index("matmul")].attrs["alpha"] == np.float32(8 ** -0.5)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    got = ml.Session(net, num_threads=2).run({"x": x})
    for name, want in zip(("y", "pooled"), reference(x)):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    one = ml.Session(net, num_threads=1).run({"x": x})
    assert all(one[k].tobytes() == got[k].tobytes() for k in got)   # bitwise, any thread count


def _model(op, inputs, outputs, opset, **attrs):
    """One node named the_node; inputs (name, shape) are graph inputs, (name, array) constants
    and ("", None) an omitted optional input; outputs (name, shape)."""
    graph = helper.make_graph(
        [helper.make_node(op, [i for i, _ in inputs], [o for o, _ in outputs], name="the_node", **attrs)], "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, v) for i, v in inputs if isinstance(v, list)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, v) for o, v in outputs],
        [numpy_helper.from_array(v, i) for i, v in inputs if isinstance(v, np.ndarray)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


i64 = lambda *v: np.array(v, np.int64)   # noqa: E731
f32 = lambda *v: np.array(v, np.float32)   # noqa: E731
X4, Y4 = ("x", [1, 1, 2, 2]), [("y", [1, 1, 4, 4])]
BAD_NODES = [   # (model, what the message says after "node 'the_node' (Op, opset N): ")
    (_model("Softmax", [("x", [2, 3])], [("y", [2, 3])], 13, axis=2), "axis 2 is outside"),
    (_model("LayerNormalization", [("x", [2, 3]), ("s", f32(1, 1, 1))], [("y", [2, 3])], 17, axis=-3), "axis -3"),
    (_model("LayerNormalization", [("x", [2, 3]), ("s", [3])], [("y", [2, 3])], 17), "Scale and B must be constants"),
    (_model("Gelu", [("x", [2])], [("y", [2])], 20, approximate="erf"), "approximate='erf'"),
    (_model("Resize", [X4, ("", None), ("sc", f32(1, 1, 2, 2))], Y4, 18, mode="cubic"), "mode 'cubic'"),
    (_model("Resize", [X4, ("", None), ("sc", f32(1, 1, 2, 2))], Y4, 18, mode="linear", antialias=1), "antialias"),
    (_model("Resize", [X4, ("", None), ("sc", f32(1, 1, 2, 2))], Y4, 18,
            coordinate_transformation_mode="tf_crop_and_resize"), "coordinate_transformation_mode"),
    (_model("Resize", [("x", [2, 3]), ("", None), ("sc", f32(2, 2))], [("y", [4, 6])], 18, mode="linear"),
     "linear resize works on the H and W"),
    (_model("Resize", [X4, ("", None), ("sc", [4])], Y4, 18), "scales or sizes must be a non-empty constant"),
    (_model("Pad", [("x", [2, 3]), ("pads", i64(0, 0, 0, 0))], [("y", [2, 3])], 18, mode="mirror"), "mode 'mirror'"),
    (_model("Pad", [("x", [2, 3]), ("pads", i64(1, 1, 1))], [("y", [2, 3])], 18), "3 pads for 2 axes"),
    (_model("ReduceSum", [("x", [2, 3]), ("axes", i64(2))], [("y", [2])], 18), r"axes \[2\] are outside"),
    (_model("ReduceMean", [("x", [2, 3])], [("y", [2])], 17, axes=[-3]), "outside a rank-2"),
    (_model("Split", [("x", [6]), ("split", i64(2, 3))], [("a", [2]), ("b", [4])], 18, axis=0), "do not divide"),
    (_model("Slice", [("x", [6]), ("s", i64(0)), ("e", i64(6)), ("a", i64(0)), ("t", i64(0))], [("y", [3])], 13),
     "a step of 0"),
    (_model("Slice", [("x", [6]), ("s", i64(0)), ("e", i64(6)), ("a", i64(1))], [("y", [3])], 13), "axis 1 is outside"),
    (_model("Gather", [("x", [6]), ("i", [2])], [("y", [2])], 13), "indices must be a constant"),
    (_model("Gather", [("x", [6]), ("i", i64(1, 6))], [("y", [2])], 13), "indices must be"),
    (_model("ConvTranspose", [("x", [1, 2, 5]), ("w", np.zeros((2, 3, 2), np.float32))], [("y", [1, 3, 6])], 17),
     "2-D only"),
    (_model("MatMul", [("a", [2, 3]), ("b", [4, 5])], [("y", [2, 5])], 13), "inner dimensions differ"),
]


@pytest.mark.parametrize("model,what", BAD_NODES, ids=[f"{m.graph.node[0].op_type}-{i}" for i, (m, _) in enumerate(BAD_NODES)])
def test_bad_nodes_name_node_op_and_opset(model, what):
    op, opset = model.graph.node[0].op_type, model.opset_import[0].version
    with pytest.raises(mk.ValidationError, match=rf"node 'the_node' \({op}, opset {opset}\): .*{what}"):
        onnx_import.import_onnx(model)


def test_matmul_fusions(rng):
    """MatMul / scalar -> alpha of the batched product; MatMul(W) + bias row -> Gelu: one gemm
    with its bias and the GELU epilogue. A Div with the product as divisor is not fused."""
    w, b = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "bt"], ["p"]), helper.make_node("Div", ["p", "two"], ["y1"]),
         helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["bias", "m"], ["mb"]),
         helper.make_node("Gelu", ["mb"], ["y2"]), helper.make_node("Div", ["two", "y1"], ["y3"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("a", [2, 3, 4]), ("bt", [2, 4, 5]), ("x", [3, 4]))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("y1", [2, 3, 5]), ("y2", [3, 6]), ("y3", [2, 3, 5]))],
        [numpy_helper.from_array(np.float32(2.0), "two"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(b, "bias")])
    net = onnx_import.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert [n.kind for n in net.nodes] == ["matmul", "gemm", "div"], [n.kind for n in net.nodes]
    assert net.nodes[0].attrs["alpha"] == 0.5 and net.nodes[1].attrs["neuron"].neuron_type == mk.CNNNeuronType.GELU
    feeds = {"a": rng.standard_normal((2, 3, 4)).astype(np.float32), "bt": rng.standard_normal((2, 4, 5)).astype(np.float32),
             "x": rng.standard_normal((3, 4)).astype(np.float32)}
    got = ml.Session(net).run(feeds)
    p = feeds["a"].astype(np.float64) @ feeds["bt"] / 2
    m = feeds["x"].astype(np.float64) @ w + b
    np.testing.assert_allclose(got["y1"], p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["y2"], 0.5 * m * (1 + np.vectorize(math.erf)(m / np.sqrt(2))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["y3"], 2 / p, rtol=1e-5)


def test_shape_of_nhwc_value_is_logical(rng):
    """Shape after a Conv (kept NHWC inside) gives the NCHW dimensions, start / end slicing
    them; the Shape -> Slice -> Concat -> Reshape chain folds into a constant target."""
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Shape", ["c"], ["s"], start=1, end=-1),
         helper.make_node("Shape", ["c"], ["full"]), helper.make_node("Slice", ["full", "z", "one"], ["n"]),
         helper.make_node("Concat", ["n", "s", "rest"], ["target"], axis=0),
         helper.make_node("Reshape", ["c", "target"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "z"),
         numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    net = onnx_import.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    assert net.outputs[0].shape == (2, 4, 5, 6)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    got = ml.Session(net).run({"x": x})["y"]
    np.testing.assert_allclose(got, np.einsum("nchw,oc->nohw", x.astype(np.float64), w[:, :, 0, 0]),
                               rtol=1e-5, atol=1e-6)


AFTER_CONV = [   # (op, constant inputs ("_name": omitted), attributes): on a Conv's output, kept NHWC inside
    ("Slice", {"s": i64(1, 0, -1), "e": i64(3, 100, -100), "a": i64(1, 2, 3), "t": i64(1, 2, -2)}, {}),
    ("Split", {"split": i64(1, 3)}, {"axis": 1}),
    ("Split", {"split": i64(2, 4)}, {"axis": 3}),
    ("Gather", {"i": i64(4, 0, 0)}, {"axis": 2}),
    ("Gather", {"i": i64(1, 3)}, {"axis": 1}),
    ("Pad", {"p": i64(0, 1, 2, 0, 0, 0, 1, 3)}, {"mode": "edge"}),
    ("Pad", {"p": i64(0, 0, 0, 1, 0, 0, 2, 1), "v": f32(1.5)}, {"mode": "constant"}),
    ("Pad", {"p": i64(0, 0, 1, 2, 0, 0, 3, 1)}, {"mode": "reflect"}),
    ("Pad", {"p": i64(0, 1, 2, 2, 0, 0, 3, 1)}, {"mode": "wrap"}),
    ("Resize", {"_roi": None, "sc": f32(1, 1, 1.5, 0.6)}, {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}),
    ("Resize", {"_roi": None, "_scales": None, "sz": i64(2, 4, 7, 3)}, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ("Resize", {"_roi": None, "sc": f32(1, 1, 2, 2)}, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    ("ReduceMean", {"ax": i64(2, 3)}, {"keepdims": 1}),
    ("ReduceMax", {"ax": i64(1)}, {"keepdims": 0}),
    ("ReduceSum", {"ax": i64(0, 2)}, {"keepdims": 1}),
    ("ReduceMin", {"ax": i64(1, 3)}, {"keepdims": 0}),
    ("Softmax", {}, {"axis": 2}),
    ("Softmax", {}, {"axis": 1}),
    ("LayerNormalization", {"g": np.linspace(0.5, 1.5, 6).astype(np.float32)}, {"axis": -1}),
    ("LayerNormalization", {"g": np.linspace(0.5, 1.5, 30).astype(np.float32).reshape(5, 6)}, {"axis": 2}),
    ("Erf", {}, {}),
    ("HardSwish", {}, {}),
]


@pytest.mark.parametrize("op,extra,attrs,opset", [case + (18,) for case in AFTER_CONV] + [
    ("Softmax", {}, {"axis": 1}, 11), ("Softmax", {}, {"axis": 2}, 11)],
    ids=[f"{case[0]}-{i}" for i, case in enumerate(AFTER_CONV + [("Softmax11",), ("Softmax11",)])])
def test_ops_on_nhwc_values(rng, op, extra, attrs, opset):
    """Each op on a Conv's output (NHWC inside: tables, axes and layout mapped), against onnx's
    reference evaluator; Softmax also in opset 11, where axis 1 means all of C, H, W."""
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    outputs = ["y0", "y1"] if op == "Split" else ["y0"]
    inputs = ["c"] + ["" if k.startswith("_") else k for k in extra]
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(v, k) for k, v in extra.items() if v is not None]
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)

    def model(shapes):
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node(op, inputs, outputs, **attrs)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 6])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, shapes)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    wants = ReferenceEvaluator(model([None] * len(outputs))).run(None, {"x": x})
    if opset == 11:   # onnx's evaluator ignores Softmax-11's flattening: NumPy here
        c = np.einsum("nchw,oc->nohw", x.astype(np.float64), w[:, :, 0, 0])
        rows = c.reshape(int(np.prod(c.shape[:attrs["axis"]])), -1)
        e = np.exp(rows - rows.max(1, keepdims=True))
        wants = [(e / e.sum(1, keepdims=True)).reshape(c.shape)]
    net = onnx_import.import_onnx(model([w.shape for w in wants]))
    assert net.nodes[0].kind == "transpose" and net.nodes[1].kind == "conv2d"
    got = ml.Session(net).run({"x": x})
    for name, want in zip(outputs, wants):
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_pad_crops_with_negative_pads(rng):
    """Negative pads remove elements (ONNX allows them; onnx's reference evaluator does not);
    the axes input (opset 18) orders the pads."""
    model = _model("Pad", [("x", [3, 7]), ("p", i64(-1, 2, -3, 0)), ("v", f32(4.0)), ("ax", i64(1, 0))],
                   [("y", [5, 3])], 18)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    got = ml.Session(onnx_import.import_onnx(model)).run({"x": x})["y"]
    np.testing.assert_array_equal(got, np.concatenate([np.full((2, 3), 4.0, np.float32), x[:, 1:4]]))


def test_shape_arithmetic_folds(rng):
    """Ops exporters use on shapes fold at build time with ONNX's rules (integer Div truncates,
    Mod takes the divisor's sign); on a run-time input they are refused by name."""
    k = lambda name, v: numpy_helper.from_array(np.asarray(v), name)   # noqa: E731
    nodes = [helper.make_node("Div", ["m7", "i2"], ["d"]), helper.make_node("Mod", ["m7", "i3"], ["md"]),
             helper.make_node("Less", ["i2", "i3"], ["lt"]), helper.make_node("Sqrt", ["f16"], ["sq"]),
             helper.make_node("Neg", ["f1"], ["ng"]), helper.make_node("Where", ["lt", "sq", "ng"], ["wh"]),
             helper.make_node("ConstantOfShape", ["s3"], ["half"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Expand", ["half", "s23"], ["ex"]),
             helper.make_node("Add", ["d", "md"], ["dm"]), helper.make_node("Cast", ["dm"], ["dmf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["dmf", "wh"], ["c"]), helper.make_node("Add", ["c", "ex"], ["c2"]),
             helper.make_node("Add", ["x", "c2"], ["y"])]
    inits = [k("m7", np.int64(-7)), k("i2", np.int64(2)), k("i3", np.int64(3)), k("f16", np.float32(16)),
             k("f1", np.float32(1)), k("s3", np.array([3], np.int64)), k("s23", np.array([2, 3], np.int64))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    net = onnx_import.import_onnx(model)
    assert [n.kind for n in net.nodes] == ["add"]
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(ml.Session(net).run({"x": x})["y"], x + np.float32(-3 + 2 + 4 + 0.5))
    model = _model("Mod", [("x", [2]), ("i", i64(3, 3))], [("y", [2])], 17)
    with pytest.raises(mk.ValidationError, match=r"\(Mod, opset 17\): op Mod is supported on constants only .* 'x' is computed at run time"):
        onnx_import.import_onnx(model)


def test_batch_norm_with_a_negative_variance_is_refused(rng):
    """A variance below -epsilon would give NaN scales folded silently into the convolution."""
    model = residual_model(rng)
    v2 = next(t for t in model.graph.initializer if t.name == "v2")
    v2.CopyFrom(numpy_helper.from_array(np.full(8, -1.0, np.float32), "v2"))
    with pytest.raises(mk.ValidationError, match="BatchNormalization.*variance"):
        onnx_import.import_onnx(model)
