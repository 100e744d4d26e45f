"""The GEMM micro-kernel of every ISA and B packing (the contract in src/gemm/gemm.h), against
float64 references written here. Matrix-level tests are in test_matrix.py."""
import itertools

import numpy as np
import pytest

from mpskernels import _native

NR = _native.GEMM_NR
F32, F16 = 4, 3   # mk_format values


def _packed_reference(b, nr=NR):
    """B (k x n) as ceil(n/NR) panels of k rows x NR columns, zero past column n."""
    k, n = b.shape
    panels = -(-n // nr)
    out = np.zeros((panels, k, nr), dtype=np.float32)
    for p in range(panels):
        cols = b[:, p * nr:(p + 1) * nr]
        out[p, :, :cols.shape[1]] = cols
    return out.reshape(-1)


@pytest.mark.parametrize("k,n", [(1, 1), (3, 32), (5, 33), (17, 70), (64, 96)])
@pytest.mark.parametrize("fmt", [F32, F16])
@pytest.mark.parametrize("transposed", [False, True])
def test_pack_b(rng, k, n, fmt, transposed):
    dtype = np.float32 if fmt == F32 else np.float16
    b = rng.standard_normal((k, n)).astype(dtype)
    src = np.ascontiguousarray(b.T) if transposed else b
    rs, cs = (1, k) if transposed else (n, 1)
    packed = _native.gemm_pack_b(src, k, n, rs, cs, fmt)
    np.testing.assert_array_equal(packed, _packed_reference(b.astype(np.float32)))


def test_packed_b_overflow():
    with pytest.raises(ValueError):
        _native.gemm_pack_b(np.zeros(1, np.float32), 2 ** 40, 2 ** 40, 1, 1, F32)


def _run_case(rng, mr, nc, kc, ks, a_offset, beta, with_bias, lo, hi, zero_rows=()):
    MR, _ = _native.gemm_ukernel_info()
    a_base = rng.standard_normal(ks * MR * kc + 7).astype(np.float32)
    # Rows start at scattered element offsets (not aligned, overlapping is allowed).
    rows = rng.integers(0, a_base.shape[0] - kc + 1, size=ks * MR)
    for q in zero_rows:
        rows[q] = -1
    rows[[s * MR + i for s in range(ks) for i in range(mr, MR)]] = -2  # NULL: never read
    w = np.zeros((ks * kc, NR), dtype=np.float32)
    w[:, :nc] = rng.standard_normal((ks * kc, nc))
    ldc = nc + 3
    c_old = rng.standard_normal((MR, ldc)).astype(np.float32)
    if beta == 0.0:
        c_old[:mr, :nc] = np.nan          # must never be read
    c = c_old.copy().reshape(-1)
    bias = rng.standard_normal(nc).astype(np.float32) if with_bias else None
    alpha = 0.75
    _native.gemm_ukernel_run(mr, nc, kc, ks, a_base, rows, a_offset, w.reshape(-1), c, ldc,
                             alpha, beta, bias, lo, hi)
    # float64 reference
    acc = np.zeros((mr, nc))
    for s in range(ks):
        for i in range(mr):   # rows past mr are NULL
            q = rows[s * MR + i]
            arow = np.zeros(kc) if q == -1 else a_base[q:q + kc].astype(np.float64)
            acc[i] += arow @ w[s * kc:(s + 1) * kc, :nc].astype(np.float64)
    ref = alpha * acc
    if beta != 0.0:
        ref += beta * c_old[:mr, :nc]
    if bias is not None:
        ref += bias
    ref = np.minimum(np.maximum(ref, lo), hi)
    c = c.reshape(MR, ldc)
    tol = 1e-5 * np.sqrt(ks * kc) * (np.abs(acc).max() + 1)
    np.testing.assert_allclose(c[:mr, :nc], ref, rtol=0, atol=tol)
    # nothing outside the mr x nc tile is touched
    outside = np.ones_like(c, dtype=bool)
    outside[:mr, :nc] = False
    np.testing.assert_array_equal(c[outside], c_old[outside])


def test_ukernel_shapes(isa, rng):
    MR, name = _native.gemm_ukernel_info()
    assert name.endswith(isa)
    for mr, nc, kc in itertools.product(sorted({1, 2, MR - 1, MR} - {0}), (1, 7, 16, 17, 31, 32),
                                        (1, 3, 8, 17, 64)):
        _run_case(rng, mr, nc, kc, 1, 0, 0.0, False, -np.inf, np.inf)


@pytest.mark.parametrize("ks", [2, 3, 9])
@pytest.mark.parametrize("a_offset", [0, 4096, -64])
def test_ukernel_indirect(isa, rng, ks, a_offset):
    """ks taps with zero-buffer padding rows and an a_offset applied to the others only."""
    MR, _ = _native.gemm_ukernel_info()
    for mr in sorted({1, MR}):
        zero_rows = [0, ks * MR - 1, MR + mr - 1]
        _run_case(rng, mr, 29, 5, ks, a_offset, 0.0, False, -np.inf, np.inf, zero_rows)
        _run_case(rng, mr, 32, 33, ks, a_offset, 0.0, True, -np.inf, np.inf, zero_rows)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lo,hi", [(-np.inf, np.inf), (0.0, np.inf), (0.0, 6.0), (-0.3, 0.2)])
def test_ukernel_epilogue(isa, rng, beta, with_bias, lo, hi):
    MR, _ = _native.gemm_ukernel_info()
    for mr, nc in ((MR, 32), (max(MR - 1, 1), 13)):
        _run_case(rng, mr, nc, 19, 2, 0, beta, with_bias, lo, hi)


def test_ukernel_keeps_nan(isa, rng):
    """NaN in A stays NaN through the epilogue, clamped or not (as the elementwise ReLU)."""
    MR, _ = _native.gemm_ukernel_info()
    kc = 8
    a = rng.standard_normal(MR * kc).astype(np.float32)
    a[kc + 3] = np.nan   # row 1
    w = rng.standard_normal(kc * NR).astype(np.float32)
    for lo, hi in ((-np.inf, np.inf), (0.0, np.inf), (0.0, 6.0)):
        c = np.zeros(MR * NR, np.float32)
        _native.gemm_ukernel_run(MR, NR, kc, 1, a, np.arange(MR) * kc, 0, w, c, NR, 1.0, 0.0,
                                 None, lo, hi)
        nan_rows = np.isnan(c.reshape(MR, NR)).all(axis=1)
        assert nan_rows.tolist() == [i == 1 for i in range(MR)], (lo, hi)



@pytest.mark.parametrize("beta,with_bias,lo,hi", [(0.0, False, -np.inf, np.inf),
                                                  (1.0, True, -np.inf, np.inf),
                                                  (-0.5, True, 0.0, 6.0),
                                                  (0.0, False, 0.0, np.inf)])
def test_ukernel_packed(isa, rng, beta, with_bias, lo, hi):
    """run_packed (A packed, rows GEMM_PACKED_LDA floats apart) gives the bits of run over the
    same rows (the same FMAs in the same order) and matches the float64 reference."""
    MR, _ = _native.gemm_ukernel_info()
    lda = _native.GEMM_PACKED_LDA
    for mr, nc, kc in itertools.product(range(1, MR + 1), (1, 16, 17, 32), (1, 19, lda)):
        pa = rng.standard_normal(MR * lda).astype(np.float32)
        w = np.zeros((kc, NR), np.float32)
        w[:, :nc] = rng.standard_normal((kc, nc))
        ldc = nc + 5
        c_old = rng.standard_normal((MR, ldc)).astype(np.float32)
        if beta == 0.0:
            c_old[:mr, :nc] = np.nan   # must never be read
        bias = rng.standard_normal(nc).astype(np.float32) if with_bias else None
        c = c_old.copy().reshape(-1)
        if not _native.gemm_ukernel_run_packed(mr, nc, kc, pa, w.reshape(-1), c, ldc, 0.75, beta,
                                               bias, lo, hi):
            pytest.skip(f"{isa} has no run_packed (the driver passes row pointers to run)")
        rows = np.full(MR, -2)
        rows[:mr] = np.arange(mr) * lda
        c_rows = c_old.copy().reshape(-1)
        _native.gemm_ukernel_run(mr, nc, kc, 1, pa, rows, 0, w.reshape(-1), c_rows, ldc, 0.75,
                                 beta, bias, lo, hi)
        np.testing.assert_array_equal(c.view(np.uint32), c_rows.view(np.uint32))
        a = pa.reshape(MR, lda)[:mr, :kc].astype(np.float64)
        acc = a @ w[:, :nc].astype(np.float64)
        ref = 0.75 * acc + (beta * c_old[:mr, :nc] if beta != 0.0 else 0.0)
        ref = np.minimum(np.maximum(ref + (bias if with_bias else 0.0), lo), hi)
        c = c.reshape(MR, ldc)
        tol = 1e-5 * np.sqrt(kc) * (np.abs(acc).max() + 1)
        np.testing.assert_allclose(c[:mr, :nc], ref, rtol=0, atol=tol)
        outside = np.ones_like(c, dtype=bool)
        outside[:mr, :nc] = False
        np.testing.assert_array_equal(c[outside], c_old[outside])
