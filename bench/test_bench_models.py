"""Whole models against ONNX Runtime: ResNet-18 and MobileNetV2 (bench/models.py, random
weights), fp32, batch 1 and 8, 1 and 2 threads. Checks outputs (1e-4 relative to the largest
logit), the memory plan (intermediates heap <= 1.05x the live-bytes lower bound), and reports
latency ratios (our median / ORT's median, alternating blocks in one process: bench/timing.py) and peak RSS (each
engine alone in a fresh process). Needs torch==2.13.0, onnx, onnxruntime (pip install '.[bench]').
Run: pytest bench/test_bench_models.py -s"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="exporting the models needs torch (pip install torch==2.13.0)")
ort = pytest.importorskip("onnxruntime", reason="the peer is onnxruntime (pip install onnxruntime)")
pytest.importorskip("onnx", reason="the importer needs onnx (pip install onnx)")

import timing  # noqa: E402
from mpskernels import ml  # noqa: E402

MODELS = ("resnet18", "mobilenetv2")


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    import models
    out = tmp_path_factory.mktemp("models")
    paths = {}
    for name, cls in (("resnet18", models.ResNet18), ("mobilenetv2", models.MobileNetV2)):
        paths[name] = str(out / f"{name}.onnx")
        models.export(cls(), paths[name])
    return paths


def _input(batch):
    return np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)


def _ort(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", MODELS)
def test_matches_onnxruntime(model_paths, model, batch):
    x = _input(batch)
    ours = ml.Session(model_paths[model], num_threads=2).run({"input": x})["logits"]
    want = _ort(model_paths[model], 2).run(None, {"input": x})[0]
    assert ours.shape == want.shape
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("model", MODELS)
def test_memory_plan(model_paths, model, report):
    s = ml.Session(model_paths[model])
    for batch in (1, 8):
        m = s.compile([(batch, 3, 224, 224)])[0].memory_stats
        assert m["peak_bytes"] <= 1.05 * m["lower_bound_bytes"]
        report((f"{model} b{batch} heap / lower bound", 0, m["peak_bytes"], m["lower_bound_bytes"],
                m["peak_bytes"] / m["lower_bound_bytes"],
                f"bytes (not us): heap {m['peak_bytes']}, no aliasing {m['requested_bytes']}"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", MODELS)
def test_latency_vs_onnxruntime(model_paths, report, model, batch, threads):
    x = _input(batch)
    ours = ml.Session(model_paths[model], num_threads=threads)
    peer = _ort(model_paths[model], threads)
    a, b = (float(np.median(t)) for t in timing.paired_samples(
        4.0 if batch == 1 else 8.0, lambda: ours.run({"input": x}),
        lambda: peer.run(None, {"input": x}), rounds=4))
    report((f"{model} batch {batch}", threads, a * 1e6, b * 1e6, a / b, "vs onnxruntime"))


# VmHWM (peak RSS of this address space): ru_maxrss would keep the forking pytest's peak across exec
_RSS = """
import sys, numpy as np
path, engine = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
if engine == "ours":
    from mpskernels import ml
    s = ml.Session(path, num_threads=1)
    run = lambda: s.run({"input": x})
else:
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, {"input": x})
for _ in range(3):
    run()
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


@pytest.mark.parametrize("model", MODELS)
def test_peak_rss(model_paths, report, tmp_path, model):
    """Peak RSS of a fresh process that loads the model and runs batch 1 three times. Ours
    loads the .mpkg (what a deployment ships; loading the .onnx would also import onnx)."""
    pkg = str(tmp_path / f"{model}.mpkg")
    ml.build_package(model_paths[model], pkg)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p))
    rss = {}
    for engine, path in (("ours", pkg), ("ort", model_paths[model])):
        out = subprocess.run([sys.executable, "-c", _RSS, path, engine], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        rss[engine] = int(out.stdout.split()[-1])   # KiB
    report((f"{model} peak RSS", 1, rss["ours"], rss["ort"], rss["ours"] / rss["ort"],
            f"KiB (not us): ours {rss['ours']} ORT {rss['ort']}, batch 1, fresh process"))
