"""Matrices, vectors and the matrix kernels against float64 references written here.

Tolerance of products (issue 4): |ours - exact| <= 1e-5 * sqrt(k) * (|alpha| |op(A)| |op(B)| +
|beta C|) elementwise, the bound of fp32 accumulation error over k terms scaled by the sizes
involved (so cancellation does not make it meaningless). FLOAT16 storage adds one rounding of
the result to fp16 (relative 2**-11)."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import _native

DT = mk.DataType


def _stored(rng, shape, dtype=np.float32):
    """Random values exactly representable in dtype."""
    return rng.standard_normal(shape).astype(dtype).astype(np.float64)


def _matrix(device, values, dtype=np.float32, pad_columns=0, offset_bytes=0, pad_rows=0):
    """A Matrix over a buffer with padded rows, padded matrices and a leading offset."""
    values = np.asarray(values)
    if values.ndim == 2:
        values = values[None]
    b, r, c = values.shape
    dt = DT.FLOAT32 if dtype == np.float32 else DT.FLOAT16
    esize = np.dtype(dtype).itemsize
    row_bytes = (c + pad_columns) * esize
    desc = mk.MatrixDescriptor(r, c, b, row_bytes, (r + pad_rows) * row_bytes, dt)
    buffer = np.full(offset_bytes + b * desc.matrix_bytes, 0x7f, dtype=np.uint8)
    matrix = mk.Matrix(buffer, desc, offset_bytes)
    matrix._elements()[...] = values.astype(dtype)
    return matrix


def _check_product(ours, exact, bound, k, fp16=False):
    tol = 1e-5 * np.sqrt(k) * bound + 1e-30
    if fp16:
        tol = tol + np.abs(exact) * 2.0 ** -11
    err = np.abs(ours - exact)
    assert np.all(err <= tol), f"max error {err.max()} (bound {tol[np.argmax(err - tol)]})"


def _op(x, transpose):
    return np.swapaxes(x, -1, -2) if transpose else x


SHAPES = [(1, 1, 1), (1, 7, 13), (5, 1, 9), (2, 3, 1), (13, 33, 257), (31, 64, 17),
          (64, 64, 64), (97, 61, 300), (257, 129, 31), (12, 32, 256), (1, 300, 600)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("tl,tr", [(False, False), (True, False), (False, True), (True, True)])
def test_multiplication(device, run, rng, isa, m, n, k, tl, tr):
    a = _stored(rng, (k, m) if tl else (m, k))
    b = _stored(rng, (n, k) if tr else (k, n))
    c = _stored(rng, (m, n))
    alpha, beta = 0.5, -1.25
    A, B = _matrix(device, a, pad_columns=3), _matrix(device, b, offset_bytes=64)
    C = _matrix(device, c, pad_columns=1, offset_bytes=4)
    kernel = mk.MatrixMultiplication(device, m, n, k, tl, tr, alpha, beta)
    run(device, lambda cb: kernel.encode(cb, A, B, C))
    exact = alpha * _op(a, tl) @ _op(b, tr) + beta * c
    bound = abs(alpha) * np.abs(_op(a, tl)) @ np.abs(_op(b, tr)) + abs(beta * c)
    _check_product(C.to_numpy(), exact, bound, k)


@pytest.mark.parametrize("k", [1, 15, 16, 17, 100, 333])
def test_one_column_order(device, run, rng, select_isa, k):
    """One-column products (n = 1) sum in the order gemm.h documents for every ISA: 16 partial
    sums, sum l taking the terms q = l, l + 16, ... in turn, then folded by 8, 4, 2, 1. The
    portable kernel multiplies and adds separately, so float32 NumPy in that order gives the
    same bits; the AVX kernels fuse each multiply-add, so they may differ from it in the last
    bit only (a term rounded once, not twice)."""
    a, x = _stored(rng, (9, k)).astype(np.float32), _stored(rng, (k, 1)).astype(np.float32)
    s = np.zeros((9, 16), np.float32)
    for q in range(k):
        s[:, q % 16] += a[:, q] * x[q, 0]
    for w in (8, 4, 2, 1):
        s[:, :w] += s[:, w:2 * w]
    for isa in ("generic", "avx2", "avx512"):
        select_isa(isa)
        C = _matrix(device, np.zeros((9, 1)))
        kernel = mk.MatrixMultiplication(device, 9, 1, k)
        run(device, lambda cb: kernel.encode(cb, _matrix(device, a), _matrix(device, x), C))
        got = C.to_numpy()[:, 0]
        if isa == "generic":
            np.testing.assert_array_equal(got, s[:, 0])
        else:
            bound = (k // 16 + 5) * np.finfo(np.float32).eps * (np.abs(a) @ np.abs(x[:, 0]))
            assert np.all(np.abs(got - s[:, 0]) <= bound), isa


def test_multiplication_beta_zero_ignores_nan(device, run, rng):
    a, b = _stored(rng, (20, 30)), _stored(rng, (30, 40))
    C = _matrix(device, np.full((20, 40), np.nan))
    kernel = mk.MatrixMultiplication(device, 20, 40, 30)
    run(device, lambda cb: kernel.encode(cb, _matrix(device, a), _matrix(device, b), C))
    _check_product(C.to_numpy(), a @ b, np.abs(a) @ np.abs(b), 30)


def test_multiplication_origins_and_batches(device, run, rng, isa):
    m, n, k = 19, 45, 70
    a = _stored(rng, (5, m + 3, k + 2))
    b = _stored(rng, (5, k + 1, n + 4))
    c = _stored(rng, (6, m + 2, n + 5))
    A, B, C = _matrix(device, a, pad_rows=1), _matrix(device, b), _matrix(device, c)
    kernel = mk.MatrixMultiplication(device, m, n, k, alpha=2.0, beta=0.5)
    kernel.left_matrix_origin = mk.Origin(3, 2, 0)
    kernel.right_matrix_origin = (1, 4, 0)
    kernel.result_matrix_origin = mk.Origin(2, 5, 0)
    kernel.batch_start, kernel.batch_size = 1, 3
    run(device, lambda cb: kernel.encode(cb, A, B, C))
    out = C.to_numpy()
    expected = c.copy()
    sa, sb = a[1:4, 3:3 + m, 2:2 + k], b[1:4, 1:1 + k, 4:4 + n]
    expected[1:4, 2:2 + m, 5:5 + n] = 2.0 * sa @ sb + 0.5 * c[1:4, 2:2 + m, 5:5 + n]
    bound = np.zeros_like(c)
    bound[1:4, 2:2 + m, 5:5 + n] = 2.0 * np.abs(sa) @ np.abs(sb) + np.abs(0.5 * c[1:4, 2:2 + m, 5:5 + n])
    _check_product(out, expected, bound, k)   # everything outside the window is untouched
    np.testing.assert_array_equal(out[[0, 4, 5]], c[[0, 4, 5]].astype(np.float32))


@pytest.mark.parametrize("m,n,k", [(20, 40, 30), (1, 40, 30), (20, 1, 30), (100, 200, 300)])
def test_multiplication_propagates_nan(device, run, rng, isa, m, n, k):
    """A NaN in A makes its row of the result NaN (and nothing else), as in NumPy."""
    a, b = _stored(rng, (m, k)), _stored(rng, (k, n))
    a[m // 2, k // 3] = np.nan
    C = mk.Matrix.with_device(device, mk.MatrixDescriptor(m, n))
    kernel = mk.MatrixMultiplication(device, m, n, k)
    run(device, lambda cb: kernel.encode(cb, _matrix(device, a), _matrix(device, b), C))
    np.testing.assert_array_equal(np.isnan(C.to_numpy()), np.isnan(a @ b))


def test_multiplication_reencoded(device, run, rng):
    """One kernel encoded repeatedly (encode reuses the previous command when nothing it
    depends on changed): new matrices, origins and batch ranges all take effect."""
    a, b = _stored(rng, (3, 10, 12)), _stored(rng, (3, 12, 9))
    A, B = _matrix(device, a), _matrix(device, b)
    Cs = [mk.Matrix.with_device(device, mk.MatrixDescriptor(8, 9, 3)) for _ in range(2)]
    kernel = mk.MatrixMultiplication(device, 8, 9, 12)

    def encode(cb):
        kernel.encode(cb, A, B, Cs[0])
        kernel.encode(cb, A, B, Cs[1])             # the same operands but the result
        kernel.left_matrix_origin = (2, 0, 0)
        kernel.batch_start, kernel.batch_size = 1, 1
        kernel.encode(cb, _matrix(device, a), B, Cs[0])   # equal layout, other storage
    run(device, encode)
    for C, batches, rows in ((Cs[0], [0, 2], slice(0, 8)), (Cs[0], [1], slice(2, 10)),
                             (Cs[1], [0, 1, 2], slice(0, 8))):
        sa, sb = a[batches, rows], b[batches]
        _check_product(C.to_numpy()[batches], sa @ sb, np.abs(sa) @ np.abs(sb), 12)
    with pytest.raises(AttributeError):
        kernel.alpha = 2.0   # fixed at creation, as in MPS


def test_multiplication_default_batch_is_all(device, run, rng):
    a, b = _stored(rng, (4, 8, 9)), _stored(rng, (4, 9, 10))
    C = mk.Matrix.with_device(device, mk.MatrixDescriptor(8, 10, 4))
    kernel = mk.MatrixMultiplication(device, 8, 10, 9)
    run(device, lambda cb: kernel.encode(cb, mk.Matrix.from_numpy(device, a),
                                         mk.Matrix.from_numpy(device, b), C))
    _check_product(C.to_numpy(), a @ b, np.abs(a) @ np.abs(b), 9)


@pytest.mark.parametrize("m,n,k", [(33, 70, 45), (1, 100, 64), (80, 1, 50)])
def test_multiplication_float16(device, run, rng, isa, m, n, k):
    a, b, c = (_stored(rng, s, np.float16) for s in ((k, m), (k, n), (m, n)))
    A, B = _matrix(device, a, np.float16), _matrix(device, b, np.float16, pad_columns=5)
    C = _matrix(device, c, np.float16)
    kernel = mk.MatrixMultiplication(device, m, n, k, transpose_left=True, alpha=1.0, beta=1.0)
    run(device, lambda cb: kernel.encode(cb, A, B, C))
    assert C.to_numpy().dtype == np.float16
    exact = a.T @ b + c
    _check_product(C.to_numpy().astype(np.float64), exact, np.abs(a.T) @ np.abs(b) + np.abs(c),
                   k, fp16=True)


def test_mixed_storage(device, run, rng):
    a, b = _stored(rng, (40, 50), np.float16), _stored(rng, (50, 60))
    C = mk.Matrix.with_device(device, mk.MatrixDescriptor(40, 60))
    kernel = mk.MatrixMultiplication(device, 40, 60, 50)
    run(device, lambda cb: kernel.encode(cb, _matrix(device, a, np.float16),
                                         _matrix(device, b), C))
    _check_product(C.to_numpy(), a @ b, np.abs(a) @ np.abs(b), 50)


# How the SGEMM driver packs B depends on the shape (src/gemm/gemm.c): in place (k*n <= 16384
# or m <= 12), shared (an item's packed B <= 1 MiB: rounds of several batch items) or private
# to each task (larger B; columns split, or rows when m > n; when B serves at most 8 row tiles,
# K blocks of <= 192 and slices of up to 1024 columns). A of whole adjacent rows (k = 320: no
# row padding) with B not private is read in place, K in one block. Each with fp32 and fp16 results
# (an fp16 result is summed in fp32 blocks of <= 1 MiB: 1000 x 600 takes several).
@pytest.mark.parametrize("batch,m,n,k", [(1, 40, 700, 420), (1, 700, 500, 600),
                                         (5, 40, 300, 300), (3, 30, 100, 100),
                                         (1, 1000, 600, 20), (2, 50, 1100, 450),
                                         (2, 100, 70, 320)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_multiplication_packing_paths(device, run, rng, isa, batch, m, n, k, dtype):
    a, b, c = _stored(rng, (batch, m, k)), _stored(rng, (batch, k, n)), _stored(rng, (batch, m, n), dtype)
    C = _matrix(device, c, dtype, pad_columns=2)
    kernel = mk.MatrixMultiplication(device, m, n, k, beta=0.5)
    run(device, lambda cb: kernel.encode(cb, _matrix(device, a), _matrix(device, b), C))
    _check_product(C.to_numpy().astype(np.float64), a @ b + 0.5 * c,
                   np.abs(a) @ np.abs(b) + np.abs(0.5 * c), k, fp16=dtype == np.float16)


@pytest.mark.parametrize("m,n,k,tl,tr", [(300, 200, 600, False, False), (1, 2000, 300, False, False),
                                         (700, 1, 333, False, False), (130, 90, 1000, True, True),
                                         (900, 64, 576, False, False), (40, 700, 420, False, True),
                                         (700, 500, 600, False, False), (60, 1500, 700, False, False)])
def test_threads_bitwise_identical(device, device1, run, rng, m, n, k, tl, tr):
    """The output is cut into at least as many tasks as the pool has threads: the result must
    not depend on the cut."""
    a = _stored(rng, (k, m) if tl else (m, k))
    b = _stored(rng, (n, k) if tr else (k, n))
    outs = []
    for dev in (device1, device, mk.Device(num_threads=3), mk.Device(num_threads=5)):
        C = mk.Matrix.with_device(dev, mk.MatrixDescriptor(m, n))
        kernel = mk.MatrixMultiplication(dev, m, n, k, tl, tr)
        run(dev, lambda cb: kernel.encode(cb, _matrix(dev, a), _matrix(dev, b), C))
        outs.append(C.to_numpy())
    for out in outs[1:]:
        np.testing.assert_array_equal(outs[0].view(np.uint32), out.view(np.uint32))
    _check_product(outs[0], _op(a, tl) @ _op(b, tr), np.abs(_op(a, tl)) @ np.abs(_op(b, tr)), k)


# ---- matrix-vector -------------------------------------------------------------------------

@pytest.mark.parametrize("rows,columns", [(1, 1), (7, 300), (300, 7), (257, 129)])
@pytest.mark.parametrize("transpose", [False, True])
def test_matrix_vector(device, run, rng, isa, rows, columns, transpose):
    a = _stored(rng, (2, columns, rows) if transpose else (2, rows, columns))
    x, y = _stored(rng, (2, columns + 2)), _stored(rng, (2, rows + 1))
    A = _matrix(device, a, pad_columns=2)
    X, Y = mk.Vector.from_numpy(device, x.astype(np.float32)), mk.Vector.from_numpy(device, y.astype(np.float32))
    kernel = mk.MatrixVectorMultiplication(device, rows, columns, transpose, alpha=1.5, beta=-0.5)
    kernel.right_matrix_origin = (2, 0, 0)
    kernel.result_matrix_origin = (1, 0, 0)
    run(device, lambda cb: kernel.encode(cb, A, X, Y))
    op = _op(a, transpose)
    exact = y.copy()
    exact[:, 1:] = 1.5 * np.einsum("bij,bj->bi", op, x[:, 2:]) - 0.5 * y[:, 1:]
    bound = np.zeros_like(y)
    bound[:, 1:] = 1.5 * np.einsum("bij,bj->bi", np.abs(op), np.abs(x[:, 2:])) + np.abs(0.5 * y[:, 1:])
    _check_product(Y.to_numpy(), exact, bound, columns)


# ---- sum, fully connected, neuron ------------------------------------------------------------

@pytest.mark.parametrize("transpose", [False, True])
def test_matrix_sum(device, run, rng, transpose):
    rows, columns = 9, 14
    shape = (2, columns, rows) if transpose else (2, rows, columns)
    srcs = [_stored(rng, shape) for _ in range(3)]
    scales, bias = np.array([0.5, -2.0, 1.25]), _stored(rng, columns)
    out = mk.Matrix.with_device(device, mk.MatrixDescriptor(rows, columns, 2))
    kernel = mk.MatrixSum(device, 3, rows, columns, transpose)
    kernel.set_neuron_type(mk.CNNNeuronType.RELU, 0.1)
    assert kernel.neuron_type() == mk.CNNNeuronType.RELU and kernel.neuron_parameter_a == 0.1
    run(device, lambda cb: kernel.encode(
        cb, [_matrix(device, s) for s in srcs], out,
        scale_vector=mk.Vector.from_numpy(device, scales.astype(np.float32)),
        bias_vector=mk.Vector.from_numpy(device, bias.astype(np.float32))))
    exact = sum(s * _op(m, transpose) for s, m in zip(scales, srcs)) + bias
    exact = np.where(exact >= 0, exact, 0.1 * exact)
    np.testing.assert_allclose(out.to_numpy(), exact, rtol=1e-6, atol=1e-6)


def test_matrix_sum_offsets_and_start_index(device, run, rng):
    a, b = _stored(rng, (3, 6, 7)), _stored(rng, (3, 5, 5))
    out = _matrix(device, np.zeros((3, 4, 4)))
    kernel = mk.MatrixSum(device, 2, 4, 4, False)
    offsets = mk.Vector.from_numpy(device, np.array([2, 3, 1, 0], dtype=np.uint32))
    run(device, lambda cb: kernel.encode(cb, [_matrix(device, a), _matrix(device, b)], out,
                                         offset_vector=offsets, start_index=1))
    got = out.to_numpy()
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_allclose(got[1:], a[1:, 2:6, 3:7] + b[1:, 1:5, 0:4], rtol=1e-6)


@pytest.mark.parametrize("neuron", [(mk.CNNNeuronType.NONE, 0, 0), (mk.CNNNeuronType.RELU, 0, 0),
                                    (mk.CNNNeuronType.RELUN, 0, 0.5),
                                    (mk.CNNNeuronType.SIGMOID, 0, 0)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fully_connected(device, run, rng, isa, neuron, with_bias):
    x, w, bias = _stored(rng, (2, 37, 50)), _stored(rng, (50, 70)), _stored(rng, 70)
    out = mk.Matrix.with_device(device, mk.MatrixDescriptor(37, 70, 2))
    fc = mk.MatrixFullyConnected(device)
    fc.alpha = 0.5
    fc.set_neuron_type(*neuron)
    bv = mk.Vector.from_numpy(device, bias.astype(np.float32)) if with_bias else None
    run(device, lambda cb: fc.encode(cb, _matrix(device, x), _matrix(device, w), bv, out))
    y = 0.5 * x @ w + (bias if with_bias else 0)
    t, a, b = neuron
    y = {mk.CNNNeuronType.NONE: y, mk.CNNNeuronType.RELU: np.maximum(y, 0),
         mk.CNNNeuronType.RELUN: np.minimum(np.maximum(y, 0), b),
         mk.CNNNeuronType.SIGMOID: 1 / (1 + np.exp(-y))}[t]
    np.testing.assert_allclose(out.to_numpy(), y, rtol=1e-5 * np.sqrt(50), atol=1e-4)


def test_fully_connected_batch_shares_packed_weights(device, run, rng):
    x, w, bias = _stored(rng, (3, 30, 200)), _stored(rng, (200, 300)), _stored(rng, 300)
    out = mk.Matrix.with_device(device, mk.MatrixDescriptor(30, 300, 3))
    fc = mk.MatrixFullyConnected(device)
    fc.set_neuron_type(mk.CNNNeuronType.RELU)
    bv = mk.Vector.from_numpy(device, bias.astype(np.float32))
    run(device, lambda cb: fc.encode(cb, _matrix(device, x), _matrix(device, w), bv, out))
    y = x @ w + bias
    _check_product(out.to_numpy(), np.maximum(y, 0), np.abs(x) @ np.abs(w) + np.abs(bias), 200)


def test_fully_connected_feature_vector_counts(device, run, rng):
    x, w = _stored(rng, (10, 20)), _stored(rng, (16, 8))
    out = _matrix(device, np.zeros((6, 8)))
    fc = mk.MatrixFullyConnected(device)
    fc.source_number_of_feature_vectors = 4
    fc.source_input_feature_channels = 16
    fc.source_output_feature_channels = 5
    fc.source_matrix_origin = (3, 2, 0)
    fc.result_matrix_origin = (1, 0, 0)
    run(device, lambda cb: fc.encode(cb, _matrix(device, x), _matrix(device, w), None, out))
    expected = np.zeros((6, 8))
    expected[1:5, :5] = x[3:7, 2:18] @ w[:, :5]
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-5, atol=1e-5)


NEURONS = {(mk.CNNNeuronType.NONE, 0.0, 0.0): lambda y: y,
           (mk.CNNNeuronType.RELU, 0.0, 0.0): lambda y: np.maximum(y, 0),
           (mk.CNNNeuronType.RELU, 0.25, 0.0): lambda y: np.where(y >= 0, y, 0.25 * y),
           (mk.CNNNeuronType.RELUN, 0.0, 0.5): lambda y: np.clip(y, 0, 0.5),
           (mk.CNNNeuronType.TANH, 1.0, 1.0): np.tanh}   # a * tanh(b * x)


@pytest.mark.parametrize("neuron", NEURONS, ids=lambda n: f"{n[0].name}-{n[1]}")
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matrix_neuron(device, run, rng, neuron, alpha, with_bias):
    """y = neuron(alpha x + bias), whichever passes the kernel fuses (a clamp neuron rides on
    the bias pass; with alpha 1 and no bias the neuron reads x itself)."""
    x, bias = _stored(rng, (2, 12, 9)), _stored(rng, 9)
    out = mk.Matrix.with_device(device, mk.MatrixDescriptor(12, 9, 2))
    kernel = mk.MatrixNeuron(device)
    kernel.alpha = alpha
    kernel.set_neuron_type(*neuron)
    bv = mk.Vector.from_numpy(device, bias.astype(np.float32)) if with_bias else None
    X = _matrix(device, x)
    run(device, lambda cb: kernel.encode(cb, X, bv, out))
    expected = NEURONS[neuron](alpha * x + (bias if with_bias else 0))
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(X.to_numpy(), x)   # the input is only read


@pytest.mark.parametrize("neuron", NEURONS, ids=lambda n: f"{n[0].name}-{n[1]}")
@pytest.mark.parametrize("count", [1, 2, 4])
def test_matrix_sum_counts_and_neurons(device, run, rng, neuron, count):
    """The first two sources are summed in one pass and a clamp neuron rides on the last one
    when there is no bias: every count and neuron still gives neuron(sum scale_i s_i)."""
    srcs = [_stored(rng, (7, 11)) for _ in range(count)]
    scales = np.array([0.5, -2.0, 1.25, 3.0][:count])
    out = _matrix(device, np.full((7, 11), np.nan))
    kernel = mk.MatrixSum(device, count, 7, 11, False)
    kernel.set_neuron_type(*neuron)
    run(device, lambda cb: kernel.encode(
        cb, [_matrix(device, m) for m in srcs], out,
        scale_vector=mk.Vector.from_numpy(device, scales.astype(np.float32))))
    expected = NEURONS[neuron](sum(s * m for s, m in zip(scales, srcs)))
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("count", [2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("transpose", [False, True])
def test_matrix_sum_order(device, run, rng, isa, count, dtype, transpose):
    """One pass over every source (mk_sum): summed in order, each product rounded to fp32 before
    it is added, the partial sums in fp32 and the bias added last, rounded to the result's
    format once: bit for bit, over rows of several 512-element blocks with a short last one, sources in groups of 4,
    sources read in place (fp32), decoded (fp16) or strided (transposed)."""
    rows, columns = 3, 1100
    shape = (2, columns, rows) if transpose else (2, rows, columns)
    srcs = [_stored(rng, shape, dtype) for _ in range(count)]
    scales = rng.uniform(-2, 2, count).astype(np.float32)
    bias = _stored(rng, columns)
    out = _matrix(device, np.full((2, rows, columns), np.nan), dtype)
    kernel = mk.MatrixSum(device, count, rows, columns, transpose)
    run(device, lambda cb: kernel.encode(
        cb, [_matrix(device, m, dtype) for m in srcs], out,
        scale_vector=mk.Vector.from_numpy(device, scales),
        bias_vector=mk.Vector.from_numpy(device, bias.astype(np.float32))))
    terms = [s * _op(m, transpose).astype(np.float32) for s, m in zip(scales, srcs)]
    expected = terms[0]
    for t in terms[1:] + [bias.astype(np.float32)]:
        expected = expected + t   # float32 + float32: rounded to fp32 each time
    np.testing.assert_array_equal(out.to_numpy(), expected.astype(dtype))

# ---- storage ----------------------------------------------------------------------------------

def test_descriptor():
    d = mk.MatrixDescriptor(3, 5)
    assert d.row_bytes == mk.MatrixDescriptor.row_bytes_for_columns(5, DT.FLOAT32) == 64
    assert d.matrix_bytes == 192 and d.matrices == 1 and d.data_type == DT.FLOAT32
    assert mk.MatrixDescriptor.row_bytes_for_columns(40, DT.FLOAT16) == 128
    d.rows = 4
    assert d.matrix_bytes == 256
    d2 = mk.MatrixDescriptor(2, 3, 4, 12, 36, DT.FLOAT32)
    assert (d2.row_bytes, d2.matrix_bytes) == (12, 36)
    v = mk.VectorDescriptor(10, 2, data_type=DT.FLOAT16)
    assert v.vector_bytes == mk.VectorDescriptor.vector_bytes_for_length(10, DT.FLOAT16) == 64


@pytest.mark.parametrize("kwargs,word", [
    (dict(rows=0, columns=3), "rows"), (dict(rows=2, columns=3, row_bytes=8), "row_bytes"),
    (dict(rows=2, columns=3, row_bytes=14), "row_bytes"),
    (dict(rows=2, columns=3, matrices=2, row_bytes=12, matrix_bytes=30), "matrix_bytes"),
    (dict(rows=2, columns=3, matrices=2, row_bytes=12, matrix_bytes=12), "matrix_bytes"),
    (dict(rows=2, columns=3, data_type=DT.INT8), "data_type"),
    (dict(rows=2, columns=3, data_type=DT.BFLOAT16), "BFLOAT16")])
def test_descriptor_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        mk.MatrixDescriptor(**kwargs)


def test_numpy_round_trip(device, rng):
    for shape, dtype in (((3, 4), np.float32), ((2, 5, 7), np.float16), ((1, 1), np.float32)):
        a = rng.standard_normal(shape).astype(dtype)
        m = mk.Matrix.from_numpy(device, a)
        assert m.to_numpy().dtype == dtype
        np.testing.assert_array_equal(m.to_numpy(), a)
    m = mk.Matrix.from_numpy(device, np.ones((2, 3)), data_type=DT.FLOAT16)
    assert m.data_type == DT.FLOAT16 and m.row_bytes == 64
    with pytest.raises(ValueError, match="2-D or 3-D"):
        mk.Matrix.from_numpy(device, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="int64"):
        mk.Matrix.from_numpy(device, np.ones((2, 2), np.int64))


def test_matrix_on_buffer(device):
    d = mk.MatrixDescriptor(2, 3, row_bytes=16)
    buffer = bytearray(8 + 16 + 12)
    m = mk.Matrix(buffer, d, offset=8)
    m._elements()[...] = [[1, 2, 3], [4, 5, 6]]
    assert np.frombuffer(buffer, np.float32)[[2, 3, 4, 6, 7, 8]].tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="bytes"):
        mk.Matrix(bytearray(35), d, offset=8)
    with pytest.raises(ValueError, match="offset"):
        mk.Matrix(buffer, d, offset=2)
    with pytest.raises(ValueError, match="writable"):
        mk.Matrix(bytes(64), d)
    on_buffer = mk.Matrix(device.make_buffer(64), d, offset=16)
    assert on_buffer.device is device and isinstance(on_buffer.data, mk.Buffer)
    on_buffer._elements()[...] = 7
    assert on_buffer.data.contents().view(np.float32)[[4, 8]].tolist() == [7, 7]


# ---- validation -------------------------------------------------------------------------------

def _encode(device, kernel, *matrices):
    cb = device.make_command_queue().make_command_buffer()
    kernel.encode(cb, *matrices)


def test_multiplication_validation(device):
    def mat(r, c, n=1):
        return mk.Matrix.with_device(device, mk.MatrixDescriptor(r, c, n))
    A, B, C = mat(4, 5), mat(5, 6), mat(4, 6)
    with pytest.raises(ValueError, match="result_rows"):
        mk.MatrixMultiplication(device, 0, 6, 5)
    with pytest.raises(ValueError, match="left_matrix"):
        _encode(device, mk.MatrixMultiplication(device, 5, 6, 5), A, B, mat(5, 6))
    with pytest.raises(ValueError, match="right_matrix"):
        _encode(device, mk.MatrixMultiplication(device, 4, 6, 5, transpose_right=True), A, B, C)
    with pytest.raises(ValueError, match="result_matrix"):
        _encode(device, mk.MatrixMultiplication(device, 4, 6, 5), A, B, mat(3, 6))
    kernel = mk.MatrixMultiplication(device, 4, 6, 5)
    kernel.left_matrix_origin = (1, 0, 0)
    with pytest.raises(ValueError, match="left_matrix"):
        _encode(device, kernel, A, B, C)
    with pytest.raises(ValueError, match="left_matrix_origin"):
        kernel.left_matrix_origin = (0, 0, 1)
    kernel = mk.MatrixMultiplication(device, 4, 6, 5)
    kernel.batch_start = 1
    with pytest.raises(ValueError, match="batch_start"):
        _encode(device, kernel, A, B, C)
    with pytest.raises(ValueError, match="overlaps"):
        _encode(device, mk.MatrixMultiplication(device, 4, 5, 5), A, mat(5, 5), A)
    with pytest.raises(TypeError, match="Matrix"):
        _encode(device, mk.MatrixMultiplication(device, 4, 6, 5), np.ones((4, 5)), B, C)
    # a matrix of another device, also after the same encode was accepted on its own device
    other = mk.Device(num_threads=1)
    kernel = mk.MatrixMultiplication(device, 4, 6, 5)
    _encode(device, kernel, A, B, C)
    foreign = mk.Matrix.with_device(other, mk.MatrixDescriptor(4, 6))
    with pytest.raises(ValueError, match="another device"):
        _encode(device, kernel, A, B, foreign)
    with pytest.raises(ValueError, match="another device"):
        _encode(other, kernel, A, B, C)
    # a matrix over NumPy memory belongs to no device (a NumPy 2 array's .device is "cpu")
    on_numpy = mk.Matrix(np.zeros(64, np.float32), mk.MatrixDescriptor(4, 6))
    assert on_numpy.device is None
    _encode(device, kernel, A, B, on_numpy)


def test_vector_and_kernel_validation(device):
    A = mk.Matrix.with_device(device, mk.MatrixDescriptor(4, 5))
    x = mk.Vector.with_device(device, mk.VectorDescriptor(5))
    with pytest.raises(ValueError, match="result_vector"):
        _encode(device, mk.MatrixVectorMultiplication(device, 4, 5), A, x,
                mk.Vector.with_device(device, mk.VectorDescriptor(3)))
    with pytest.raises(ValueError, match="count"):
        _encode(device, mk.MatrixSum(device, 2, 4, 5, False), [A], A)
    fc = mk.MatrixFullyConnected(device)
    fc.source_input_feature_channels = 6
    with pytest.raises(ValueError, match="input_matrix"):
        _encode(device, fc, A, A, None, A)
    with pytest.raises(ValueError, match="PRELU"):
        fc.set_neuron_type(mk.CNNNeuronType.PRELU)


def test_fully_connected_bias_outlives_encode(device, rng):
    """The bias is read at encode into a private copy that must live until the command ran:
    freeing it at the end of encode and reusing its memory must not change the result."""
    x, w, bias = _stored(rng, (8, 16)), _stored(rng, (16, 40)), _stored(rng, 40)
    out = mk.Matrix.with_device(device, mk.MatrixDescriptor(8, 40))
    fc = mk.MatrixFullyConnected(device)
    cb = device.make_command_queue().make_command_buffer()
    fc.encode(cb, _matrix(device, x), _matrix(device, w),
              mk.Vector.from_numpy(device, bias.astype(np.float32)), out)
    junk = [np.full(40, 1e30, np.float32) for _ in range(1000)]   # reuse freed memory
    cb.commit()
    cb.wait_until_completed()
    del junk
    np.testing.assert_allclose(out.to_numpy(), x @ w + bias, rtol=1e-5 * 4, atol=1e-4)
