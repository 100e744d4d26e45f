/* The GEMM family (src/gemm/): one register-tiled micro-kernel per ISA, shared by
 * MatrixMultiplication, the convolution family (indirect GEMM) and the fully-connected kernels.
 * The declarations down to mk_gemm_pack_b are the contract in GEMM_CONTRACT.md (fixed:
 * additions allowed, changes not). */
#ifndef MK_GEMM_H
#define MK_GEMM_H

#include "mpskernels.h"

/* Columns per packed-B panel: the same for every ISA, so weights packed once at kernel
 * creation stay valid whatever ISA is selected later. */
#define MK_GEMM_NR 32

/* Applied once a tile's whole K has been summed, in registers:
 *   c = alpha * acc + beta * c_old + bias[j]   (beta == 0: c_old is never read, may be NaN;
 *                                                bias == NULL: no bias)
 *   then clamp to [lo, hi] (pass -INFINITY, INFINITY for none): fuses ReLU / ReLUN / clamp. */
typedef struct mk_gemm_epilogue {
    float alpha, beta;
    const float *bias;      /* already offset to the tile's first column; nc floats */
    float lo, hi;
} mk_gemm_epilogue;

/* One register tile: rows i < mr (1 <= mr <= the kernel's mr), columns j < nc (1 <= nc <= NR):
 *   acc[i][j] = sum over s < ks, k < kc of  A(s, i)[k] * w[(s*kc + k) * MK_GEMM_NR + j]
 * A(s, i): the row pointer p = a[s * MR + i] (MR = the kernel's mr); if p != zero it is moved
 *   by a_offset BYTES ((const float *)((uintptr_t)p + a_offset)); p then points at kc contiguous
 *   floats. `zero` is a buffer of >= kc zero floats the caller owns (padding taps point at it).
 *   Rows i >= mr are never dereferenced.
 * w: one packed panel: ks*kc rows of MK_GEMM_NR floats (columns >= nc hold zeros).
 * c: row i starts at c + i*ldc (floats); only the mr x nc part is written (and read if beta).
 * a_offset lets an indirection buffer built once (relative to a base) serve any image address,
 * e.g. arena addresses only known at commit, and every image of a batch. */
typedef void (*mk_gemm_ukernel_fn)(int mr, int nc, int64_t kc, int64_t ks,
                                   const float *const *a, intptr_t a_offset, const float *zero,
                                   const float *w, float *c, int64_t ldc,
                                   const mk_gemm_epilogue *ep);

/* Addition: the same tile (ks = 1, no a_offset) with B read in place, unpacked: row k of the
 * tile's columns at w + k*ldw, columns >= nc never read. For small or thin products, where
 * packing B would cost more than it saves. */
typedef void (*mk_gemm_ukernel_strided_fn)(int mr, int nc, int64_t kc, const float *const *a,
                                           const float *zero, const float *w, int64_t ldw,
                                           float *c, int64_t ldc, const mk_gemm_epilogue *ep);

/* Addition: the inner loop of one-row products (m = 1, bound by reading B):
 *   y[j] += x[0] * b[j] + x[1] * b[ldb + j] + ... + x[rows - 1] * b[(rows - 1) * ldb + j]
 * for j < n, 1 <= rows <= MK_GEMM_GEMV_ROWS, each term added to y[j] in row order. */
#define MK_GEMM_GEMV_ROWS 8
typedef void (*mk_gemm_gemv_fn)(int rows, int64_t n, const float *x, const float *b,
                                int64_t ldb, float *y);

/* Addition: the inner loop of one-column products (n = 1, bound by reading A):
 *   out[r] = a[r * lda + 0] * x[0] + ... + a[r * lda + k - 1] * x[k - 1]
 * for r < rows <= MK_GEMM_DOT_ROWS, in one order for every ISA: 16 partial sums, sum l adding
 * the terms q = l, l + 16, l + 32, ... in turn (fused multiply-adds where the ISA has them),
 * then folded s[l] += s[l + w] for w = 8, 4, 2, 1; out[r] = s[0]. */
#define MK_GEMM_DOT_ROWS 4
typedef void (*mk_gemm_dot_fn)(int rows, int64_t k, const float *a, int64_t lda,
                               const float *x, float *out);

/* Addition: the same tile (ks = 1, no a_offset) with A packed by the caller: row i's kc floats
 * at pa + i * MK_GEMM_PACKED_LDA (kc <= MK_GEMM_PACKED_LDA). A stride known when compiling lets
 * one pointer with constant offsets address every row: the AVX-512 kernel folds each broadcast
 * into its FMA (30.5 instead of 42 instructions per k step: faster while other jobs run on the
 * machine; on a quiet core the FMA units bound both). 388 floats (1552 bytes): the rows' lines
 * end at 4 different k (a multiple of 16 floats put all 12 rows' misses at the same k step, and
 * was no faster than row pointers) and the rows spread over the L1's sets. NULL for ISAs
 * without it: the caller passes row pointers to `run` instead. */
#define MK_GEMM_PACKED_LDA 388
typedef void (*mk_gemm_ukernel_packed_fn)(int mr, int nc, int64_t kc, const float *pa,
                                          const float *w, float *c, int64_t ldc,
                                          const mk_gemm_epilogue *ep);

typedef struct mk_gemm_ukernel {
    int mr;                 /* rows per tile of this ISA's kernel */
    mk_gemm_ukernel_fn run;
    const char *name;       /* e.g. "gemm_12x32__avx512": shown by conv.implementation */
    mk_gemm_ukernel_strided_fn run_strided;   /* addition */
    /* Addition, a measuring aid: `iters` rounds of independent FMAs in this ISA's widest
     * registers (the FMA peak, for bench/); returns the flops done. */
    double (*fma_burn)(int64_t iters);
    mk_gemm_gemv_fn gemv;   /* addition */
    mk_gemm_ukernel_packed_fn run_packed;   /* addition, may be NULL */
    mk_gemm_dot_fn dot;     /* addition */
} mk_gemm_ukernel;

/* The micro-kernel of the ISA mk_select_isa chose (filled by mk_gemm_select_isa). */
const mk_gemm_ukernel *mk_gemm_ukernel_active(void);

/* Packed B: ceil(n / NR) panels, each k rows of MK_GEMM_NR floats (zero past column n).
 * Source element (r, j) (r < k, j < n) is at b + r*rs + j*cs elements, in `format`
 * MK_FMT_F32 or MK_FMT_F16 (converted to fp32 while packing). Returns MK_EINVAL on overflow. */
mk_status mk_gemm_packed_b_floats(int64_t k, int64_t n, int64_t *floats);
void mk_gemm_pack_b(int64_t k, int64_t n, const void *b, int format, int64_t rs, int64_t cs,
                    float *packed);

/* ---- additions to the contract ----------------------------------------------------------- */

/* One operand of mk_sgemm: element (b, r, j) of matrix b is at data + b*bs + r*rs + j*cs
 * elements (any strides: a transposed operand just swaps rs and cs), format MK_FMT_F32 or
 * MK_FMT_F16 (fp32 compute either way). */
typedef struct mk_gemm_matrix {
    void *data;
    int32_t format;
    int64_t rs, cs, bs;
} mk_gemm_matrix;

/* For each b < batch: C = clamp(alpha * A B + beta * C + bias, lo, hi), A m x k, B k x n,
 * C m x n; bias (n floats) may be NULL; beta == 0: C is never read. C must not overlap A or B.
 * K is summed in blocks in a fixed order, so the result is bitwise the same for any thread
 * count (threads split the output only). */
typedef struct mk_sgemm_args {
    int64_t batch, m, n, k;
    mk_gemm_matrix a, b, c;
    float alpha, beta;
    const float *bias;
    float lo, hi;
} mk_sgemm_args;

mk_status mk_sgemm(const mk_sgemm_args *p, mk_pool *pool);

/* The active ISA's fma_burn(iters) on each of `chunks` pool threads at once; returns the
 * flops done (time it to get the FMA peak of that many cores). */
double mk_gemm_fma_burn(mk_pool *pool, int64_t chunks, int64_t iters);

/* Fill the GEMM dispatch table for `isa` (called by mk_select_isa). */
void mk_gemm_select_isa(mk_isa isa);

/* The micro-kernel of each ISA (the per-ISA files define them). */
extern const mk_gemm_ukernel mk_gemm_ukernel__generic;
#if MK_X86
extern const mk_gemm_ukernel mk_gemm_ukernel__avx2;
extern const mk_gemm_ukernel mk_gemm_ukernel__avx512;
#endif

#endif
