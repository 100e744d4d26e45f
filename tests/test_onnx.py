"""The ONNX importer (mpskernels/onnx_import.py), building a pipeline straight from an .onnx
file, ml.Session, and the `mpskernels package` / `mpskernels run` commands. Results are checked
against onnx's own reference evaluator (float64 NumPy inside), rtol 1e-4."""
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
