"""The kernel families the reliability tests cover: one registry, so a new family joins the
determinism, ISA and fuzz tests by adding entries here.

EXAMPLES: family -> examples(rng) -> [Example]. An Example has input arrays, loaded as Images
  (or by its `load`: Matrix.from_numpy, a Tensor, the array itself for mpskernels.ops),
  kernels(device) -> the kernels (or pipeline state) it uses, made once per device and shared
  by every run on it, and encode(device, cb, inputs, kernels) -> the output (an array or
  anything with to_numpy); run_example runs one. The determinism, ISA, concurrency and soak
  tests run every example (tests/test_determinism.py, test_concurrency.py, test_soak.py); they
  compare runs with each other, so no reference is needed (each family's own tests have one).
FUZZ_KERNELS: what the API fuzzer (tests/test_fuzz.py) draws. A PointwiseKernel has random
  valid parameters, a kernel factory and a float64 reference of the per-element function; the
  fuzzer does the geometry (offsets, clip rects, edge modes, channel offsets, broadcasting
  strides) and checks values. A WholeKernel (convolution, reductions) is drawn with random,
  possibly invalid parameters and says which calls must raise, what the image-returning
  encode makes and the float64 reference of the whole call; the fuzzer checks values too.
"""
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import mpskernels as mk
import reference as ref

T = mk.CNNNeuronType
FMT = mk.ImageFeatureChannelFormat


@dataclass
class Example:
    name: str
    inputs: list                      # arrays (float32, but a Vector of offsets)
    encode: Callable                  # encode(device, cb, inputs, kernels) -> the output
    kernels: Callable = lambda device: None   # what encode uses, made once per device
    rtol: float = 1e-5                # ISA agreement: |a - b| <= rtol * max(1, |b|)
    normwise: bool = False            # ... or rtol * max(1, max |b| over the output)
    load: Callable = mk.Image.from_numpy   # load(device, array) -> an input; or one per input


def run_example(device, example, kernels=None, queue=None):
    """Load the inputs, encode on a new command buffer, commit, wait: the output as an
    array. kernels: example.kernels(device), to share them between runs (and threads)."""
    loads = example.load if isinstance(example.load, (list, tuple)) else [example.load] * len(example.inputs)
    inputs = [load(device, x) for load, x in zip(loads, example.inputs)]
    if kernels is None:
        kernels = example.kernels(device)
    cb = (queue or device.make_command_queue()).make_command_buffer()
    out = example.encode(device, cb, inputs, kernels)
    cb.commit()
    cb.wait_until_completed()
    assert cb.status == mk.CommandBufferStatus.COMPLETED, cb.error
    return out if isinstance(out, np.ndarray) else out.to_numpy()


def _image(device, shape, fmt=FMT.FLOAT32):
    n, h, w, c = shape
    return mk.Image(device, mk.ImageDescriptor(fmt, w, h, c, n))


# ---- neurons --------------------------------------------------------------------------------

# (type, a, b, c): every neuron type, parameters in each one's interesting range
NEURON_PARAMS = [
    (T.NONE, 0, 0, 0), (T.RELU, 0.1, 0, 0), (T.LINEAR, 1.5, -0.25, 0), (T.SIGMOID, 0, 0, 0),
    (T.HARD_SIGMOID, 0.2, 0.5, 0), (T.TANH, 1.7, 0.66, 0), (T.ABSOLUTE, 0, 0, 0),
    (T.SOFT_PLUS, 1.0, 1.0, 0), (T.SOFT_SIGN, 0, 0, 0), (T.ELU, 1.0, 0, 0), (T.PRELU, 0, 0, 0),
    (T.RELUN, 0.1, 2.0, 0), (T.POWER, 0.5, 2.0, 2.0), (T.EXPONENTIAL, 0.5, 0.0, -1.0),
    (T.LOGARITHM, 0.5, 3.0, -1.0), (T.GELU, 0, 0, 0),
]
assert {p[0] for p in NEURON_PARAMS} == set(T) - {T.COUNT}


def make_neuron(device, neuron_type, a=0.0, b=0.0, c=0.0, slopes=None):
    if neuron_type == T.PRELU:
        descriptor = mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes)
    else:
        descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(neuron_type, a, b, c)
    return mk.CNNNeuron(device, descriptor)


def _into(shape, encode):
    """An encode(device, cb, inputs, kernel) that writes kernel's result into a new image."""
    def encode_into(device, cb, images, kernel):
        dst = _image(device, shape)
        encode(kernel, cb, images, dst)
        return dst
    return encode_into


def _neuron_examples(rng):
    shape = (2, 33, 31, 37)            # several chunks of either grain, channels not 16k
    x = rng.uniform(-4, 4, shape).astype(np.float32)
    slopes = np.linspace(-0.5, 2.0, shape[3]).astype(np.float32)
    return [Example(f"neuron-{t.name.lower()}", [x],
                    _into(shape, lambda k, cb, images, dst: k.encode(cb, images[0], dst)),
                    lambda device, t=t, a=a, b=b, c=c: make_neuron(device, t, a, b, c, slopes))
            for t, a, b, c in NEURON_PARAMS]


# ---- arithmetic -----------------------------------------------------------------------------

ARITHMETIC = {"add": mk.CNNAdd, "subtract": mk.CNNSubtract, "multiply": mk.CNNMultiply,
              "divide": mk.CNNDivide}


def _arithmetic_examples(rng):
    shape = (2, 29, 35, 40)
    x = rng.uniform(-4, 4, shape).astype(np.float32)
    y = rng.uniform(0.5, 4, shape).astype(np.float32) * rng.choice([-1, 1], shape)
    vector = y[:, :1, :1, :]           # a per-channel vector per image, broadcast by strides 0
    out = []
    for name, cls in ARITHMETIC.items():
        for broadcast in (False, True):
            def make(device, cls=cls, broadcast=broadcast):
                kernel = cls(device)
                kernel.primary_scale, kernel.secondary_scale, kernel.bias = 0.5, 1.5, 0.25
                if broadcast:
                    kernel.secondary_stride_in_pixels_x = kernel.secondary_stride_in_pixels_y = 0
                return kernel
            encode = _into(shape, lambda k, cb, images, dst, second=2 if broadcast else 1:
                           k.encode(cb, images[0], images[second], dst))
            out.append(Example(f"{name}{'-broadcast' if broadcast else ''}", [x, y, vector],
                               encode, make))
    return out


def _network_examples(rng):
    """A small network through temporaries: the arena, read counts and aliasing."""
    shape = (1, 40, 36, 24)
    x = rng.uniform(-2, 2, shape).astype(np.float32)

    def make(device):
        return (make_neuron(device, T.RELU, 0.1), make_neuron(device, T.SIGMOID),
                mk.CNNAdd(device), mk.CNNMultiply(device))

    def encode(k, cb, images, dst):
        relu, sigmoid, add, mul = k
        h1 = relu.encode(cb, images[0])
        h1.read_count = 2
        h2 = sigmoid.encode(cb, h1)
        h3 = add.encode(cb, h1, h2)
        mul.encode(cb, h3, images[0], dst)
    return [Example("relu-sigmoid-add-mul", [x], _into(shape, encode), make)]


def _returning_images(kernel):
    """The kernel's image-returning encode makes a persistent Image (so it can be read)."""
    kernel.destination_image_allocator = mk.Image.default_allocator()
    return kernel


class _Weights(mk.CNNConvolutionDataSource):
    """Weights from arrays (the transpose has no from_arrays)."""

    def __init__(self, descriptor, weights, bias=None):
        self.d, self.w, self.b = descriptor, weights, bias

    def data_type(self):
        return mk.DataType.FLOAT32

    def descriptor(self):
        return self.d

    def weights(self):
        return self.w

    def bias_terms(self):
        return self.b


def _encode_returning(device, cb, images, kernel):
    return kernel.encode(cb, images[0])


# the C kernel each convolution example reaches (with AVX-512; the names' stems), so that every
# one of src/conv is covered: tests/test_determinism.py checks
CONVOLUTION_KERNELS = {"conv-3x3": "winograd", "conv-3x3-stride2-dilated": "igemm",
                       "conv-1x1": "igemm", "conv-3x3-im2col": "igemm", "conv-5x3-groups": "dwconv",
                       "conv-depthwise-3x3": "dwconv", "conv-3x3-small-groups": "gconv",
                       "conv-3x3-rgb": "direct", "conv-transpose-3x3-stride2": "igemm",
                       "fully-connected": "igemm"}


def _convolution_examples(rng):
    x = rng.uniform(-1, 1, (2, 19, 23, 37)).astype(np.float32)
    out = []

    def add(name, make, source=x):
        # sums of up to 9*37 products in a different order per ISA, and Winograd's tile
        # transforms: an element's error follows its tile's magnitude, not its own
        out.append(Example(name, [source], _encode_returning, lambda device: _returning_images(make(device)),
                           rtol=2e-5, normwise=True))

    def conv(kw, kh, cout, stride=1, dilation=1, groups=1, depthwise=False, neuron=None, cin=37):
        def make(device):
            cls = mk.CNNDepthWiseConvolutionDescriptor if depthwise else mk.CNNConvolutionDescriptor
            d = cls(kw, kh, cin, cout)
            d.groups = groups
            d.stride_in_pixels_x = d.stride_in_pixels_y = stride
            d.dilation_rate_x = d.dilation_rate_y = dilation
            if neuron is not None:
                d.fused_neuron_descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(neuron, 0.1)
            shape = (cout, kh, kw) if depthwise else (cout, kh, kw, cin // groups)
            w = np.random.default_rng(kw * 100 + cout).standard_normal(shape).astype(np.float32)
            return mk.CNNConvolution.from_arrays(device, d, w, np.linspace(-1, 1, cout).astype(np.float32))
        return make

    add("conv-3x3", conv(3, 3, 70, neuron=T.RELU))
    add("conv-3x3-stride2-dilated", conv(3, 3, 33, stride=2, dilation=2))
    add("conv-1x1", conv(1, 1, 48))
    add("conv-3x3-im2col", conv(3, 3, 40, cin=8), x[..., :8].copy())
    add("conv-5x3-groups", conv(5, 3, 74, groups=37))
    add("conv-depthwise-3x3", conv(3, 3, 37, depthwise=True))
    add("conv-3x3-small-groups", conv(3, 3, 64, groups=8, cin=32, neuron=T.SIGMOID), x[..., :32].copy())
    add("conv-3x3-rgb", conv(3, 3, 24, stride=2, cin=3, neuron=T.RELU), x[..., :3].copy())

    def transpose(device):
        d = mk.CNNConvolutionDescriptor(3, 3, 37, 20)
        d.stride_in_pixels_x = d.stride_in_pixels_y = 2
        w = np.random.default_rng(5).standard_normal((20, 3, 3, 37)).astype(np.float32)
        return mk.CNNConvolutionTranspose(device, _Weights(d, w))
    add("conv-transpose-3x3-stride2", transpose)

    def fully_connected(device):
        d = mk.CNNConvolutionDescriptor(23, 19, 37, 10)
        w = np.random.default_rng(6).standard_normal((10, 19, 23, 37)).astype(np.float32)
        return mk.CNNFullyConnected.from_arrays(device, d, w)
    add("fully-connected", fully_connected)
    assert [e.name for e in out] and {e.name for e in out} == set(CONVOLUTION_KERNELS)
    return out


def _reduction_examples(rng):
    import mpskernels.reduction as reduction
    x = rng.uniform(-4, 4, (2, 21, 35, 40)).astype(np.float32)
    return [Example(name, [x], _encode_returning,
                    lambda device, cls=getattr(reduction, name): _returning_images(cls(device)),
                    rtol=1e-5)   # sums of <= 40 terms of |x| <= 4
            for name in reduction.__all__
            if issubclass(getattr(reduction, name), reduction.NNReduceUnary)
            and getattr(reduction, name)._op is not None]


def _matrix_examples(rng):
    """The five matrix kernels; results of sums of <= 67 products of |x| <= 1, in a different
    order per ISA."""
    a = rng.uniform(-1, 1, (3, 67, 45)).astype(np.float32)
    b = rng.uniform(-1, 1, (3, 45, 71)).astype(np.float32)
    c = rng.uniform(-1, 1, (3, 67, 71)).astype(np.float32)
    v45, v67 = rng.uniform(-1, 1, (3, 45)).astype(np.float32), rng.uniform(-1, 1, (3, 67)).astype(np.float32)
    M, V = mk.Matrix.from_numpy, mk.Vector.from_numpy

    def gemm(device, cb, m, kernel):
        kernel.encode(cb, m[0], m[1], m[2])
        return m[2]

    def gemm_transposed(device, cb, m, kernel):
        kernel.encode(cb, m[0], m[0], m[1])
        return m[1]

    def gemv(device, cb, m, kernel):
        kernel.encode(cb, m[0], m[1], m[2])
        return m[2]

    def matrix_sum(device, cb, m, kernel):
        kernel.encode(cb, m[:3], m[3], scale_vector=m[4], offset_vector=m[5], bias_vector=m[6])
        return m[3]

    def fully_connected(device, cb, m, kernel):
        kernel.encode(cb, m[0], m[1], m[2], m[3])
        return m[3]

    def matrix_neuron(device, cb, m, kernel):
        kernel.encode(cb, m[0], m[1], m[2])
        return m[2]

    def with_neuron(kernel, *neuron):
        kernel.set_neuron_type(*neuron)
        return kernel

    def fc(device):
        kernel = with_neuron(mk.MatrixFullyConnected(device), T.SIGMOID)
        kernel.alpha = 0.75
        return kernel

    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    sources = [rng.uniform(-1, 1, (3, 40, 50)).astype(np.float32) for _ in range(3)]
    offsets = np.array([[0, 0, 2, 3, 4, 1]], np.uint32)   # (row, column) of each source's window
    return [
        Example("matrix-multiplication", [a, b, c], gemm,
                lambda device: mk.MatrixMultiplication(device, 67, 71, 45, alpha=0.5, beta=0.25), load=M),
        Example("matrix-multiplication-transposed", [a, zeros(3, 45, 45)], gemm_transposed,
                lambda device: mk.MatrixMultiplication(device, 45, 45, 67, transpose_left=True), load=M),
        Example("matrix-vector", [a, v45, v67], gemv,
                lambda device: mk.MatrixVectorMultiplication(device, 67, 45, alpha=0.5, beta=-1.0),
                load=[M, V, V]),
        Example("matrix-vector-transposed", [a, v67, v45], gemv,
                lambda device: mk.MatrixVectorMultiplication(device, 45, 67, transpose=True), load=[M, V, V]),
        Example("matrix-sum", sources + [zeros(3, 36, 46), np.float32([[0.5, -1.0, 2.0]]), offsets,
                                         rng.uniform(-1, 1, (1, 46)).astype(np.float32)],
                matrix_sum, lambda device: with_neuron(mk.MatrixSum(device, 3, 36, 46), T.TANH, 1.0, 1.0),
                load=[M, M, M, M, V, V, V]),
        Example("matrix-fully-connected", [a, b[0], c[0, :1], zeros(3, 67, 71)], fully_connected, fc,
                load=[M, M, V, M]),
        Example("matrix-neuron", [c, c[0, :1], zeros(3, 67, 71)], matrix_neuron,
                lambda device: with_neuron(mk.MatrixNeuron(device), T.ELU, 1.0), load=[M, V, M]),
    ]


# ---- mpskernels.ops: pooling, src/nn, GEMM and reductions on NumPy arrays ---------------------

def _ops_examples(rng):
    """One-off calls on arrays (they run at once, on the device's pool; ops keeps its own
    cache of convolution kernels per device). Pooling and src/nn are reached only here and
    through the ML pipeline."""
    from mpskernels import ops
    x = rng.uniform(-2, 2, (2, 17, 21, 24)).astype(np.float32)   # NHWC
    rows = rng.uniform(-3, 3, (37, 3, 67)).astype(np.float32)
    w = rng.standard_normal((40, 24, 3, 3)).astype(np.float32) * 0.2
    wt = rng.standard_normal((24, 12, 3, 3)).astype(np.float32) * 0.2
    lin = rng.standard_normal((50, 67)).astype(np.float32) * 0.1
    gamma, beta = rng.uniform(0.5, 1.5, 67).astype(np.float32), rng.uniform(-1, 1, 67).astype(np.float32)
    nchw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731 - a view: ops copies it in

    def example(name, f, inputs, rtol=1e-5, normwise=False):
        out.append(Example(f"ops-{name}", inputs, lambda device, cb, arrays, k: f(*arrays, device=device),
                           rtol=rtol, normwise=normwise, load=lambda device, a: a))
    out = []
    example("max-pool-3x3-stride2", lambda a, device: ops.max_pool2d(a, 3, 2, 1, ceil_mode=True, layout="NHWC",
                                                                     device=device), [x])
    example("avg-pool-2x2-nchw", lambda a, device: ops.avg_pool2d(nchw(a), 2, 2, 1, ceil_mode=True, device=device),
            [x])
    example("avg-pool-3x3-exclude-pad", lambda a, device: ops.avg_pool2d(a, 3, 1, 1, count_include_pad=False,
                                                                         layout="NHWC", device=device), [x])
    example("softmax", lambda a, device: ops.softmax(a, -1, device=device), [rows])
    example("softmax-axis0", lambda a, device: ops.softmax(a, 0, device=device), [rows])
    example("layer-norm", lambda a, device: ops.layer_norm(a, (67,), gamma, beta, device=device), [rows],
            rtol=2e-5)   # mean and variance of 67 terms, then a division
    example("erf", lambda a, device: ops.erf(a, device=device), [rows])
    example("hardswish", lambda a, device: ops.hardswish(a, device=device), [rows])
    example("gelu-tanh", lambda a, device: ops.gelu(a, approximate="tanh", device=device), [rows])
    example("conv2d-nchw", lambda a, device: ops.conv2d(nchw(a), w, None, 1, 1, activation="relu", device=device),
            [x], rtol=2e-5, normwise=True)
    example("conv-transpose2d", lambda a, device: ops.conv_transpose2d(a, wt, None, 2, 1, 1, layout="NHWC",
                                                                       device=device), [x], rtol=2e-5, normwise=True)
    example("linear", lambda a, device: ops.linear(a, lin, gamma[:50], activation="relu", device=device), [rows],
            rtol=2e-5, normwise=True)
    example("matmul-transposed", lambda a, device: ops.matmul(a, a.transpose(0, 2, 1), device=device), [rows],
            rtol=2e-5, normwise=True)
    example("sum-axes", lambda a, device: ops.sum(a, (0, 2), device=device), [rows], rtol=1e-5, normwise=True)
    example("mean", lambda a, device: ops.mean(a, device=device)[None], [rows], rtol=1e-5, normwise=True)
    example("amax-axis1", lambda a, device: ops.amax(a, 1, device=device), [x])
    example("argmin-axis0", lambda a, device: ops.argmin(a, 0, device=device), [rows])
    return out


# ---- the ML pipeline: networks through make_machine_learning_command_encoder ------------------

ML_USAGE = mk.TensorUsage.COMPUTE | mk.TensorUsage.MACHINE_LEARNING


def _tensor(device, array):
    return mk.Tensor.from_numpy(device, np.ascontiguousarray(array), usage=ML_USAGE)


def _pipeline(net, *input_shapes):
    """kernels(device): the network compiled for these input shapes (a pipeline state)."""
    from mpskernels import ml

    def compile_(device):
        d = ml.MachineLearningPipelineDescriptor(ml.LibraryFunctionDescriptor(net.name, ml.Library(device, net)))
        for i, shape in enumerate(input_shapes):
            d.set_input_dimensions(mk.TensorExtents.from_shape(shape), i)
        return device.make_compiler().make_machine_learning_pipeline_state(d)
    return compile_


def _dispatch(device, cb, inputs, state):
    """Bind the inputs and one new output tensor per output binding; dispatch the network."""
    from mpskernels import ml
    bindings = state.reflection.bindings
    outputs = [device.make_tensor(mk.TensorDescriptor(b.dimensions, usage=ML_USAGE))
               for b in bindings[len(inputs):]]
    table = device.make_argument_table(ml.ArgumentTableDescriptor(max_buffer_bind_count=len(bindings)))
    for i, t in enumerate(inputs + outputs):
        table.set_tensor(t, i)
    enc = cb.make_machine_learning_command_encoder()
    enc.set_pipeline_state(state)
    enc.set_argument_table(table)
    enc.dispatch_network(device.make_heap(mk.HeapDescriptor(size=max(state.intermediates_heap_size, 64))))
    enc.end_encoding()
    return _Outputs(outputs)


class _Outputs:
    """The network's outputs as one array (flattened, joined)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def to_numpy(self):
        return np.concatenate([t.to_numpy().reshape(-1) for t in self.tensors])


def _pipeline_examples(rng):
    """Two small networks over every op of the IR: a CNN (conv, pooling, transpose
    convolution, resize, gemm) and a transformer-like block (layer norm, matmul, softmax,
    gather, reduce, unary functions)."""
    from mpskernels import ml
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    cnn = ml.Network("cnn")
    x = cnn.input("x", (-1, 19, 23, 8))
    c = cnn.conv2d(x, f(24, 3, 3, 8) * 0.3, f(24), pads=(1, 1, 1, 1),
                   neuron=mk.NNNeuronDescriptor(mk.CNNNeuronType.RELU))
    p = cnn.pool2d(c, "max", (3, 3), (2, 2), pads=(1, 1, 1, 1))                  # 10 x 12
    a = cnn.pool2d(c, "average", (2, 2), (2, 2), ceil_mode=True)               # 10 x 12
    s = cnn.neuron(cnn.add(p, a), mk.CNNNeuronType.TANH, 1.0, 1.0)
    u = cnn.conv_transpose2d(s, f(12, 2, 2, 24) * 0.2, f(12), strides=(2, 2))  # 20 x 24
    ys, xs = np.linspace(0, 9, 15), np.linspace(0, 11, 17)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    r = cnn.resize_linear(s, y0, np.minimum(y0 + 1, 9), ys - y0, x0, np.minimum(x0 + 1, 11), xs - x0)
    cnn.output(u, "up")
    cnn.output(r, "resized")
    g = cnn.gemm(cnn.reshape(cnn.pool2d(s, "average"), (-1, 24)), f(30, 24), f(30),
                 mk.NNNeuronDescriptor(mk.CNNNeuronType.SIGMOID))
    cnn.output(cnn.concat(g, cnn.softmax(g), axis=1), "head")

    tr = ml.Network("block")
    t = tr.input("t", (-1, 24, 40))
    n = tr.layer_norm(t, f(40), f(40))
    q = tr.matmul(n, tr.constant(f(40, 48) * 0.2), alpha=0.5)
    attention = tr.softmax(tr.matmul(q, q, transpose_b=True, alpha=0.1))
    h = tr.unary(tr.matmul(attention, q), "gelu_tanh")
    e = tr.unary(tr.sub(h, tr.constant(0.25)), "erf")
    tr.output(tr.gather(tr.mul(e, tr.unary(h, "hard_swish")), [None, list(range(23, -1, -3)) + [-1], None],
                        value=0.5), "gathered")
    tr.output(tr.reduce(h, "mean", (1,)), "pooled")
    # sums of up to 216 products of values near 1, in a different order per ISA
    return [Example("pipeline-cnn", [rng.uniform(-1, 1, (2, 19, 23, 8)).astype(np.float32)], _dispatch,
                    _pipeline(cnn, (2, 19, 23, 8)), rtol=2e-5, normwise=True, load=_tensor),
            Example("pipeline-block", [rng.uniform(-1, 1, (3, 24, 40)).astype(np.float32)], _dispatch,
                    _pipeline(tr, (3, 24, 40)), rtol=2e-5, normwise=True, load=_tensor)]


def examples(family=None):
    """The family's examples (every family's if None), each family's from its own fixed seed."""
    families = sorted(EXAMPLES) if family is None else [family]
    return [e for f in families for e in EXAMPLES[f](np.random.default_rng(zlib.crc32(f.encode())))]


EXAMPLES = {"neuron": _neuron_examples, "arithmetic": _arithmetic_examples,
            "network": _network_examples, "convolution": _convolution_examples,
            "reduction": _reduction_examples, "matrix": _matrix_examples, "ops": _ops_examples,
            "pipeline": _pipeline_examples}


# ---- fuzzing: pointwise kernels -------------------------------------------------------------

@dataclass
class PointwiseKernel:
    """A pointwise kernel the fuzzer can draw. draw(data) -> params (valid, well conditioned
    for inputs of moderate size); make(device, params) -> kernel with those set;
    f(params, values, channels) -> float64 result (values: one array per source)."""
    name: str
    arity: int
    draw: Callable
    make: Callable
    f: Callable
    invalid: list = field(default_factory=list)   # {property: bad value}: each must raise


def _f32(st, lo, hi):
    """A float32 parameter, 0 or at least 2**-20 in magnitude: the kernels flush denormal
    intermediates to zero (FTZ/DAZ), so scale * x must not underflow (x / (tiny * y) would be
    0/0 = NaN instead of the reference's inf)."""
    return st.floats(lo, hi, width=32).map(lambda v: v if abs(v) >= 2.0 ** -20 else 0.0)


def _draw_neuron(data):
    from hypothesis import strategies as st
    t = data.draw(st.sampled_from([p[0] for p in NEURON_PARAMS]))
    a, b, c = (data.draw(_f32(st, -2, 2)) for _ in range(3))
    if t in (T.LINEAR, T.HARD_SIGMOID, T.POWER, T.LOGARITHM):
        a = data.draw(st.sampled_from([-1, 1])) * data.draw(_f32(st, 0.25, 2))
    if t == T.POWER:
        c = data.draw(st.sampled_from([1.0, 2.0, 3.0]))          # integer powers: no NaN
    if t == T.EXPONENTIAL:
        a, c = data.draw(_f32(st, -1, 1)), data.draw(st.sampled_from([-1.0, 2.0, 0.5]))
    if t == T.LOGARITHM:
        c = data.draw(st.sampled_from([-1.0, 2.0, 10.0]))
    slopes = None
    if t == T.PRELU:                   # one shared slope, or one per channel (images have < 64)
        size = data.draw(st.sampled_from([1, 64]))
        slopes = np.asarray(data.draw(st.lists(_f32(st, -2, 2), min_size=size, max_size=size)),
                            dtype=np.float32)
    return {"type": t, "a": a, "b": b, "c": c, "slopes": slopes}


def _neuron_f(p, values, channels):
    return ref.neuron(p["type"], values[0], p["a"], p["b"], p["c"], p["slopes"], channels)


def _draw_arithmetic(data):
    from hypothesis import strategies as st
    p = {"op": data.draw(st.sampled_from(list(ARITHMETIC))),
         "primary_scale": data.draw(_f32(st, -2, 2)), "secondary_scale": data.draw(_f32(st, -2, 2)),
         "bias": data.draw(_f32(st, -1, 1)), "minimum_value": float("-inf"),
         "maximum_value": float("inf")}
    if data.draw(st.booleans()):
        lo, hi = sorted((data.draw(_f32(st, -3, 3)), data.draw(_f32(st, -3, 3))))
        p["minimum_value"], p["maximum_value"] = lo, hi
    return p


def _make_arithmetic(device, p):
    kernel = ARITHMETIC[p["op"]](device)
    for name in ("primary_scale", "secondary_scale", "bias", "minimum_value", "maximum_value"):
        setattr(kernel, name, p[name])
    return kernel


def _arithmetic_f(p, values, channels):
    return ref.arithmetic(list(ARITHMETIC).index(p["op"]), values[0], values[1],
                          p["primary_scale"], p["secondary_scale"], p["bias"],
                          p["minimum_value"], p["maximum_value"])


FUZZ_KERNELS = [
    PointwiseKernel("neuron", 1, _draw_neuron,
                    lambda device, p: make_neuron(device, p["type"], p["a"], p["b"], p["c"],
                                                  p["slopes"]),
                    _neuron_f,
                    invalid=[{"edge_mode": 2}, {"source_feature_channel_max_count": 0},
                             {"source_feature_channel_offset": -1},
                             {"source_feature_channel_offset": 1.5},
                             {"destination_feature_channel_offset": -1}]),
    PointwiseKernel("arithmetic", 2, _draw_arithmetic, _make_arithmetic, _arithmetic_f,
                    invalid=[{"primary_edge_mode": 3}, {"secondary_stride_in_pixels_x": -1},
                             {"primary_stride_in_feature_channels": 2},
                             {"secondary_source_feature_channel_max_count": 0},
                             {"bias": float("nan")}, {"minimum_value": 2.0, "maximum_value": 1.0},
                             {"primary_source_feature_channel_offset": True}]),
]


@dataclass
class WholeKernel:
    """A kernel the fuzzer checks against a float64 reference of the whole call (convolution,
    reductions). The fuzzer sets offset, channel offsets and edge mode on the kernel; these
    read them back.
    draw(data, source image) -> params, valid or not;
    invalid(params) -> why make must raise, or None; make(device, params) -> the kernel;
    rules(kernel, params, source, destination or None) -> [why encode must raise];
    result(kernel, params, source) -> (shape, format, offset or None): the destination of the
      image-returning encode, and the offset encode must set;
    reference(kernel, params, (val, err, unk) of the source, destination shape) ->
      (index into the destination, value, error bound, unknown mask) before storage."""
    name: str
    draw: Callable
    invalid: Callable
    make: Callable
    rules: Callable
    result: Callable
    reference: Callable


_U = 2.0 ** -24     # fp32 unit roundoff


def _draw_convolution(data, source):
    from hypothesis import strategies as st
    channels = source.feature_channels
    kind = data.draw(st.sampled_from(["plain", "plain", "depthwise", "transpose"]))
    cin = channels if data.draw(st.integers(0, 5)) else data.draw(st.integers(1, 40))
    cout = cin if kind == "depthwise" and data.draw(st.booleans()) else data.draw(st.integers(1, 20))
    if kind == "depthwise" and data.draw(st.booleans()):
        cout = cin * data.draw(st.integers(1, 3))
    if data.draw(st.integers(0, 3)) == 0:    # Winograd's shape: 3x3, stride 1, >= 16 channels
        return {"kind": "plain", "kw": 3, "kh": 3, "cin": cin, "cout": data.draw(st.integers(16, 20)),
                "groups": 1, "stride": 1, "dilation": 1, "bias": True, "relu": data.draw(st.booleans()),
                "seed": data.draw(st.integers(0, 99))}
    groups = data.draw(st.sampled_from([1, 1, 1, 2, cin]))
    return {"kind": kind, "kw": data.draw(st.integers(1, 4)), "kh": data.draw(st.integers(1, 4)),
            "cin": cin, "cout": cout, "groups": groups, "stride": data.draw(st.integers(1, 3)),
            "dilation": data.draw(st.integers(1, 2)), "bias": data.draw(st.booleans()),
            "relu": data.draw(st.booleans()), "seed": data.draw(st.integers(0, 99))}


def _convolution_invalid(p):
    if p["kind"] == "depthwise":
        return "depthwise: cout not a multiple of cin" if p["cout"] % p["cin"] else None
    if p["cin"] % p["groups"] or p["cout"] % p["groups"]:
        return "groups do not divide cin and cout"
    return None


def _convolution_arrays(p):
    """(weights [out][kh][kw][in/groups] (depthwise [out][kh][kw]), bias or None)."""
    depthwise = p["kind"] == "depthwise"
    shape = (p["cout"], p["kh"], p["kw"]) if depthwise else \
        (p["cout"], p["kh"], p["kw"], max(1, p["cin"] // max(1, p["groups"])))
    rng = np.random.default_rng(p["seed"])
    w = rng.standard_normal(shape).astype(np.float32)
    return w, rng.standard_normal(p["cout"]).astype(np.float32) if p["bias"] else None


def _make_convolution(device, p):
    depthwise = p["kind"] == "depthwise"
    cls = mk.CNNDepthWiseConvolutionDescriptor if depthwise else mk.CNNConvolutionDescriptor
    d = cls(p["kw"], p["kh"], p["cin"], p["cout"])
    if not depthwise:
        d.groups = p["groups"]
    d.stride_in_pixels_x = d.stride_in_pixels_y = p["stride"]
    d.dilation_rate_x = d.dilation_rate_y = p["dilation"]
    if p["relu"]:
        d.fused_neuron_descriptor = mk.NNNeuronDescriptor.cnn_neuron_descriptor(T.RELU)
    w, b = _convolution_arrays(p)
    if p["kind"] == "transpose":
        return mk.CNNConvolutionTranspose(device, _Weights(d, w, b))
    return mk.CNNConvolution.from_arrays(device, d, w, b)


def _convolution_rules(kernel, p, source, destination):
    c0 = kernel.source_feature_channel_offset
    if c0 >= source.feature_channels:
        return ["source_feature_channel_offset outside the source"]
    reasons = []
    if source.feature_channels - c0 != p["cin"]:
        reasons.append("the source's channels are not input_feature_channels")
    depth = source.number_of_images
    if destination is not None:
        depth = destination.number_of_images
        if kernel.destination_feature_channel_offset + p["cout"] > destination.feature_channels:
            reasons.append("destination has too few channels")
    if kernel.offset.z + depth > source.number_of_images:
        reasons.append("a source has too few images for offset.z + depth")
    return reasons


def _convolution_result(kernel, p, source):
    """MPS's default padding (same size, centred, the odd pixel top-left, §4.4): a
    destination of ceil(n / stride) pixels whose window centres start at offset k//2 - left;
    a transposed convolution (backwards) gives (n - 1) * stride + 1 pixels from offset 0."""
    size, offset = [], []
    for n, k in ((source.width, p["kw"]), (source.height, p["kh"])):
        k = (k - 1) * p["dilation"] + 1
        s = p["stride"]
        if p["kind"] == "transpose":
            size.append((n - 1) * s + 1)
            offset.append(0)
        else:
            dest = -(-n // s)
            size.append(dest)
            offset.append(k // 2 - ((dest - 1) * s + k - n + 1) // 2)
    fmt = FMT.FLOAT16 if source.feature_channel_format == FMT.FLOAT16 else FMT.FLOAT32
    return (source.number_of_images, size[1], size[0], p["cout"]), fmt, tuple(offset)


def _convolution_reference(kernel, p, x, shape):
    """conv_reference.correlate on the model (unknown and non-finite inputs as 0, their taps
    marking the output unknown). Bound: twice the inputs' errors through |w|, plus 2e-5 of the
    sum of |w x| + |bias| (fp32 sums of <= 640 products in any order), plus, for Winograd's
    shape, 2e-5 of the largest such sum in the output plane (its error follows its tile)."""
    import conv_reference as cref
    n, h, wd, _ = shape
    oz, c0 = kernel.offset.z, kernel.source_feature_channel_offset
    part = (slice(oz, oz + n), slice(None), slice(None), slice(c0, c0 + p["cin"]))
    val, err, unk = (a[part] for a in x)
    unk = unk | ~np.isfinite(val)
    val = np.where(unk, 0.0, val)
    w, b = _convolution_arrays(p)
    depthwise = p["kind"] == "depthwise"
    w = (w[..., None] if depthwise else w).astype(np.float64)
    groups = p["cin"] if depthwise else p["groups"]
    s, d, ox, oy = p["stride"], p["dilation"], kernel.offset.x, kernel.offset.y
    if p["kind"] == "transpose":
        geometry = dict(first=(ox * s, oy * s), stride=(1, 1), up=(s, s))
    else:
        kwd, khd = (p["kw"] - 1) * d + 1, (p["kh"] - 1) * d + 1
        geometry = dict(first=(ox - (kwd >> 1), oy - (khd >> 1)), stride=(s, s), up=(1, 1))

    def correlate(src, weights, bias):
        return cref.correlate(src, weights, bias, groups, count=(wd, h), dilation=(d, d),
                              edge=int(kernel.edge_mode), **geometry)
    y = correlate(val, w, b)
    size = correlate(np.abs(val), np.abs(w), None if b is None else np.abs(b))
    bound = 2 * correlate(err, np.abs(w), None) + 2e-5 * size
    unknown = correlate(unk.astype(np.float64), np.ones_like(w), None) > 0
    if (p["kind"], p["kw"], p["kh"], s, d, groups) == ("plain", 3, 3, 1, 1, 1):
        bound += 2e-5 * size.max(axis=(1, 2), keepdims=True)
        # Winograd's tile transforms spread a non-finite input over its whole tile (NaN, 0
        # after ReLU), past its taps: such an input makes its image's outputs unknown
        unknown |= unk.any(axis=(1, 2, 3))[:, None, None, None]
    if p["relu"]:
        y = np.maximum(y, 0.0)
    dc0 = kernel.destination_feature_channel_offset
    return (slice(0, n), slice(None), slice(None), slice(dc0, dc0 + p["cout"])), y, bound, unknown


# reductions: class name -> (op, axis of (N, H, W, C) reduced)
_REDUCE_OPS = [("ArgumentMin", "argmin"), ("ArgumentMax", "argmax"), ("Min", "min"), ("Max", "max"),
               ("Mean", "mean"), ("Sum", "sum")]
_REDUCE_AXES = [("Row", 2), ("Column", 1), ("FeatureChannels", 3)]


def _reduction(name):
    op = next(o for suffix, o in _REDUCE_OPS if name.endswith(suffix))
    axis = next(a for word, a in _REDUCE_AXES if word in name)
    return op, axis


def _draw_reduction(data, source):
    from hypothesis import strategies as st
    import mpskernels.reduction as reduction
    names = [n for n in reduction.__all__ if issubclass(getattr(reduction, n), reduction.NNReduceUnary)
             and getattr(reduction, n)._op is not None]
    clip = None
    if data.draw(st.booleans()):
        x, y = data.draw(st.integers(0, source.width)), data.draw(st.integers(0, source.height))
        clip = ((x, y, data.draw(st.integers(0, source.number_of_images))),
                (data.draw(st.integers(1, source.width + 1)), data.draw(st.integers(1, source.height + 1)),
                 data.draw(st.integers(1, 2))))
    return {"name": data.draw(st.sampled_from(names)), "clip": clip,
            "weight": data.draw(st.sampled_from([1.0, -0.5, 3.0]))}


def _make_reduction(device, p):
    import mpskernels.reduction as reduction
    kernel = getattr(reduction, p["name"])(device)
    if p["clip"] is not None:
        kernel.clip_rect_source = p["clip"]
    if hasattr(kernel, "weight"):
        kernel.weight = p["weight"]
    return kernel


def _reduction_region(p, images, height, width):
    """clip_rect_source ∩ the source: slices (n, h, w), or None if they do not meet."""
    (x, y, z), (w, h, d) = p["clip"] or ((0, 0, 0), (width, height, images))
    w, h, d = min(x + w, width) - x, min(y + h, height) - y, min(z + d, images) - z
    return None if min(w, h, d) <= 0 else (slice(z, z + d), slice(y, y + h), slice(x, x + w))


# largest channel count whose indices a destination format holds exactly (None: none)
_INDEX_LIMIT = {FMT.FLOAT32: 1 << 24, FMT.FLOAT16: 2049, FMT.BFLOAT16: 257}


def _reduction_rules(kernel, p, source, destination):
    c0 = kernel.source_feature_channel_offset
    if c0 >= source.feature_channels:
        return ["source_feature_channel_offset outside the source"]
    reasons = []
    if _reduction_region(p, source.number_of_images, source.height, source.width) is None:
        reasons.append("clip_rect_source does not meet the source")
    op, axis = _reduction(p["name"])
    channels = source.feature_channels - c0
    if destination is not None:
        if kernel.destination_feature_channel_offset + (1 if axis == 3 else channels) > destination.feature_channels:
            reasons.append("destination has too few channels")
        if op in ("argmin", "argmax") and channels > _INDEX_LIMIT.get(destination.feature_channel_format, 0):
            reasons.append("the destination's format cannot hold the channel indices")
    return reasons


def _reduction_result(kernel, p, source):
    region = _reduction_region(p, source.number_of_images, source.height, source.width)
    n, h, w = (s.stop - s.start for s in region)
    op, axis = _reduction(p["name"])
    shape = [n, h, w, source.feature_channels - kernel.source_feature_channel_offset]
    shape[axis] = 1
    fmt = FMT.FLOAT32 if op in ("argmin", "argmax") else source.feature_channel_format
    return tuple(shape), fmt, None


def _reduction_reference(kernel, p, x, shape):
    """The reduction of the source region (float64). Bound: for sums and means (L+2) u times
    the sum of |x| (fp32 accumulation of L terms in any order), plus the inputs' errors
    (summed, averaged; the largest for min and max); argmin / argmax are exact on exact
    inputs (first index on ties) and unknown otherwise. Results are placed at the
    destination's origin (clip_rect is not set), cut to the destination."""
    op, axis = _reduction(p["name"])
    c0 = kernel.source_feature_channel_offset
    region = _reduction_region(p, *x[0].shape[:3]) + (slice(c0, None),)
    val, err, unk = (a[region] for a in x)
    with np.errstate(all="ignore"):
        unk = np.any(unk | ~np.isfinite(val), axis=axis, keepdims=True)
        val = np.where(np.isfinite(val), val, 0.0)
        terms = val.shape[axis]
        if op in ("sum", "mean"):
            weight = ref.f32(p["weight"]) if hasattr(kernel, "weight") else 1.0
            scale = abs(weight) if op == "sum" else 1.0 / terms
            y = val.sum(axis, keepdims=True) * (weight if op == "sum" else scale)
            bound = (scale * np.abs(val).sum(axis, keepdims=True) * (terms + 2) * _U
                     + scale * err.sum(axis, keepdims=True) + ref.FTZ_ATOL)
        elif op in ("min", "max"):
            y = getattr(val, op)(axis, keepdims=True)
            bound = err.max(axis, keepdims=True)
        else:
            y = getattr(np, op)(val, axis=axis, keepdims=True).astype(np.float64)
            bound = np.zeros_like(y)
            unk |= np.any(err > 0, axis=axis, keepdims=True)
    n, h, w, c = (min(a, b) for a, b in zip(y.shape, shape))
    dc0 = kernel.destination_feature_channel_offset
    cut = (slice(0, n), slice(0, h), slice(0, w))
    return cut + (slice(dc0, dc0 + c),), y[cut], bound[cut], unk[cut]


FUZZ_KERNELS += [
    WholeKernel("convolution", _draw_convolution, _convolution_invalid, _make_convolution,
                _convolution_rules, _convolution_result, _convolution_reference),
    WholeKernel("reduction", _draw_reduction, lambda p: None, _make_reduction, _reduction_rules,
                _reduction_result, _reduction_reference),
]
