"""Specialised convolution kernels vs torch.nn.functional.conv2d, same process, same thread
count, torch given its best layout (channels_last or contiguous). Prints per layer our time,
torch's, ratio (ours / torch) and our GFLOP/s. Machine shared: ratios from one run, min of
repeats.   python bench/conv_kernels_vs_torch.py [threads ...] [--layer substring]"""
import sys
import time

import numpy as np

import mpskernels as mk

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


def main():
    import torch
    args = sys.argv[1:]
    only = None
    if "--layer" in args:
        i = args.index("--layer")
        only = args[i + 1]
        del args[i:i + 2]
    threads = [int(a) for a in args] or [1, 2]
    rng = np.random.default_rng(0)
    for nt in threads:
        torch.set_num_threads(nt)
        device = mk.Device(num_threads=nt)
        queue = device.make_command_queue()
        ratios = []
        for name, cin, cout, size, k, s, g in LAYERS:
            if only and only not in name:
                continue
            x = rng.standard_normal((1, size, size, cin)).astype(np.float32)
            if g == cin and g > 1:
                d = mk.CNNDepthWiseConvolutionDescriptor(k, k, cin, cout)
                w = rng.standard_normal((cout, k, k)).astype(np.float32)
                tw = torch.from_numpy(w[:, None])
            else:
                d = mk.CNNConvolutionDescriptor(k, k, cin, cout)
                w = rng.standard_normal((cout, k, k, cin)).astype(np.float32)
                tw = torch.from_numpy(w.transpose(0, 3, 1, 2).copy())
            d.stride_in_pixels_x = d.stride_in_pixels_y = s
            b = rng.standard_normal(cout).astype(np.float32)
            conv = mk.CNNConvolution.from_arrays(device, d, w, b)
            out = -(-size // s)
            src = mk.Image.from_numpy(device, x)
            dst = mk.Image.from_numpy(device, np.zeros((1, out, out, cout), np.float32))
            conv.offset = (k // 2, k // 2, 0)

            def ours():
                cb = queue.make_command_buffer()
                conv.encode(cb, src, dst)
                cb.commit()
                cb.wait_until_completed()

            t_ours = best(ours)
            tb = torch.from_numpy(b)
            tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            t_torch = []
            for fmt in (torch.channels_last, torch.contiguous_format):
                xi, wi = tx.contiguous(memory_format=fmt), tw.contiguous(memory_format=fmt)
                with torch.no_grad():
                    t_torch.append(best(lambda: torch.nn.functional.conv2d(xi, wi, tb, s, k // 2, 1, g)))
            tt = min(t_torch)
            flops = 2.0 * out * out * cout * k * k * (cin // g)
            ratios.append(t_ours / tt)
            print(f"threads={nt} {name:26s} {conv.implementation:28s} ours {t_ours * 1e3:8.3f} ms "
                  f"torch {tt * 1e3:8.3f} ms ratio {t_ours / tt:5.2f}  {flops / t_ours / 1e9:6.1f} GFLOP/s",
                  flush=True)
        if ratios:
            print(f"threads={nt} geometric mean ratio {np.exp(np.mean(np.log(ratios))):.2f}")


if __name__ == "__main__":
    main()
