"""Convolution kernels vs torch.nn.functional.conv2d, same process, same thread count, torch
given its best layout (channels_last or contiguous). Prints per layer the kernel chosen, our
time, torch's, ratio (ours / torch) and our GFLOP/s.

    python bench/conv_kernels_vs_torch.py [threads ...] [--layer substring]
        the layer list below, min of repeats
    python bench/conv_kernels_vs_torch.py [threads ...] --model resnet18|mobilenetv2 [--batch N] [--cpu]
        every convolution of that model (bench/models.py; identical shapes measured once and
        counted), medians of samples alternating between us and torch (bench/timing.py), each
        layer's share of torch's whole-model convolution time, and the totals: where the time
        goes, and which layers cost most beyond torch's time. --cpu: time by the process's CPU
        time (time.process_time) instead of the wall clock: at one thread it ignores the time
        other jobs on a shared machine take the core away (kernel-only, ours and torch's)."""
import os
import sys
import time

import numpy as np

import mpskernels as mk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYERS = [  # name, cin, cout, size, k, stride, groups (groups == cin: depthwise)
    ("3->64 224 7x7 s2", 3, 64, 224, 7, 2, 1),
    ("64->64 56 3x3", 64, 64, 56, 3, 1, 1),
    ("128->128 28 3x3", 128, 128, 28, 3, 1, 1),
    ("256->256 14 3x3", 256, 256, 14, 3, 1, 1),
    ("512->512 7 3x3", 512, 512, 7, 3, 1, 1),
    ("depthwise 32 112 3x3", 32, 32, 112, 3, 1, 32),
    ("depthwise 144 56 3x3 s2", 144, 144, 56, 3, 2, 144),
]


def best(fn, seconds=0.6, min_reps=5):
    fn()
    times, end = [], time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def model_layers(name):
    """[(name, cin, cout, size, k, stride, groups, count)] of every Conv2d in the model, in
    order of first use, identical shapes merged (224x224 input, square everywhere)."""
    import torch
    import models
    model = {"resnet18": models.ResNet18, "mobilenetv2": models.MobileNetV2}[name]().eval()
    seen = {}

    def hook(mod, inputs, output):
        c = mod
        key = (c.in_channels, c.out_channels, inputs[0].shape[-1], c.kernel_size[0], c.stride[0], c.groups)
        seen[key] = seen.get(key, 0) + 1

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    out = []
    for (cin, cout, size, k, s, g), count in seen.items():
        kind = f"dw {cin}" if g == cin and g > 1 else f"{cin}->{cout}"
        out.append((f"{kind} {size} {k}x{k}" + (f" s{s}" if s > 1 else ""), cin, cout, size, k, s, g, count))
    return out


def layer_case(device, queue, rng, layer, batch):
    """(ours(), torch_calls {layout: fn}, flops) for one layer."""
    import torch
    name, cin, cout, size, k, s, g = layer[:7]
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    if g == cin and g > 1:
        d = mk.CNNDepthWiseConvolutionDescriptor(k, k, cin, cout)
        w = rng.standard_normal((cout, k, k)).astype(np.float32)
        tw = torch.from_numpy(w[:, None])
    else:
        d = mk.CNNConvolutionDescriptor(k, k, cin, cout)
        d.groups = g
        w = rng.standard_normal((cout, k, k, cin // g)).astype(np.float32)
        tw = torch.from_numpy(w.transpose(0, 3, 1, 2).copy())
    d.stride_in_pixels_x = d.stride_in_pixels_y = s
    b = rng.standard_normal(cout).astype(np.float32)
    conv = mk.CNNConvolution.from_arrays(device, d, w, b)
    out = -(-size // s)
    src = mk.Image.from_numpy(device, x)
    dst = mk.Image.from_numpy(device, np.zeros((batch, out, out, cout), np.float32))
    conv.offset = (k // 2, k // 2, 0)

    def ours():
        cb = queue.make_command_buffer()
        conv.encode(cb, src, dst)
        cb.commit()
        cb.wait_until_completed()

    tb = torch.from_numpy(b)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    calls = {}
    for fmt_name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
        xi, wi = tx.contiguous(memory_format=fmt), tw.contiguous(memory_format=fmt)
        calls[fmt_name] = lambda xi=xi, wi=wi: torch.nn.functional.conv2d(xi, wi, tb, s, k // 2, 1, g)
    flops = 2.0 * batch * out * out * cout * k * k * (cin // g)
    return conv, ours, calls, flops


def run_model(threads, model, batch, seconds, clock):
    import torch
    import timing
    layers = model_layers(model)
    rng = np.random.default_rng(0)
    for nt in threads:
        torch.set_num_threads(nt)
        device = mk.Device(num_threads=nt)
        queue = device.make_command_queue()
        rows = []
        with torch.inference_mode():
            for layer in layers:
                conv, ours, calls, flops = layer_case(device, queue, rng, layer, batch)
                med = [float(np.median(t)) for t in timing.paired_samples(
                    seconds, ours, *calls.values(), rounds=5, clock=clock)]
                rows.append((layer, conv.implementation, med[0], min(med[1:]), flops))
        total_ours = sum(r[0][7] * r[2] for r in rows)
        total_torch = sum(r[0][7] * r[3] for r in rows)
        print(f"\n{model} batch {batch} threads={nt}: every convolution, medians of alternating samples "
              f"({'CPU' if clock is time.process_time else 'wall'} time)")
        print(f"{'layer':24s} {'n':>2s} {'kernel':26s} {'ours us':>9s} {'torch us':>9s} {'ratio':>5s} "
              f"{'share':>5s} {'excess':>6s} {'GFLOP/s':>7s}")
        for layer, impl, t_ours, t_torch, flops in rows:
            n = layer[7]
            print(f"{layer[0]:24s} {n:2d} {impl:26s} {t_ours * 1e6:9.1f} {t_torch * 1e6:9.1f} "
                  f"{t_ours / t_torch:5.2f} {n * t_torch / total_torch:5.1%} "
                  f"{n * (t_ours - t_torch) / total_torch:+6.1%} {flops / t_ours / 1e9:7.1f}", flush=True)
        print(f"{model} batch {batch} threads={nt}: total ours {total_ours * 1e3:.2f} ms torch "
              f"{total_torch * 1e3:.2f} ms ratio {total_ours / total_torch:.3f}  (excess: the layer's "
              f"(ours - torch) x count as a share of torch's total)")


def main():
    args = sys.argv[1:]
    opts = {}
    for flag in ("--layer", "--model", "--batch", "--seconds"):
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            del args[i:i + 2]
    if "--model" in opts:
        clock = time.process_time if "--cpu" in args else time.perf_counter
        threads = [int(a) for a in args if a != "--cpu"] or [1, 2]
        run_model(threads, opts["--model"], int(opts.get("--batch", 1)), float(opts.get("--seconds", 1.0)), clock)
        return
    import torch
    threads = [int(a) for a in args] or [1, 2]
    only = opts.get("--layer")
    rng = np.random.default_rng(0)
    for nt in threads:
        torch.set_num_threads(nt)
        device = mk.Device(num_threads=nt)
        queue = device.make_command_queue()
        ratios = []
        for layer in LAYERS:
            if only and only not in layer[0]:
                continue
            conv, ours, calls, flops = layer_case(device, queue, rng, layer, 1)
            t_ours = best(ours)
            with torch.no_grad():
                tt = min(best(fn) for fn in calls.values())
            ratios.append(t_ours / tt)
            print(f"threads={nt} {layer[0]:26s} {conv.implementation:28s} ours {t_ours * 1e3:8.3f} ms "
                  f"torch {tt * 1e3:8.3f} ms ratio {t_ours / tt:5.2f}  {flops / t_ours / 1e9:6.1f} GFLOP/s",
                  flush=True)
        if ratios:
            print(f"threads={nt} geometric mean ratio {np.exp(np.mean(np.log(ratios))):.2f}")


if __name__ == "__main__":
    main()
