/* AVX2 GEMM micro-kernel: 6 rows x 32 columns, computed as two 6 x 16 halves (12 ymm
 * accumulators, 2 for B, 1 for the broadcast: 15 of 16 registers). A whole 6 x 32 tile would
 * need 24 accumulators; the second half re-reads the A rows, which are in L1 by then. */
#include <immintrin.h>
#include <math.h>

#include "gemm.h"

#define MR 6
#define NR MK_GEMM_NR

#define REP6(X) X(0) X(1) X(2) X(3) X(4) X(5)

/* Lanes j < n of a ymm (n clamped to 0..8) as a maskload / maskstore mask. */
static inline __m256i lanes(int n) {
    n = n < 0 ? 0 : n > 8 ? 8 : n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Columns [0, nc) of w (nc <= 16, w already at the half's first column). `masked`: columns
 * >= nc of w may hold anything (an unpacked B); else they are zeros. */
static inline __attribute__((always_inline)) void
half_6x16(int mr, int nc, int64_t kc, int64_t ks, const float *const *a, intptr_t a_offset,
          const float *zero, const float *w, int64_t ldw, int masked, float *c, int64_t ldc,
          const mk_gemm_epilogue *ep) {
    const __m256i m0 = lanes(nc), m1 = lanes(nc - 8);
    const int use_beta = ep->beta != 0.0f;
    if (use_beta)   /* C is read at the end: fetch it while the FMAs run */
        for (int i = 0; i < mr; i++) {
            _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + i * ldc + nc - 1), _MM_HINT_T0);
        }
#define DECL(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
    REP6(DECL)
#undef DECL
    for (int64_t s = 0; s < ks; s++, a += MR) {
#define ROW(i)                                                                               \
    const float *r##i = zero;                                                                \
    if (i < mr && a[i] != zero) r##i = (const float *)((uintptr_t)a[i] + (uintptr_t)a_offset);
        REP6(ROW)
#undef ROW
        for (int64_t k = 0; k < kc; k++, w += ldw) {
            __m256 b0, b1;
            if (masked) {
                b0 = _mm256_maskload_ps(w, m0);
                b1 = _mm256_maskload_ps(w + 8, m1);
            } else {
                b0 = _mm256_loadu_ps(w);
                b1 = _mm256_loadu_ps(w + 8);
            }
#define FMA(i)                                                                               \
    {                                                                                        \
        __m256 v = _mm256_broadcast_ss(r##i + k);                                            \
        c##i##0 = _mm256_fmadd_ps(v, b0, c##i##0);                                           \
        c##i##1 = _mm256_fmadd_ps(v, b1, c##i##1);                                           \
    }
            REP6(FMA)
#undef FMA
        }
    }
    const __m256 alpha = _mm256_set1_ps(ep->alpha), beta = _mm256_set1_ps(ep->beta);
    const __m256 lo = _mm256_set1_ps(ep->lo), hi = _mm256_set1_ps(ep->hi);
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (ep->bias) {
        bias0 = _mm256_maskload_ps(ep->bias, m0);
        bias1 = _mm256_maskload_ps(ep->bias + 8, m1);
    }
    const int scale = ep->alpha != 1.0f, clamp = ep->lo != -INFINITY || ep->hi != INFINITY;
    /* max(lo, v), min(hi, v): a NaN in v is kept (the second operand is returned) */
#define OUT(i)                                                                               \
    if (i < mr) {                                                                            \
        float *ci = c + i * ldc;                                                             \
        __m256 v0 = c##i##0, v1 = c##i##1;                                                   \
        if (scale) {                                                                         \
            v0 = _mm256_mul_ps(alpha, v0);                                                   \
            v1 = _mm256_mul_ps(alpha, v1);                                                   \
        }                                                                                    \
        if (use_beta) {                                                                      \
            v0 = _mm256_fmadd_ps(beta, _mm256_maskload_ps(ci, m0), v0);                      \
            v1 = _mm256_fmadd_ps(beta, _mm256_maskload_ps(ci + 8, m1), v1);                  \
        }                                                                                    \
        if (ep->bias) {                                                                      \
            v0 = _mm256_add_ps(v0, bias0);                                                   \
            v1 = _mm256_add_ps(v1, bias1);                                                   \
        }                                                                                    \
        if (clamp) {                                                                         \
            v0 = _mm256_min_ps(hi, _mm256_max_ps(lo, v0));                                   \
            v1 = _mm256_min_ps(hi, _mm256_max_ps(lo, v1));                                   \
        }                                                                                    \
        _mm256_maskstore_ps(ci, m0, v0);                                                     \
        _mm256_maskstore_ps(ci + 8, m1, v1);                                                 \
    }
    REP6(OUT)
#undef OUT
}

static inline __attribute__((always_inline)) void
tile_6x32(int mr, int nc, int64_t kc, int64_t ks, const float *const *a, intptr_t a_offset,
          const float *zero, const float *w, int64_t ldw, int masked, float *c, int64_t ldc,
          const mk_gemm_epilogue *ep) {
    half_6x16(mr, nc < 16 ? nc : 16, kc, ks, a, a_offset, zero, w, ldw, masked, c, ldc, ep);
    if (nc > 16) {
        mk_gemm_epilogue ep1 = *ep;
        if (ep->bias) ep1.bias = ep->bias + 16;
        half_6x16(mr, nc - 16, kc, ks, a, a_offset, zero, w + 16, ldw, masked, c + 16, ldc,
                  &ep1);
    }
}

/* One copy per row count: a short tile issues only the FMAs of its own rows. */
static void gemm_6x32__avx2(int mr, int nc, int64_t kc, int64_t ks, const float *const *a,
                            intptr_t a_offset, const float *zero, const float *w, float *c,
                            int64_t ldc, const mk_gemm_epilogue *ep) {
    switch (mr) {
#define CASE(i)                                                                              \
    case i + 1: tile_6x32(i + 1, nc, kc, ks, a, a_offset, zero, w, NR, 0, c, ldc, ep); break;
        REP6(CASE)
#undef CASE
    }
}

/* B read in place (rows ldw floats apart, columns past nc never touched). */
static void gemm_6x32_strided__avx2(int mr, int nc, int64_t kc, const float *const *a,
                                    const float *zero, const float *w, int64_t ldw, float *c,
                                    int64_t ldc, const mk_gemm_epilogue *ep) {
    switch (mr) {
#define CASE(i) case i + 1: tile_6x32(i + 1, nc, kc, 1, a, 0, zero, w, ldw, 1, c, ldc, ep); break;
        REP6(CASE)
#undef CASE
    }
}

/* 12 independent FMA chains (latency 4 x 2 ymm FMAs per cycle needs >= 8). */
static double fma_burn__avx2(int64_t iters) {
    const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
#define REP12(X) REP6(X) X(6) X(7) X(8) X(9) X(10) X(11)
#define INIT(i) __m256 x##i = _mm256_set1_ps(1.0f + i);
    REP12(INIT)
#undef INIT
    for (int64_t t = 0; t < iters; t++) {
#define STEP(i) x##i = _mm256_fmadd_ps(x##i, b, c);
        REP12(STEP)
#undef STEP
    }
    __m256 s = _mm256_setzero_ps();
#define SUM(i) s = _mm256_add_ps(s, x##i);
    REP12(SUM)
#undef SUM
#undef REP12
    float lanes8[8];
    _mm256_storeu_ps(lanes8, s);
    volatile float sink = lanes8[0];
    (void)sink;
    return (double)iters * 12 * 16;
}

static inline __attribute__((always_inline)) void
gemv_pass(int rows, int64_t n, const float *x, const float *b, int64_t ldb, float *y) {
    __m256 xv[MK_GEMM_GEMV_ROWS];
    for (int r = 0; r < rows; r++) xv[r] = _mm256_set1_ps(x[r]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 acc = _mm256_loadu_ps(y + j);
        for (int r = 0; r < rows; r++)
            acc = _mm256_fmadd_ps(xv[r], _mm256_loadu_ps(b + r * ldb + j), acc);
        _mm256_storeu_ps(y + j, acc);
    }
    if (j < n) {
        const __m256i m = lanes((int)(n - j));
        __m256 acc = _mm256_maskload_ps(y + j, m);
        for (int r = 0; r < rows; r++)
            acc = _mm256_fmadd_ps(xv[r], _mm256_maskload_ps(b + r * ldb + j, m), acc);
        _mm256_maskstore_ps(y + j, m, acc);
    }
}

static void gemv__avx2(int rows, int64_t n, const float *x, const float *b, int64_t ldb,
                       float *y) {
    if (rows == MK_GEMM_GEMV_ROWS) gemv_pass(MK_GEMM_GEMV_ROWS, n, x, b, ldb, y);
    else gemv_pass(rows, n, x, b, ldb, y);
}

/* Two ymm of partial sums per row: lanes 0-7 and 8-15 of the documented order. */
static inline __attribute__((always_inline)) void
dot_pass(int rows, int64_t k, const float *a, int64_t lda, const float *x, float *out) {
    __m256 lo[MK_GEMM_DOT_ROWS], hi[MK_GEMM_DOT_ROWS];
    for (int r = 0; r < rows; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    int64_t q = 0;
    for (; q + 16 <= k; q += 16) {
        const __m256 x0 = _mm256_loadu_ps(x + q), x1 = _mm256_loadu_ps(x + q + 8);
        for (int r = 0; r < rows; r++) {
            lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * lda + q), x0, lo[r]);
            hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * lda + q + 8), x1, hi[r]);
        }
    }
    if (q < k) {   /* the lanes past k keep their sums */
        const int t = (int)(k - q);
        const __m256i m0 = lanes(t < 8 ? t : 8), m1 = lanes(t > 8 ? t - 8 : 0);
        const __m256 x0 = _mm256_maskload_ps(x + q, m0), x1 = _mm256_maskload_ps(x + q + 8, m1);
        for (int r = 0; r < rows; r++) {
            const __m256 f0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + r * lda + q, m0), x0, lo[r]);
            const __m256 f1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + r * lda + q + 8, m1), x1, hi[r]);
            lo[r] = _mm256_blendv_ps(lo[r], f0, _mm256_castsi256_ps(m0));
            hi[r] = _mm256_blendv_ps(hi[r], f1, _mm256_castsi256_ps(m1));
        }
    }
    for (int r = 0; r < rows; r++) {
        const __m256 h = _mm256_add_ps(lo[r], hi[r]);
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        out[r] = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
}

static void dot__avx2(int rows, int64_t k, const float *a, int64_t lda, const float *x,
                      float *out) {
    if (rows == MK_GEMM_DOT_ROWS) dot_pass(MK_GEMM_DOT_ROWS, k, a, lda, x, out);
    else dot_pass(rows, k, a, lda, x, out);
}

const mk_gemm_ukernel mk_gemm_ukernel__avx2 = {MR, gemm_6x32__avx2, "gemm_6x32__avx2",
                                              gemm_6x32_strided__avx2, fma_burn__avx2,
                                              gemv__avx2, NULL, dot__avx2};
