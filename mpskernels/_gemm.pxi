# ---- GEMM (src/gemm/) ----------------------------------------------------------------------
# Included at the end of _native.pyx.
from libc.stdint cimport intptr_t, uintptr_t

cdef extern from "gemm/gemm.h" nogil:
    enum: MK_GEMM_NR
    ctypedef struct mk_gemm_epilogue:
        float alpha, beta
        const float *bias
        float lo, hi
    ctypedef void (*mk_gemm_ukernel_fn)(int mr, int nc, int64_t kc, int64_t ks,
                                        const float *const *a, intptr_t a_offset,
                                        const float *zero, const float *w, float *c, int64_t ldc,
                                        const mk_gemm_epilogue *ep)
    enum: MK_GEMM_PACKED_LDA
    ctypedef void (*mk_gemm_ukernel_packed_fn)(int mr, int nc, int64_t kc, const float *pa,
                                               const float *w, float *c, int64_t ldc,
                                               const mk_gemm_epilogue *ep)
    ctypedef struct mk_gemm_ukernel:
        int mr
        mk_gemm_ukernel_fn run
        const char *name
        mk_gemm_ukernel_packed_fn run_packed
    const mk_gemm_ukernel *mk_gemm_ukernel_active()
    mk_status mk_gemm_packed_b_floats(int64_t k, int64_t n, int64_t *floats)
    void mk_gemm_pack_b(int64_t k, int64_t n, const void *b, int format, int64_t rs, int64_t cs,
                        float *packed)

GEMM_NR = MK_GEMM_NR
GEMM_PACKED_LDA = MK_GEMM_PACKED_LDA


def gemm_ukernel_info():
    """(mr, name) of the active micro-kernel."""
    cdef const mk_gemm_ukernel *u = mk_gemm_ukernel_active()
    return u.mr, u.name.decode()


def gemm_pack_b(b, int64_t k, int64_t n, int64_t rs, int64_t cs, int fmt):
    """Pack B (a float32 or float16 array; element (r, j) at flat index r*rs + j*cs)."""
    cdef int64_t floats
    check(mk_gemm_packed_b_floats(k, n, &floats), "gemm_pack_b")
    src = np.ascontiguousarray(b).reshape(-1)
    need = (k - 1) * rs + (n - 1) * cs + 1 if k > 0 and n > 0 else 0
    if src.dtype.itemsize != mk_format_size(fmt) or src.shape[0] < need:
        raise ValueError("gemm_pack_b: the array does not hold B in that format")
    packed = np.empty(floats, dtype=np.float32)
    cdef float[::1] out = packed
    cdef size_t address = src.ctypes.data
    with nogil:
        mk_gemm_pack_b(k, n, <const void *>address, fmt, rs, cs, &out[0] if floats else NULL)
    return packed


def gemm_ukernel_run(int mr, int nc, int64_t kc, int64_t ks, float[::1] a_base, rows,
                     intptr_t a_offset, float[::1] w, float[::1] c, int64_t ldc, float alpha,
                     float beta, bias, float lo, float hi):
    """Test hook: one call of the active micro-kernel. rows[s*MR + i] is an element index into
    a_base, -1 for the zero buffer or -2 for NULL (rows past mr: must never be read); the pointers handed over are moved back by a_offset
    bytes, so the kernel must add a_offset to find the rows."""
    cdef const mk_gemm_ukernel *u = mk_gemm_ukernel_active()
    cdef int64_t[::1] r = np.ascontiguousarray(rows, dtype=np.int64)
    if not (1 <= mr <= u.mr and 1 <= nc <= MK_GEMM_NR and kc >= 1 and ks >= 1
            and r.shape[0] >= ks * u.mr and w.shape[0] >= ks * kc * MK_GEMM_NR
            and c.shape[0] >= (mr - 1) * ldc + nc):
        raise ValueError("gemm_ukernel_run: bad sizes")
    zeros = np.zeros(kc, dtype=np.float32)
    cdef float[::1] z = zeros
    cdef const float **ptrs = <const float **>malloc(ks * u.mr * sizeof(float *))
    if ptrs == NULL:
        raise MemoryError()
    cdef int64_t q
    for q in range(ks * u.mr):
        if r[q] == -1:
            ptrs[q] = &z[0]
        elif r[q] < 0:
            ptrs[q] = NULL
        else:
            if r[q] + kc > a_base.shape[0]:
                free(ptrs)
                raise ValueError("gemm_ukernel_run: a row runs past a_base")
            ptrs[q] = <const float *>(<uintptr_t>&a_base[r[q]] - <uintptr_t>a_offset)
    cdef float[::1] b
    cdef mk_gemm_epilogue ep
    ep.alpha = alpha
    ep.beta = beta
    ep.lo = lo
    ep.hi = hi
    ep.bias = NULL
    if bias is not None:
        b = bias
        ep.bias = &b[0]
    with nogil:
        u.run(mr, nc, kc, ks, ptrs, a_offset, &z[0], &w[0], &c[0], ldc, &ep)
    free(ptrs)


def gemm_ukernel_run_packed(int mr, int nc, int64_t kc, float[::1] pa, float[::1] w,
                            float[::1] c, int64_t ldc, float alpha, float beta, bias, float lo,
                            float hi):
    """Test hook: one call of the active micro-kernel's run_packed (row i of A at
    pa[i * GEMM_PACKED_LDA:]). Returns False when the active ISA has none."""
    cdef const mk_gemm_ukernel *u = mk_gemm_ukernel_active()
    if u.run_packed == NULL:
        return False
    if not (1 <= mr <= u.mr and 1 <= nc <= MK_GEMM_NR and 1 <= kc <= MK_GEMM_PACKED_LDA
            and pa.shape[0] >= (mr - 1) * MK_GEMM_PACKED_LDA + kc
            and w.shape[0] >= kc * MK_GEMM_NR and c.shape[0] >= (mr - 1) * ldc + nc):
        raise ValueError("gemm_ukernel_run_packed: bad sizes")
    cdef float[::1] b
    cdef mk_gemm_epilogue ep
    ep.alpha = alpha
    ep.beta = beta
    ep.lo = lo
    ep.hi = hi
    ep.bias = NULL
    if bias is not None:
        b = bias
        ep.bias = &b[0]
    with nogil:
        u.run_packed(mr, nc, kc, &pa[0], &w[0], &c[0], ldc, &ep)
    return True


cdef extern from "gemm/gemm.h" nogil:
    ctypedef struct mk_gemm_matrix:
        void *data
        int32_t format
        int64_t rs, cs, bs
    ctypedef struct mk_sgemm_args:
        int64_t batch, m, n, k
        mk_gemm_matrix a, b, c
        float alpha, beta
        const float *bias
        float lo, hi
    mk_status mk_sgemm(const mk_sgemm_args *p, mk_pool *pool)
    double mk_gemm_fma_burn(mk_pool *pool, int64_t chunks, int64_t iters)


def fma_peak_gflops(Pool pool, double seconds=0.2):
    """The FMA peak (GFLOP/s) of the active ISA on pool.num_threads threads at once: the best
    of several timed bursts of independent FMAs."""
    import time
    cdef int64_t chunks = mk_pool_num_threads(pool.pool), iters = 1 << 16
    cdef double flops
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        with nogil:
            flops = mk_gemm_fma_burn(pool.pool, chunks, iters)
        dt = time.perf_counter() - t0
        if dt < 2e-3:
            iters *= 4
            continue
        best = max(best, flops / dt / 1e9)
        if time.perf_counter() > deadline:
            return best


def fma_burn(Pool pool, int64_t iters):
    """One burst of the FMA peak probe (`iters` rounds of 12 independent FMA chains) on the
    calling thread when pool has one thread; returns the flops done (time it yourself: bench/
    samples it alternately with a product, on the same clock)."""
    cdef double flops
    with nogil:
        flops = mk_gemm_fma_burn(pool.pool, 1, iters)
    return flops


cdef mk_status run_gemm(void *p, mk_pool *pool) noexcept nogil:
    return mk_sgemm(<mk_sgemm_args *>p, pool)


cdef class GemmCommand(Command):
    """C[b] = clamp(alpha A[b] B[b] + beta C[b] + bias, lo, hi) for b < batch (mk_sgemm);
    operands 0, 1, 2 are A, B, C, each (address, format, row, column, batch strides)."""
    cdef mk_sgemm_args args
    cdef object bias   # what args.bias points into (`keep` is the caller's)

    def __cinit__(self, *args, **kwargs):
        memset(&self.args, 0, sizeof(mk_sgemm_args))
        self.command.run = run_gemm
        self.command.args = &self.args

    def __init__(self, int64_t batch, int64_t m, int64_t n, int64_t k, float alpha, float beta,
                 bias=None, float lo=float("-inf"), float hi=float("inf")):
        cdef float[::1] b
        if min(batch, m, n, k) < 1:
            raise ValueError(f"bad GEMM sizes batch={batch} m={m} n={n} k={k}")
        self.args.batch, self.args.m, self.args.n, self.args.k = batch, m, n, k
        self.args.alpha, self.args.beta, self.args.lo, self.args.hi = alpha, beta, lo, hi
        if bias is not None:
            b = bias
            if b.shape[0] < n:
                raise ValueError("the bias needs one value per column")
            self.args.bias = &b[0]
            self.bias = bias

    def copy(self):
        """A new command with the same arguments (a recorded command is never shared)."""
        cdef GemmCommand c = GemmCommand.__new__(GemmCommand)
        c.args = self.args
        c.bias = self.bias
        return c

    def set_operand(self, int k, size_t address, int fmt, int64_t rs, int64_t cs, int64_t bs):
        if not 0 <= k < 3:
            raise IndexError(k)
        cdef mk_gemm_matrix *o = &self.args.a if k == 0 else &self.args.b if k == 1 \
            else &self.args.c
        o.data = <void *>address
        o.format = fmt
        o.rs, o.cs, o.bs = rs, cs, bs
