"""Pooling kernels (src/pool/) through the IR's pool2d node, against a float64 NumPy reference."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ml


def reference(x, mode, kernel, strides, dilations, pads, count_include_pad, out_hw):
    """Plain loops over output pixels, float64."""
    n, h, w, c = x.shape
    kh, kw = kernel
    top, left, bottom, right = pads
    out = np.empty((n, *out_hw, c))
    for oy in range(out_hw[0]):
        for ox in range(out_hw[1]):
            taps, padded = [], 0
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * strides[0] - top + ky * dilations[0], ox * strides[1] - left + kx * dilations[1]
                    if 0 <= iy < h and 0 <= ix < w:
                        taps.append(x[:, iy, ix].astype(np.float64))
                    padded += iy < h + bottom and ix < w + right
            if mode == "max":
                out[:, oy, ox] = np.max(taps, 0)
            else:
                out[:, oy, ox] = np.sum(taps, 0) / (padded if count_include_pad else len(taps))
    return out


def run_network(device, net, feeds):
    lib = ml.Library(device, net)
    state = device.make_compiler().make_machine_learning_pipeline_state(
        ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor(net.name, lib)))
    heap = device.make_heap(mk.HeapDescriptor(size=max(state.intermediates_heap_size, 64)))
    table = device.make_argument_table(ml.ArgumentTableDescriptor())
    outs = []
    for b in state.reflection.bindings:
        if b.index < len(feeds):
            table.set_tensor(mk.Tensor.from_numpy(device, feeds[b.index]), b.index)
        else:
            outs.append(mk.Tensor.from_numpy(device, np.zeros(b.dimensions.shape, np.float32)))
            table.set_tensor(outs[-1], b.index)
    cb = device.make_command_queue().make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table)
    enc.dispatch_network(heap)
    enc.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    return [o.to_numpy().copy() for o in outs]


CASES = [  # shape, kernel, strides, dilations, pads, count_include_pad, ceil_mode
    ((1, 5, 5, 3), (2, 2), (1, 1), (1, 1), (0, 0, 0, 0), False, False),
    ((2, 7, 9, 17), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), False, False),
    ((2, 7, 9, 17), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), True, False),
    ((1, 8, 11, 300), (3, 2), (2, 3), (1, 1), (0, 1, 2, 0), True, True),
    ((3, 10, 10, 5), (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), False, False),
    ((1, 6, 6, 4), (3, 3), (2, 2), (1, 1), (0, 0, 0, 0), False, True),
    ((2, 12, 11, 64), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), False, False),   # ResNet's: 64-channel blocks
]


@pytest.mark.parametrize("mode", ["max", "average"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_pool2d(device, isa, rng, mode, case):
    shape, kernel, strides, dilations, pads, cip, ceil = CASES[case]
    net = ml.Network("p")
    x = net.input("x", shape)
    y = net.output(net.pool2d(x, mode, kernel, strides, dilations, pads, cip, ceil), "y")
    a = rng.standard_normal(shape, dtype=np.float32)
    got, = run_network(device, net, [a])
    want = reference(a, mode, kernel, strides, dilations, pads, cip, y.shape[1:3])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)   # fp32 sums of <= 9 taps


@pytest.mark.parametrize("mode", ["max", "average"])
def test_global_pool_threads_bitwise(device, device1, rng, mode):
    a = rng.standard_normal((4, 13, 17, 67), dtype=np.float32)
    net = ml.Network("g")
    net.output(net.pool2d(net.input("x", a.shape), mode), "y")
    one, = run_network(device1, net, [a])
    two, = run_network(device, net, [a])
    assert one.tobytes() == two.tobytes()
    want = a.max((1, 2), keepdims=True) if mode == "max" else a.astype(np.float64).mean((1, 2), keepdims=True)
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-6)   # 221 fp32 taps summed in order


def test_pool2d_errors():
    net = ml.Network("e")
    x = net.input("x", (1, 4, 4, 2))
    with pytest.raises(mk.ValidationError, match="mode"):
        net.pool2d(x, "min")
    with pytest.raises(mk.ValidationError, match="too small"):
        net.pool2d(x, "max", (5, 5))
    with pytest.raises(mk.ValidationError, match="rank 4"):
        net.pool2d(net.input("v", (4, 4)), "max", (2, 2))
