"""What fusing the residual adds into the convolutions (ml._fuse_residual_adds) gains: the same
model on the same build, pipelines with the fusion and without (the function replaced by the
identity while compiling), and ONNX Runtime, sampled in alternating blocks (bench/timing.py).
Two measures: Session.run (process CPU time at one thread, wall time otherwise; medians), and
the pipelines' recorded commands alone (thread CPU time; fastest and median), which leaves out
Python and the queue.

Run: PYTHONPATH=$PWD python bench/residual_fusion_ab.py [--threads T] [--batch N ...]
(needs torch==2.13.0, onnx, onnxruntime; the figures are in docs/ml.md)."""
import argparse
import os
import sys
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=8.0, help="per model and batch, batch 1 (x2 for more)")
    args = ap.parse_args()
    import onnxruntime as ort
    from mpskernels import ml
    sys.path.insert(0, os.path.dirname(__file__))
    import models
    import timing

    tmp = tempfile.mkdtemp()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    for name, cls in (("resnet18", models.ResNet18), ("mobilenetv2", models.MobileNetV2)):
        path = os.path.join(tmp, f"{name}.onnx")
        models.export(cls(), path)
        for batch in args.batch:
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            fused, unfused = ml.Session(path, num_threads=args.threads), ml.Session(path, num_threads=args.threads)
            fuse = ml._fuse_residual_adds
            ml._fuse_residual_adds = lambda net, shapes: list(net.nodes)
            try:
                unfused.run({"input": x})   # compiles for this shape now
            finally:
                ml._fuse_residual_adds = fuse
            fused.run({"input": x})
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
            peer = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            seconds = args.seconds * (1 if batch == 1 else 2)
            a, b, c = (float(np.median(t)) for t in timing.paired_samples(
                seconds, lambda: fused.run({"input": x}), lambda: unfused.run({"input": x}),
                lambda: peer.run(None, {"input": x}), rounds=6, clock=clock))
            pool = fused.device._pool
            commands = [_commands(s, x) for s in (fused, unfused)]
            kernels = [[], []]
            for _ in range(max(5, int(seconds / (a * 2) / 2))):
                for k, cs in enumerate(commands):
                    t0 = time.thread_time() if args.threads == 1 else time.perf_counter()
                    for command in cs:
                        command.run(pool)
                    kernels[k].append((time.thread_time() if args.threads == 1 else time.perf_counter()) - t0)
            kf, ku = (np.array(k) for k in kernels)
            print(f"{name} batch {batch}, {args.threads} thread(s): Session.run fused {a * 1e3:.2f} ms, "
                  f"unfused {b * 1e3:.2f}, ORT {c * 1e3:.2f}: fused / unfused {a / b:.3f}, fused / ORT "
                  f"{a / c:.3f}, unfused / ORT {b / c:.3f}; commands alone fused / unfused: fastest "
                  f"{kf.min() / ku.min():.3f}, median {np.median(kf) / np.median(ku):.3f}", flush=True)


def _commands(session, x):
    """The commands one run of the session's pipeline records (for this input shape)."""
    import mpskernels as mk
    state, heap, table, _ = session.compile([x.shape])
    table.set_tensor(mk.Tensor.from_numpy(session.device, x), 0)
    state._recording = None
    cb = session._queue.make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table)
    enc.dispatch_network(heap)
    enc.end_encoding()
    return list(cb._commands)


if __name__ == "__main__":
    main()
