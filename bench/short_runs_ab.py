"""Elementwise operations on images of few channels (short runs: 3 channels stored 4 a pixel),
two builds of mpskernels compared in paired blocks: each block is a child process per build
(old, new, old, new, ...), each case timed as the median of its calls, one thread; the figure
is the median over the blocks. Nothing else differs, so the ratio new/old is the change.

Run: python bench/short_runs_ab.py OLD_DIR NEW_DIR [--blocks 5] [--isa avx2]   (each DIR
holds a built mpskernels package; the figures are in docs/elementwise.md)."""
import argparse
import json
import os
import subprocess
import sys
import time


def cases(isa):
    import numpy as np
    import mpskernels as mk
    if isa:
        assert mk._native.select_isa(isa) == isa
    F = mk.ImageFeatureChannelFormat
    device = mk.Device(num_threads=1)
    queue = device.make_command_queue()
    rng = np.random.default_rng(0)
    out = {}

    def run(encode):
        cb = queue.make_command_buffer()
        encode(cb)
        cb.commit()
        cb.wait_until_completed()

    for c in (3, 4):
        x = rng.random((224, 224, c), dtype=np.float32)
        img = mk.Image.from_numpy(device, x)
        out[f"write_bytes 224x224x{c} f32"] = lambda img=img, x=x: img.write_bytes(x)
        out[f"to_numpy 224x224x{c} f32"] = img.to_numpy
    u = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
    iu = mk.Image.from_numpy(device, u)
    out["write_bytes 224x224x3 u8"] = lambda: iu.write_bytes(u)
    out["to_numpy 224x224x3 u8"] = iu.to_numpy
    chw = rng.random((3, 224, 224), dtype=np.float32)
    out["write_bytes 224x224x3 f32 CHW"] = lambda: img3.write_bytes(chw, mk.DataLayout.FEATURE_CHANNELS_X_HEIGHT_X_WIDTH)
    x3 = rng.random((224, 224, 3), dtype=np.float32)
    img3 = mk.Image.from_numpy(device, x3)
    out["from_numpy 224x224x3 f32->f16"] = lambda: mk.Image.from_numpy(device, x3, channel_format=F.FLOAT16)
    out["from_numpy 224x224x3 u8->f32"] = lambda: mk.Image.from_numpy(device, u, channel_format=F.FLOAT32)
    for c in (3, 256):
        h = 224 if c == 3 else 56
        s = mk.Image.from_numpy(device, rng.standard_normal((h, h, c), dtype=np.float32))
        d = mk.Image(device, mk.ImageDescriptor(F.FLOAT32, h, h, c))
        relu = mk.CNNNeuronReLU(device, a=0.0)
        add = mk.CNNAdd(device)
        out[f"relu 1x{h}x{h}x{c}"] = lambda relu=relu, s=s, d=d: run(lambda cb: relu.encode(cb, s, d))
        out[f"add 1x{h}x{h}x{c}"] = lambda add=add, s=s, d=d: run(lambda cb: add.encode(cb, s, s, d))
    sig = mk.CNNNeuronSigmoid(device)
    h3 = mk.Image(device, mk.ImageDescriptor(F.FLOAT16, 224, 224, 3))
    out["sigmoid 224x224x3 f32->f16"] = lambda: run(lambda cb: sig.encode(cb, img3, h3))
    return out


def child(calls, isa):
    res = {}
    for name, fn in cases(isa).items():
        for _ in range(5):
            fn()
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        ts.sort()
        res[name] = ts[len(ts) // 2] * 1e6
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--isa", default="", help="generic, avx2 or avx512 (default: the best)")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args.calls, args.isa)
    runs = {"old": [], "new": []}
    for _ in range(args.blocks):
        for which in ("old", "new"):
            env = dict(os.environ, PYTHONPATH=getattr(args, which), MPSKERNELS_NUM_THREADS="1")
            p = subprocess.run([sys.executable, __file__, args.old, args.new, "--child",
                                "--calls", str(args.calls), "--isa", args.isa], env=env,
                               capture_output=True, text=True, check=True)
            runs[which].append(json.loads(p.stdout))
    med = lambda v: sorted(v)[len(v) // 2]
    print(f"{'case':34} {'old us':>9} {'new us':>9} {'new/old':>8}")
    for name in runs["old"][0]:
        o = med([r[name] for r in runs["old"]])
        n = med([r[name] for r in runs["new"]])
        print(f"{name:34} {o:9.1f} {n:9.1f} {n / o:8.3f}")


if __name__ == "__main__":
    main()
