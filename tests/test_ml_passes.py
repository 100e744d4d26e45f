"""Metal 4 passes: networks compiled to pipelines, compute and machine-learning passes in one
command buffer, barriers and fences, the hazard check, and misuse. References: NumPy float64."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ml

S = mk.Stages
ML_USAGE = mk.TensorUsage.COMPUTE | mk.TensorUsage.MACHINE_LEARNING
RTOL = 1e-5   # fp32 sums of at most a few hundred products, against float64


def conv_reference(x, w, b, strides, dilations, pads, groups):
    """NHWC float64 convolution: w [out][kh][kw][in/groups], pads (top, left, bottom, right)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    n, h, wd, c = x.shape
    out_c, kh, kw, cin_g = w.shape
    (sy, sx), (dy, dx) = strides, dilations
    oh, ow = (h - dy * (kh - 1) - 1) // sy + 1, (wd - dx * (kw - 1) - 1) // sx + 1
    y = np.zeros((n, oh, ow, out_c))
    cout_g = out_c // groups
    for g in range(groups):
        for q in range(kh):
            for p in range(kw):
                patch = x[:, q * dy:q * dy + (oh - 1) * sy + 1:sy, p * dx:p * dx + (ow - 1) * sx + 1:sx,
                          g * cin_g:(g + 1) * cin_g]
                y[..., g * cout_g:(g + 1) * cout_g] += patch @ w[g * cout_g:(g + 1) * cout_g, q, p, :].T
    return y + (0 if b is None else b)


def residual_network(rng, cin=5, cout=7):
    """x NHWC -> conv3x3 (+bias, ReLU fused) -> conv1x1 (stride 2) + residual -> sigmoid -> NCHW."""
    net = ml.Network("block")
    x = net.input("x", (-1, 9, 8, cin))
    w1, b1 = rng.standard_normal((cout, 3, 3, cin)), rng.standard_normal(cout)
    w2 = rng.standard_normal((cout, 1, 1, cout))
    h = net.conv2d(x, w1, b1, pads=(1, 1, 1, 1), neuron=mk.NNNeuronDescriptor(mk.CNNNeuronType.RELU))
    r = net.conv2d(h, w2, strides=(2, 2), name="down")
    ws = rng.standard_normal((cout, 1, 1, cin))
    skip = net.conv2d(x, ws, strides=(2, 2), name="skip")
    s = net.neuron(net.add(r, skip), mk.CNNNeuronType.SIGMOID, a=1.0)
    net.output(net.transpose(s, (0, 3, 1, 2)), "y")

    def reference(xv):
        hv = np.maximum(conv_reference(xv, w1, b1, (1, 1), (1, 1), (1, 1, 1, 1), 1), 0)
        rv = conv_reference(hv, w2, None, (2, 2), (1, 1), (0, 0, 0, 0), 1)
        sv = conv_reference(xv, ws, None, (2, 2), (1, 1), (0, 0, 0, 0), 1)
        return (1 / (1 + np.exp(-(rv + sv)))).transpose(0, 3, 1, 2)
    return net, reference


def pipeline(device, net, **input_dims):
    d = ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor(net.name, ml.Library(device, net)))
    for index, shape in input_dims.items():
        d.set_input_dimensions(mk.TensorExtents.from_shape(shape), int(index[1:]))
    return device.make_compiler().make_machine_learning_pipeline_state(d)


def tensor(device, array):
    return mk.Tensor.from_numpy(device, np.asarray(array, np.float32), usage=ML_USAGE)


def empty(device, shape, dtype=mk.TensorDataType.FLOAT32):
    return device.make_tensor(mk.TensorDescriptor(mk.TensorExtents.from_shape(shape), data_type=dtype,
                                                  usage=ML_USAGE))


def table(device, *tensors):
    t = device.make_argument_table(ml.ArgumentTableDescriptor(max_buffer_bind_count=8))
    for i, x in enumerate(tensors):
        t.set_tensor(x, i)
    return t


def heap_for(device, state):
    return device.make_heap(mk.HeapDescriptor(size=max(state.intermediates_heap_size, 4096)))


@pytest.mark.parametrize("batch", [1, 3])
def test_network_matches_reference(device, batch):
    rng = np.random.default_rng(batch)
    net, reference = residual_network(rng)
    state = pipeline(device, net, i0=(batch, 9, 8, 5))
    b = state.reflection.bindings
    assert [(x.name, x.index, x.access) for x in b] == [
        ("x", 0, mk.BindingAccess.READ_ONLY), ("y", 1, mk.BindingAccess.WRITE_ONLY)]
    assert b[0].dimensions == mk.TensorExtents(4, [5, 8, 9, batch]) and b[1].dimensions.shape == (batch, 7, 5, 4)
    # intermediates: h (9x8x7) and skip (5x4x7); "down" accumulates into skip's slot (the add
    # fused into it, in place), the sigmoid writes over it too
    stats = state.memory_stats
    assert [s.node.kind for s in state._steps] == ["conv2d", "conv2d", "conv2d", "neuron", "transpose"]
    assert stats["requested_bytes"] == stats["lower_bound_bytes"] == stats["peak_bytes"]
    xv = rng.standard_normal((batch, 9, 8, 5)).astype(np.float32)
    x, y = tensor(device, xv), empty(device, (batch, 7, 5, 4))
    cb = device.make_command_queue().make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table(device, x, y))
    enc.dispatch_network(heap_for(device, state))
    enc.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None
    np.testing.assert_allclose(y.to_numpy(), reference(xv), rtol=RTOL, atol=1e-6)


def chain(device, rng, barrier=True, how="consumer"):
    """compute (x -> a = tanh x) -> ML (a -> y) -> compute (z = y * c); returns the tensors."""
    net, reference = residual_network(rng)
    state = pipeline(device, net, i0=(2, 9, 8, 5))
    xv = rng.standard_normal((2, 9, 8, 5)).astype(np.float32)
    cv = rng.standard_normal((1, 7, 1, 1)).astype(np.float32)     # broadcast over batch, H, W
    x, a, c = tensor(device, xv), empty(device, xv.shape), tensor(device, cv)
    y, z = empty(device, (2, 7, 5, 4)), empty(device, (2, 7, 5, 4))
    cb = device.make_command_queue().make_command_buffer()
    fence = ml.Fence(device)
    pre = cb.make_compute_command_encoder()
    pre.label = "pre"
    pre.encode(mk.CNNNeuronTanH(device, 1.0, 1.0), x, a)
    if barrier and how == "producer":
        pre.barrier_after_stages(S.DISPATCH, S.MACHINE_LEARNING)
    if barrier and how == "fence":
        pre.update_fence(fence, S.DISPATCH)
    pre.end_encoding()
    enc = cb.make_machine_learning_command_encoder()
    enc.label = "net"
    if barrier and how == "consumer":
        enc.barrier_after_queue_stages(S.DISPATCH, S.MACHINE_LEARNING)
    if barrier and how == "fence":
        enc.wait_for_fence(fence, S.MACHINE_LEARNING)
    enc.set_pipeline_state(state)
    enc.set_argument_table(table(device, a, y))
    enc.dispatch_network(heap_for(device, state))
    if barrier and how != "consumer":
        enc.barrier_after_stages(S.MACHINE_LEARNING, S.DISPATCH)
    enc.end_encoding()
    post = cb.make_compute_command_encoder()
    post.label = "post"
    if barrier and how == "consumer":
        post.barrier_after_queue_stages(S.MACHINE_LEARNING, S.DISPATCH)
    post.encode(mk.CNNMultiply(device), y, c, z)
    post.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    return z.to_numpy(), reference(np.tanh(xv.astype(np.float64))) * cv


@pytest.mark.parametrize("how", ["consumer", "producer", "fence"])
def test_compute_ml_compute_chain(device, how):
    got, want = chain(device, np.random.default_rng(7), True, how)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_chain_without_barrier_is_a_hazard(device):
    with pytest.raises(mk.HazardError) as e:
        chain(device, np.random.default_rng(7), barrier=False)
    message = str(e.value)
    assert "machine-learning pass 'net'" in message and "compute pass 'pre'" in message
    assert "binding 'x' (index 0)" in message and "reads" in message and "writes" in message


def test_validation_can_be_switched_off(device):
    quiet = mk.Device(num_threads=1, validate_passes=False)
    got, want = chain(quiet, np.random.default_rng(7), barrier=False)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)   # passes run in order here


def test_barrier_stages_must_match(device):
    """A barrier for the wrong stages orders nothing."""
    x, a, b = tensor(device, np.ones((4, 16))), empty(device, (4, 16)), empty(device, (4, 16))
    cb = device.make_command_queue().make_command_buffer()
    p = cb.make_compute_command_encoder()
    p.encode(mk.CNNNeuronReLU(device, 0.0), x, a)
    p.end_encoding()
    q = cb.make_compute_command_encoder()
    q.barrier_after_queue_stages(S.BLIT, S.DISPATCH)
    with pytest.raises(mk.HazardError, match="compute pass 1 reads .* which dispatch 0 .* of compute pass 0 writes"):
        q.encode(mk.CNNNeuronReLU(device, 0.0), a, b)


def test_hazards_inside_a_pass(device):
    x, a, b = tensor(device, np.ones((4, 16))), empty(device, (4, 16)), empty(device, (4, 16))
    cb = device.make_command_queue().make_command_buffer()
    p = cb.make_compute_command_encoder()
    p.encode(mk.CNNNeuronReLU(device, 0.0), x, a)
    p.encode(mk.CNNNeuronReLU(device, 0.0), x, b)            # reads x again: no conflict
    with pytest.raises(mk.HazardError, match="no barrier_after_encoder_stages"):
        p.encode(mk.CNNNeuronAbsolute(device), a, b)
    p.barrier_after_encoder_stages(S.DISPATCH, S.DISPATCH)
    p.encode(mk.CNNNeuronAbsolute(device), a, b)
    p.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    np.testing.assert_array_equal(b.to_numpy(), 1)


def test_two_networks_sharing_a_heap_need_ordering(device):
    rng = np.random.default_rng(3)
    net, _ = residual_network(rng)
    state = pipeline(device, net, i0=(1, 9, 8, 5))
    heap = heap_for(device, state)
    x = tensor(device, rng.standard_normal((1, 9, 8, 5)))
    y1, y2 = empty(device, (1, 7, 5, 4)), empty(device, (1, 7, 5, 4))
    cb = device.make_command_queue().make_command_buffer()
    for i, y in enumerate((y1, y2)):
        enc = cb.make_machine_learning_command_encoder()
        enc.set_pipeline_state(state)
        enc.set_argument_table(table(device, x, y))
        if i == 0:
            enc.dispatch_network(heap)
        else:
            with pytest.raises(mk.HazardError, match="the intermediates heap"):
                enc.dispatch_network(heap)
            enc.barrier_after_queue_stages(S.MACHINE_LEARNING, S.MACHINE_LEARNING)
            enc.dispatch_network(heap)
        enc.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    np.testing.assert_array_equal(y1.to_numpy(), y2.to_numpy())


@pytest.mark.parametrize("dtype", [mk.TensorDataType.FLOAT32, mk.TensorDataType.FLOAT16])
def test_compute_tensor_ops(device, dtype):
    """Neurons (PReLU along the innermost dimension), broadcast arithmetic, copy and conv on
    tensors of odd shapes and rank up to 6, against NumPy."""
    rng = np.random.default_rng(11)
    tol = 1e-6 if dtype == mk.TensorDataType.FLOAT32 else 2e-3
    npdt = np.float32 if dtype == mk.TensorDataType.FLOAT32 else np.float16
    av = rng.standard_normal((2, 3, 1, 5, 2, 7)).astype(npdt)
    bv = rng.standard_normal((3, 4, 1, 1, 7)).astype(npdt)
    slopes = rng.standard_normal(7).astype(np.float32)
    a = mk.Tensor.from_numpy(device, av)
    b = mk.Tensor.from_numpy(device, bv)
    s, p = empty(device, (2, 3, 4, 5, 2, 7), dtype), empty(device, av.shape, dtype)
    cb = device.make_command_queue().make_command_buffer()
    enc = cb.make_compute_command_encoder()
    sub = mk.CNNSubtract(device)
    sub.primary_scale, sub.bias = 2.0, 0.5
    enc.encode(sub, a, b, s)
    enc.encode(mk.CNNNeuronPReLU(device, slopes), a, p)
    enc.barrier_after_encoder_stages(S.DISPATCH, S.DISPATCH)
    enc.copy(p, empty(device, av.shape, dtype))
    enc.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    a64, b64 = av.astype(np.float64), bv.astype(np.float64)
    np.testing.assert_allclose(s.to_numpy(), 2 * a64 - b64 + 0.5, rtol=tol, atol=tol)
    np.testing.assert_allclose(p.to_numpy(), np.where(a64 > 0, a64, a64 * slopes), rtol=tol, atol=tol)


def test_conv_on_tensors_grouped_dilated(device):
    rng = np.random.default_rng(5)
    net = ml.Network("conv")
    x = net.input("x", (2, 11, 10, 6))
    w = rng.standard_normal((9, 3, 2, 2)).astype(np.float32)
    net.output(net.conv2d(x, w, rng.standard_normal(9), strides=(2, 1), dilations=(2, 3),
                          pads=(2, 1, 1, 3), groups=3), "y")
    state = pipeline(device, net)
    assert state.intermediates_heap_size == 0
    xv = rng.standard_normal((2, 11, 10, 6)).astype(np.float32)
    want = conv_reference(xv, w, net.nodes[0].attrs["bias"], (2, 1), (2, 3), (2, 1, 1, 3), 3)
    y = empty(device, want.shape)
    cb = device.make_command_queue().make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table(device, tensor(device, xv), y))
    enc.dispatch_network(device.make_heap(mk.HeapDescriptor(size=64)))
    enc.end_encoding()
    cb.commit()
    cb.wait_until_completed()
    np.testing.assert_allclose(y.to_numpy(), want, rtol=RTOL, atol=1e-5)


# ---- misuse ------------------------------------------------------------------------------------

def ml_encoder(device, state, *tensors):
    cb = device.make_command_queue().make_command_buffer()
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table(device, *tensors))
    return cb, enc


def test_bad_bindings_and_heaps(device):
    rng = np.random.default_rng(1)
    net, _ = residual_network(rng)
    state = pipeline(device, net, i0=(1, 9, 8, 5))
    x, y = empty(device, (1, 9, 8, 5)), empty(device, (1, 7, 5, 4))
    heap = heap_for(device, state)
    cases = [
        ((empty(device, (2, 9, 8, 5)), y), heap, r"binding 'x' \(index 0\) takes shape \(1, 9, 8, 5\)"),
        ((empty(device, (1, 9, 8, 5), mk.TensorDataType.FLOAT16), y), heap, "takes FLOAT32, the bound tensor is FLOAT16"),
        ((x,), heap, r"no tensor bound for binding 'y' \(index 1\)"),
        ((x, y), device.make_heap(mk.HeapDescriptor(size=64)),
         f"has 64 bytes; the pipeline needs intermediates_heap_size = {state.intermediates_heap_size}"),
        ((mk.Tensor.from_numpy(device, np.zeros((1, 9, 8, 5), np.float32), usage=mk.TensorUsage.COMPUTE), y),
         heap, "lacks TensorUsage.MACHINE_LEARNING"),
    ]
    for tensors, h, message in cases:
        cb, enc = ml_encoder(device, state, *tensors)
        with pytest.raises(mk.ValidationError, match=message):
            enc.dispatch_network(h)
    inside = device.make_heap(mk.HeapDescriptor(size=state.intermediates_heap_size, storage_mode=mk.StorageMode.SHARED))
    cb, enc = ml_encoder(device, state, x, inside.make_tensor(mk.TensorDescriptor(
        mk.TensorExtents.from_shape((1, 7, 5, 4)), usage=ML_USAGE)))
    with pytest.raises(mk.ValidationError, match="lies in the intermediates heap"):
        enc.dispatch_network(inside)


def test_encoder_life_cycle(device):
    rng = np.random.default_rng(2)
    net, _ = residual_network(rng)
    state = pipeline(device, net, i0=(1, 9, 8, 5))
    cb, enc = ml_encoder(device, state, empty(device, (1, 9, 8, 5)), empty(device, (1, 7, 5, 4)))
    with pytest.raises(mk.CommandBufferStateError, match="still encoding"):
        cb.make_compute_command_encoder()
    with pytest.raises(mk.CommandBufferStateError, match="end_encoding"):
        cb.commit()
    enc.end_encoding()
    for call in (lambda: enc.dispatch_network(heap_for(device, state)), enc.end_encoding,
                 lambda: enc.set_pipeline_state(state),
                 lambda: enc.barrier_after_encoder_stages(S.ALL, S.ALL)):
        with pytest.raises(mk.CommandBufferStateError, match="after end_encoding"):
            call()
    cb.commit()
    with pytest.raises(mk.CommandBufferStateError, match="already committed"):
        cb.make_machine_learning_command_encoder()
    enc = device.make_command_queue().make_command_buffer().make_machine_learning_command_encoder()
    with pytest.raises(mk.ValidationError, match="set_pipeline_state and set_argument_table first"):
        enc.dispatch_network(heap_for(device, state))
    with pytest.raises(mk.ValidationError, match="no earlier pass of this command buffer updated the fence"):
        enc.wait_for_fence(ml.Fence(device), S.MACHINE_LEARNING)


def test_pipeline_descriptor_checks(device):
    net, _ = residual_network(np.random.default_rng(0))
    with pytest.raises(mk.ValidationError, match=r"input 'x' \(binding 0\) has free dimensions"):
        pipeline(device, net)
    with pytest.raises(mk.ValidationError, match=r"shape \(1, 9, 9, 5\) does not fit the model's \(-1, 9, 8, 5\)"):
        pipeline(device, net, i0=(1, 9, 9, 5))
    d = ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor("nope", ml.Library(device, net)))
    with pytest.raises(mk.ValidationError, match="no function 'nope'"):
        device.make_compiler().make_machine_learning_pipeline_state(d)
    d.set_input_dimensions(mk.TensorExtents.from_shape((1, 9, 8, 5)), 0)
    assert d.input_dimensions(0).shape == (1, 9, 8, 5)
    d.reset()
    assert d.input_dimensions(0) is None and d.machine_learning_function_descriptor is None
    with pytest.raises(mk.ValidationError, match="do not broadcast"):
        n = ml.Network()
        n.add(n.input("a", (2, 3)), n.input("b", (4, 3)))
    with pytest.raises(mk.ValidationError, match="input has 4 channels"):
        n = ml.Network()
        n.conv2d(n.input("a", (1, 5, 5, 4)), np.zeros((2, 3, 3, 3)))


def test_set_resource_binds_by_id(device):
    t = empty(device, (2, 16))
    table_ = device.make_argument_table(ml.ArgumentTableDescriptor(max_buffer_bind_count=2))
    table_.set_resource(t.gpu_resource_id, 1)
    assert table_._tensors[1] is t
    with pytest.raises(mk.ValidationError, match=r"outside 0..1"):
        table_.set_tensor(t, 2)


def test_metal4_queue_commits_in_order(device):
    from mpskernels import metal4
    queue = metal4.CommandQueue(device)
    allocator = metal4.CommandAllocator(device)
    x, a, b = tensor(device, -np.ones((2, 16))), empty(device, (2, 16)), empty(device, (2, 16))
    first, second = queue.make_command_buffer(allocator), queue.make_command_buffer(allocator)
    enc = first.make_compute_command_encoder()
    enc.encode(mk.CNNNeuronAbsolute(device), x, a)
    enc.end_encoding()
    enc = second.make_compute_command_encoder()
    enc.encode(mk.CNNNeuronLinear(device, 2.0, 1.0), a, b)
    enc.end_encoding()
    queue.commit([first, second])
    second.wait_until_completed()
    np.testing.assert_array_equal(b.to_numpy(), 3.0)
    with pytest.raises(mk.ValidationError, match="not made by this queue"):
        queue.commit([device.make_command_queue().make_command_buffer()])


def test_reshape_of_an_intermediate_is_a_view(device):
    """A reshape between two intermediates shares its input's heap slot (no copy, no bytes);
    the slot lives until the view's last reader."""
    net = ml.Network("views")
    x = net.input("x", (2, 3, 4))
    h = net.neuron(x, mk.CNNNeuronType.RELU)
    r = net.reshape(h, (6, 4))
    t = net.neuron(x, mk.CNNNeuronType.ABSOLUTE)   # live while r is: must not share h's slot
    net.output(net.add(net.neuron(r, mk.CNNNeuronType.SIGMOID), net.reshape(t, (6, 4))), "y")
    state = pipeline(device, net)
    # h and t (96 bytes each, placed at 64-byte multiples); the sigmoid writes over h's slot
    # (in place: nothing reads r after it); no reshape copies
    assert state.memory_stats["requested_bytes"] == 2 * 128
    assert state._views[net.nodes[3].outputs[0]] is h
    xv = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    y = ml.Session(net, device=device).run({"x": xv})["y"]
    want = 1 / (1 + np.exp(-np.maximum(xv, 0).reshape(6, 4))) + np.abs(xv).reshape(6, 4)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-6)


def test_shape_errors_at_compile_name_the_node(device):
    """A free dimension fixed to a size the network cannot take: the error names the node."""
    net = ml.Network("free")
    x = net.input("x", (-1, 6))
    net.output(net.reshape(x, (4, -1), name="to_rows"), "y")
    with pytest.raises(mk.ValidationError, match=r"node 'to_rows' \(reshape\) of network 'free': reshape: \(3, 6\)"):
        pipeline(device, net, i0=(3, 6))


@pytest.mark.parametrize("neuron", [None, (mk.CNNNeuronType.RELUN, 0.0, 0.5), (mk.CNNNeuronType.SIGMOID, 0.0, 0.0)])
@pytest.mark.parametrize("shape", [(1, 37), (1, 1, 37), (5, 37)])
def test_gemm_rows(device, shape, neuron):
    """gemm: one row runs on mk_sgemm (clamps fused), more rows or other neurons on the 1x1
    convolution; both against NumPy."""
    rng = np.random.default_rng(len(shape) + shape[0])
    w, b = rng.standard_normal((19, 37)).astype(np.float32), rng.standard_normal(19).astype(np.float32)
    d = None if neuron is None else mk.NNNeuronDescriptor(*neuron)
    net = ml.Network("g")
    net.output(net.gemm(net.input("x", shape), w, b, d), "y")
    x = rng.standard_normal(shape).astype(np.float32)
    y = ml.Session(net, device=device).run({"x": x})["y"]
    want = x.astype(np.float64) @ w.T + b
    if neuron is not None:
        want = np.clip(want, 0, 0.5) if neuron[0] == mk.CNNNeuronType.RELUN else 1 / (1 + np.exp(-want))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ---- replay: a pipeline's commands recorded once, re-pointed at later bindings -----------------

def replay_network(rng):
    """Nodes reading and writing bound tensors directly: a convolution and a residual add on
    the input, a one-row gemm (mk_sgemm) into an output, a run-time matmul of a second input,
    a layer norm (staged through the heap when a bound operand is not packed)."""
    net = ml.Network("replay")
    x, m = net.input("x", (2, 6, 5, 4)), net.input("m", (3, 16))
    y = net.add(net.conv2d(x, rng.standard_normal((4, 3, 3, 4)), pads=(1, 1, 1, 1)), x, name="y")
    g = net.reshape(net.pool2d(y, "average"), (2, 4))
    net.output(y)
    net.output(net.gemm(net.reshape(g, (1, 8)), rng.standard_normal((5, 8))), "z")
    net.output(net.matmul(m, m, transpose_b=True), "p")
    net.output(net.layer_norm(m, rng.standard_normal(16), rng.standard_normal(16)), "ln")
    return net


def test_dispatches_replay_the_recorded_commands(device):
    """A pipeline's later dispatches add the commands its first one recorded (no node encoded
    again), re-pointed when the bound tensors or the heap move; the results are bitwise those
    of a fresh pipeline. A buffer still holding the commands, or bound tensors of other
    strides, make the dispatch record afresh."""
    rng = np.random.default_rng(7)
    net = replay_network(rng)
    state = pipeline(device, net)
    shapes = [b.dimensions.shape for b in state.reflection.bindings]
    queue = device.make_command_queue()

    def inputs(seed, padded=False):
        r = np.random.default_rng(seed)
        x = r.standard_normal(shapes[0]).astype(np.float32)
        m = r.standard_normal((3, 32 if padded else 16)).astype(np.float32)
        return [tensor(device, x), tensor(device, m[:, :16])]

    def encode(ins, heap, st=state):
        outs = [empty(device, s) for s in shapes[2:]]
        cb = queue.make_command_buffer()
        enc = cb.make_machine_learning_command_encoder()
        enc.set_pipeline_state(st)
        enc.set_argument_table(table(device, *ins, *outs))
        enc.dispatch_network(heap)
        enc.end_encoding()
        return cb, outs

    def finish(cb, outs):
        cb.commit()
        cb.wait_until_completed()
        assert cb.error is None
        return [o.to_numpy() for o in outs]

    def fresh(ins):   # a new pipeline: records its commands
        st = pipeline(device, net)
        return finish(*encode(ins, heap_for(device, st), st))

    heap, other_heap = heap_for(device, state), heap_for(device, state)
    first, outs = encode(inputs(0), heap)
    commands = list(first._commands)
    finish(first, outs)
    runs = [(inputs(1), heap, True), (inputs(2), other_heap, True), (inputs(3, padded=True), heap, False),
            (inputs(4, padded=True), heap, True), (inputs(5), other_heap, False)]
    for ins, h, replay in runs:
        cb, outs = encode(ins, h)
        same = [a is b for a, b in zip(cb._commands, commands)]
        assert (same == [True] * len(commands) == [True] * len(cb._commands)) if replay else not any(same)
        commands = list(cb._commands)
        got, want = finish(cb, outs), fresh(ins)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    # two buffers in flight: the second records its own commands; both right
    ins_a, ins_b = inputs(6), inputs(7)
    cb_a, outs_a = encode(ins_a, heap)
    cb_b, outs_b = encode(ins_b, other_heap)
    assert not set(map(id, cb_a._commands)) & set(map(id, cb_b._commands))
    for (cb, outs), ins in (((cb_a, outs_a), ins_a), ((cb_b, outs_b), ins_b)):
        for g, w in zip(finish(cb, outs), fresh(ins)):
            np.testing.assert_array_equal(g, w)
    # against NumPy, so that the fresh pipeline is not its own only reference
    xv, mv = (t.to_numpy().astype(np.float64) for t in ins_b)
    y, z, p, _ = finish(*encode(ins_b, heap))
    weights = {n.kind: n.attrs["weights"].astype(np.float64) for n in net.nodes if "weights" in n.attrs}
    np.testing.assert_allclose(y, conv_reference(xv, weights["conv2d"], None, (1, 1), (1, 1), (1, 1, 1, 1), 1) + xv,
                               rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(z, y.mean(axis=(1, 2)).reshape(1, 8) @ weights["gemm"].T, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(p, mv @ mv.T, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 3, 40, 64), (2, 3, 33, 32), (3, 2, 32, 96), (1, 5, 64, 32),
                                   (2, 3, 10, 32), (2, 3, 33, 37)])
def test_nchw_to_nhwc_interleaves_planes(isa, device, device1, shape, dtype):
    """The input transpose of an image model (NCHW -> NHWC into a packed intermediate): few
    planes of 1024+ pixels are interleaved in tiles (three 4-byte planes by the ISA's vector
    interleave); exact, at 1 and 2 threads, partial tiles and short planes included. Widths
    are multiples of 32 so that the input is bound as it is (rows a multiple of 64 bytes),
    except the last shape (padded rows: the planes' pixels do not merge into one run)."""
    data_type = mk.TensorDataType.FLOAT32 if dtype == np.float32 else mk.TensorDataType.FLOAT16
    net = ml.Network("t")
    x = net.input("x", shape, data_type)
    net.output(net.reshape(net.transpose(x, (0, 2, 3, 1)), (shape[0], -1)), "y")
    xv = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    want = xv.transpose(0, 2, 3, 1).reshape(shape[0], -1)
    for d in (device, device1):
        np.testing.assert_array_equal(ml.Session(net, device=d).run({"x": xv})["y"], want)


def test_session_rebinds_inputs_changed_in_place(device):
    """Session.run keeps the tensor of an input array that it shares memory with: the same
    array changed in place, a new array, a reshaped view of the same memory and an array it
    must copy (padded rows: not shared, so not kept) all give fresh results."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 16)).astype(np.float32)
    net = ml.Network("s")
    net.output(net.gemm(net.input("x", (-1, 16)), w), "y")
    session = ml.Session(net, device=device)

    def check(x):
        np.testing.assert_allclose(session.run({"x": x})["y"], x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)

    x = rng.standard_normal((4, 16)).astype(np.float32)
    check(x)
    x[:] = rng.standard_normal((4, 16))
    check(x)
    check(rng.standard_normal((4, 16)).astype(np.float32))
    big = rng.standard_normal((8, 16)).astype(np.float32)
    check(big[:4])
    big[:4] = 0.5
    check(big[:4])
    padded = rng.standard_normal((4, 24)).astype(np.float32)[:, :16]   # 96-byte rows: copied
    check(padded)
    padded[:] = 2.0
    check(padded)


def test_session_reruns_without_encoding(device):
    """After a run that recorded its pass, Session.run runs the recording again on the next
    inputs laid out alike (the same array changed in place, new arrays, a view of other
    memory) without encoding; other layouts, read-only arrays and arrays it must copy take the
    encoding path. Every result is fresh."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((6, 16)).astype(np.float32)
    net = ml.Network("r")
    net.output(net.neuron(net.gemm(net.input("x", (-1, 16)), w), mk.CNNNeuronType.TANH, a=1.0, b=1.0), "y")
    session = ml.Session(net, device=device)
    reruns = []
    rerun = session._rerun
    session._rerun = lambda *args: reruns.append(rerun(*args)) or reruns[-1]

    def check(x, fast):
        y = session.run({"x": x})["y"]
        np.testing.assert_allclose(y, np.tanh(x.astype(np.float64) @ w.T), rtol=1e-5, atol=1e-6)
        assert reruns[-1] == fast, (x.shape, x.strides, x.flags.writeable)

    x = rng.standard_normal((4, 16)).astype(np.float32)
    check(x, False)                      # records
    check(x, True)
    x[:] = rng.standard_normal((4, 16))
    check(x, True)
    check(rng.standard_normal((4, 16)).astype(np.float32), True)
    big = rng.standard_normal((9, 16)).astype(np.float32)
    check(big[5:], True)                 # other memory, the same layout
    frozen = rng.standard_normal((4, 16)).astype(np.float32)
    frozen.flags.writeable = False
    check(frozen, False)                 # bound as a copy
    check(x, True)
    check(rng.standard_normal((7, 16)).astype(np.float32), False)   # another shape: compiles
    check(rng.standard_normal((7, 16)).astype(np.float32), True)
    padded = rng.standard_normal((4, 24)).astype(np.float32)[:, :16]
    check(padded, False)                 # other strides
    check(padded, False)                 # bound as a copy: never rerun
    check(x, True)


def test_elementwise_nodes_write_in_place(device, device1):
    """An elementwise node writes over a source of its shape that nothing reads later (the
    one produced last), never over one read later, one of another shape (broadcast) or a
    binding; results as with every value in its own slot, at 1 and 2 threads."""
    rng = np.random.default_rng(5)
    net = ml.Network("inplace")
    x = net.input("x", (2, 5, 6, 8))
    a = net.neuron(x, mk.CNNNeuronType.ABSOLUTE, name="a")
    b = net.neuron(x, mk.CNNNeuronType.TANH, a=1.0, b=1.0, name="b")
    s = net.add(a, b, clamp=(0.0, 2.0), name="s")                 # over b (produced last)
    row = net.reshape(net.pool2d(s, "average"), (2, 1, 1, 8), name="row")
    m = net.mul(s, row, name="m")                                # over s: row broadcasts
    d = net.sub(m, a, name="d")                                  # a is read again below: over m
    net.output(net.div(d, net.neuron(a, mk.CNNNeuronType.LINEAR, a=1.0, b=1.0, name="a1"), name="y"))
    state = pipeline(device, net)
    views = {v.name: r.name for v, r in state._views.items() if v.producer.kind != "reshape"}
    assert views == {"s": "b", "m": "b", "d": "b", "a1": "a"}
    xv = rng.standard_normal((2, 5, 6, 8)).astype(np.float32)
    av = np.abs(xv.astype(np.float64))
    sv = np.clip(av + np.tanh(xv), 0, 2)
    want = (sv * sv.mean(axis=(1, 2), keepdims=True) - av) / (av + 1)
    results = [ml.Session(net, device=d).run({"x": xv})["y"] for d in (device, device1)]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], want, rtol=RTOL, atol=1e-6)
