"""Per-node profile of a whole model (bench/models.py), ours against ONNX Runtime's own
profiler (SessionOptions.enable_profiling), one thread, samples alternating between the two
engines. Ours: each node's recorded commands run directly (the kernels alone); all commands in one go and Session.run, process CPU time, median
(their difference is the pipeline's own cost: Python encode and hand-off), and Session.run
re-encoding every node and making a new input tensor per run (the pipeline before its
recorded commands were replayed, on the same kernels). ORT: its profiler's
per-node wall time (it has no CPU time), so ours per node is wall time too; per node, each figure
is the fastest sample (on a shared machine the least disturbed one); runs in process CPU time,
median. ORT's nodes carry the same names (its
NCHWc convolutions add "_nchwc"); on both sides a convolution followed by a residual Add (and
ReLU) is one node that includes them (ours: "+ add" in the summary's node classes).

Run: PYTHONPATH=$PWD python bench/profile_models.py resnet18 [--batch 1] [--reps 30]
(needs torch==2.13.0, onnx, onnxruntime; the figures are in docs/ml.md)."""
import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["resnet18", "mobilenetv2"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import onnxruntime as ort
    import mpskernels as mk
    from mpskernels import ml
    sys.path.insert(0, os.path.dirname(__file__))
    import models

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, f"{args.model}.onnx")
    models.export({"resnet18": models.ResNet18, "mobilenetv2": models.MobileNetV2}[args.model](), path)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)

    ours = ml.Session(path, num_threads=args.threads)
    ours.run({"input": x})
    state, heap, table, _ = ours.compile([x.shape])
    table.set_tensor(mk.Tensor.from_numpy(ours.device, x), 0)
    owner = {}   # command -> its node: each step's commands, recorded once
    for step in state._steps:
        def run(cb, ops, name, record=step.run, node=step.node):
            first = len(cb._commands)
            record(cb, ops, name)
            for c in cb._commands[first:]:
                owner[id(c)] = node
        step.run = run
    state._recording = None
    cb = ours._queue.make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table)
    enc.dispatch_network(heap)
    enc.end_encoding()
    commands, pool = list(cb._commands), ours.device._pool

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, "ort")
    peer = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    peer.run(None, {"input": x})

    def reencoding():
        state._recording = None
        ours._inputs.clear()
        ours.run({"input": x})

    mine, direct, whole, legacy, theirs = collections.defaultdict(list), [], [], [], []
    # process CPU time counts every thread's: with more than one, wall time
    clock, cpu = time.perf_counter, (time.process_time if args.threads == 1 else time.perf_counter)
    for _ in range(args.reps):
        per = collections.defaultdict(float)
        for c in commands:
            t0 = clock()
            c.run(pool)
            per[owner[id(c)]] += clock() - t0
        for node, t in per.items():
            mine[node].append(t)
        t0 = cpu()
        for c in commands:
            c.run(pool)
        direct.append(cpu() - t0)
        t0 = cpu()
        ours.run({"input": x})
        whole.append(cpu() - t0)
        t0 = cpu()
        reencoding()
        legacy.append(cpu() - t0)
        t0 = cpu()
        peer.run(None, {"input": x})
        theirs.append(cpu() - t0)
    events = json.load(open(peer.end_profiling()))
    ort_nodes = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ort_nodes[e["name"][:-len("_kernel_time")].removesuffix("_nchwc")].append(e["dur"] * 1e-6)
    ort_nodes = {k: min(v[1:]) for k, v in ort_nodes.items()}   # [0]: the warm-up run; the fastest

    best, median = min, (lambda v: float(np.median(v)))   # noqa: E731
    print(f"{args.model} batch {args.batch}, {args.threads} thread(s), {args.reps} alternating samples, us")
    print(f"| node | kind | ours | ORT | ours / ORT |\n|---|---|---|---|---|")
    total, seen = 0.0, set()
    for node in state._nodes:   # the network's nodes after fusion (ml._fuse_residual_adds)
        if node not in mine:
            continue
        t = best(mine[node])
        total += t
        peer_t = ort_nodes.get(node.name)
        seen.add(node.name)
        ratio = f"{t / peer_t:.2f}" if peer_t else "-"
        print(f"| {node.name} | {node.kind} | {t * 1e6:.0f} | {peer_t * 1e6 if peer_t else 0:.0f} | {ratio} |")
    rest = {k: v for k, v in ort_nodes.items() if k not in seen}
    for k, v in rest.items():
        print(f"| {k} (ORT only) | | | {v * 1e6:.0f} | |")
    by_kind = collections.defaultdict(float)
    for node, v in mine.items():
        by_kind[node.kind] += best(v)
    print(f"\nours: nodes {total * 1e3:.2f} ms ({', '.join(f'{k} {v * 1e3:.2f}' for k, v in by_kind.items())}); "
          f"all commands in one go {median(direct) * 1e3:.2f} ms, Session.run {median(whole) * 1e3:.2f} ms: "
          f"the pipeline's own cost {(median(whole) - median(direct)) * 1e3:.2f} ms")
    print(f"ORT: nodes {sum(ort_nodes.values()) * 1e3:.2f} ms, run {median(theirs) * 1e3:.2f} ms; "
          f"run ratio ours / ORT {median(whole) / median(theirs):.2f}, re-encoding every run "
          f"{median(legacy) * 1e3:.2f} ms: {median(legacy) / median(theirs):.2f}")
    print("\n| node class | nodes | ours | ORT | ours / ORT |\n|---|---|---|---|---|")
    for cls in dict.fromkeys(_class(n) for n in mine):
        nodes = [n for n in mine if _class(n) == cls]
        a, b = sum(best(mine[n]) for n in nodes), sum(ort_nodes.get(n.name, 0.0) for n in nodes)
        print(f"| {cls} | {len(nodes)} | {a * 1e6:.0f} | {b * 1e6:.0f} | {a / b if b else float('nan'):.2f} |")
    print(f"| ORT only: {', '.join(rest)} | | | {sum(rest.values()) * 1e6:.0f} | |")


def _class(node):
    """What a node is, for the summary: its kind, a convolution's window and grouping."""
    if node.kind != "conv2d":
        return node.kind
    out, kh, kw, cin_g = node.attrs["weights"].shape
    what = ("depthwise" if node.attrs["groups"] > 1 else f"{cin_g}->{out}" if cin_g < 8
            else ("widening" if out > cin_g else "narrowing") if kh == kw == 1 else "")
    add = " + add" if node.attrs.get("residual") else ""
    return f"conv {kh}x{kw} s{node.attrs['strides'][0]} {what}".rstrip() + add


if __name__ == "__main__":
    main()
