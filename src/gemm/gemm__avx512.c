/* AVX-512 GEMM micro-kernel: 12 rows x 32 columns (24 zmm accumulators, 2 for B, 1 for the
 * broadcast A value: 27 of 32 registers). Each k step issues 24 FMAs for 2 B loads and 12
 * broadcasts (folded into the FMAs when A is packed), so the two FMA units are the bound. */
#include <immintrin.h>
#include <math.h>

#include "gemm.h"

#define MR 12
#define NR MK_GEMM_NR

#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
/* The same with the registers the packed loop pins each row's two accumulators to. */
#define REP12R(X)                                                                            \
    X(0, "zmm2", "zmm3") X(1, "zmm4", "zmm5") X(2, "zmm6", "zmm7") X(3, "zmm8", "zmm9")       \
    X(4, "zmm10", "zmm11") X(5, "zmm12", "zmm13") X(6, "zmm14", "zmm15")                      \
    X(7, "zmm16", "zmm17") X(8, "zmm18", "zmm19") X(9, "zmm20", "zmm21")                      \
    X(10, "zmm22", "zmm23") X(11, "zmm24", "zmm25")

/* acc += broadcast(*p) * b with the broadcast folded into the FMA ({1to16}: one instruction
 * instead of two; GCC broadcasts into a register first when the value has two uses). */
#define FMADD_BCAST(acc, p, b)                                                               \
    __asm__("vfmadd231ps %1%{1to16%}, %2, %0" : "+v"(acc) : "m"(*(p)), "v"(b))

/* `masked`: columns >= nc of w may hold anything (an unpacked B); else they are zeros.
 * `pa` != NULL: A packed (rows MK_GEMM_PACKED_LDA floats apart; ks = 1), `a` unused. */
static inline __attribute__((always_inline)) void
tile_12x32(int mr, int nc, int64_t kc, int64_t ks, const float *const *a, intptr_t a_offset,
           const float *zero, const float *w, int64_t ldw, int masked, int half, float *c,
           int64_t ldc, const mk_gemm_epilogue *ep, const float *pa) {
    __mmask16 m0 = (__mmask16)(nc >= 16 ? 0xffff : (1u << nc) - 1);
    __mmask16 m1 = (__mmask16)(nc >= 32 ? 0xffff : nc <= 16 ? 0 : (1u << (nc - 16)) - 1);
    const int use_beta = ep->beta != 0.0f;
    if (use_beta)   /* C is read at the end: fetch it while the FMAs run */
        for (int i = 0; i < mr; i++) {
            _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + i * ldc + nc - 1), _MM_HINT_T0);
        }
#define DECL(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
    REP12(DECL)
#undef DECL
    if (pa) {
        /* 24 FMAs (broadcast folded in), 2 loads of B, 2 prefetches and the loop (2 k steps
         * per pass): 30.5 instructions per k step instead of 42. The accumulators and B are
         * pinned to registers: with asm operands GCC otherwise shuffles them with moves. */
#define PIN(i, r0, r1)                                                                       \
    register __m512 p##i##0 __asm__(r0) = c##i##0;                                           \
    register __m512 p##i##1 __asm__(r1) = c##i##1;
        REP12R(PIN)
#undef PIN
#define STEP(d)                                                                              \
    {                                                                                        \
        const int64_t off = d;                                                               \
        _mm_prefetch((const char *)(w + (8 + d) * NR), _MM_HINT_T0);                         \
        _mm_prefetch((const char *)(w + (8 + d) * NR + 16), _MM_HINT_T0);                    \
        register __m512 b0 __asm__("zmm0") = _mm512_loadu_ps(w + d * NR);                    \
        register __m512 b1 __asm__("zmm1") = half ? b0 : _mm512_loadu_ps(w + d * NR + 16);   \
        REP12R(FMA)                                                                          \
    }
#define FMA(i, r0, r1)                                                                       \
    if (i < mr) {                                                                            \
        FMADD_BCAST(p##i##0, pa + off + i * MK_GEMM_PACKED_LDA, b0);                         \
        if (!half) FMADD_BCAST(p##i##1, pa + off + i * MK_GEMM_PACKED_LDA, b1);              \
    }
        int64_t k = 0;
        for (; k + 2 <= kc; k += 2, pa += 2, w += 2 * NR) {   /* 1024^3, 2048^3: 1.3% faster */
            STEP(0)
            STEP(1)
        }
        if (k < kc) STEP(0)
#undef FMA
#undef STEP
#define UNPIN(i, r0, r1) c##i##0 = p##i##0, c##i##1 = p##i##1;
        REP12R(UNPIN)
#undef UNPIN
    } else for (int64_t s = 0; s < ks; s++, a += MR) {
#define ROW(i)                                                                               \
    const float *r##i = zero;                                                                \
    if (i < mr && a[i] != zero) r##i = (const float *)((uintptr_t)a[i] + (uintptr_t)a_offset);
        REP12(ROW)
#undef ROW
        for (int64_t k = 0; k < kc; k++, w += ldw) {
            __m512 b0, b1 = _mm512_setzero_ps();
            if (masked) {   /* B in place: rows far apart, help the prefetcher */
                _mm_prefetch((const char *)(w + 16 * ldw), _MM_HINT_T0);
                _mm_prefetch((const char *)(w + 16 * ldw + 16), _MM_HINT_T0);
                b0 = _mm512_maskz_loadu_ps(m0, w);
                b1 = _mm512_maskz_loadu_ps(m1, w + 16);
            } else {   /* the panel (kc x 128 bytes, about the L1's size) comes from L2 */
                _mm_prefetch((const char *)(w + 8 * NR), _MM_HINT_T0);
                _mm_prefetch((const char *)(w + 8 * NR + 16), _MM_HINT_T0);
                b0 = _mm512_loadu_ps(w);
                if (!half) b1 = _mm512_loadu_ps(w + 16);
            }
#define FMA(i)                                                                               \
    {                                                                                        \
        __m512 v = _mm512_set1_ps(r##i[k]);                                                  \
        c##i##0 = _mm512_fmadd_ps(v, b0, c##i##0);                                           \
        if (!half) c##i##1 = _mm512_fmadd_ps(v, b1, c##i##1);                                \
    }
            REP12(FMA)
#undef FMA
        }
    }
    const __m512 alpha = _mm512_set1_ps(ep->alpha), beta = _mm512_set1_ps(ep->beta);
    const __m512 lo = _mm512_set1_ps(ep->lo), hi = _mm512_set1_ps(ep->hi);
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (ep->bias) {
        bias0 = _mm512_maskz_loadu_ps(m0, ep->bias);
        bias1 = _mm512_maskz_loadu_ps(m1, ep->bias + 16);
    }
    const int scale = ep->alpha != 1.0f, clamp = ep->lo != -INFINITY || ep->hi != INFINITY;
    /* First every load of C (into the accumulators), then every store: a load of row i + 1
     * after the store of row i would wait for it when ldc is a multiple of 1024 floats (their
     * addresses agree in the low 12 bits, "4K aliasing"). */
#define SCALE(i)                                                                             \
    if (i < mr) {                                                                            \
        const float *ci = c + i * ldc;                                                       \
        if (scale) {                                                                         \
            c##i##0 = _mm512_mul_ps(alpha, c##i##0);                                         \
            c##i##1 = _mm512_mul_ps(alpha, c##i##1);                                         \
        }                                                                                    \
        if (use_beta) {                                                                      \
            c##i##0 = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(m0, ci), c##i##0);         \
            if (!half)                                                                       \
                c##i##1 = _mm512_fmadd_ps(beta, _mm512_maskz_loadu_ps(m1, ci + 16), c##i##1); \
        }                                                                                    \
    }
    REP12(SCALE)
#undef SCALE
    /* max(lo, v), min(hi, v): a NaN in v is kept (the second operand is returned) */
#define OUT(i)                                                                               \
    if (i < mr) {                                                                            \
        float *ci = c + i * ldc;                                                             \
        __m512 v0 = c##i##0, v1 = c##i##1;                                                   \
        if (ep->bias) {                                                                      \
            v0 = _mm512_add_ps(v0, bias0);                                                   \
            v1 = _mm512_add_ps(v1, bias1);                                                   \
        }                                                                                    \
        if (clamp) {                                                                         \
            v0 = _mm512_min_ps(hi, _mm512_max_ps(lo, v0));                                   \
            v1 = _mm512_min_ps(hi, _mm512_max_ps(lo, v1));                                   \
        }                                                                                    \
        _mm512_mask_storeu_ps(ci, m0, v0);                                                   \
        if (!half) _mm512_mask_storeu_ps(ci + 16, m1, v1);                                   \
    }
    REP12(OUT)
#undef OUT
}

/* One copy per row count: a short tile (the last rows of a matrix) then issues only the
 * FMAs of its own rows instead of 12. A panel's last <= 16 columns (16 output channels, the
 * last half panel of 144) take the half-width copy: 12 FMAs per k step instead of 24, the
 * same summation order, so the same bits. */
static void gemm_12x32__avx512(int mr, int nc, int64_t kc, int64_t ks, const float *const *a,
                               intptr_t a_offset, const float *zero, const float *w, float *c,
                               int64_t ldc, const mk_gemm_epilogue *ep) {
    if (nc <= 16)
        switch (mr) {
#define CASE(i)                                                                              \
    case i + 1:                                                                              \
        tile_12x32(i + 1, nc, kc, ks, a, a_offset, zero, w, NR, 0, 1, c, ldc, ep, NULL);     \
        break;
            REP12(CASE)
#undef CASE
        }
    else
        switch (mr) {
#define CASE(i)                                                                              \
    case i + 1:                                                                              \
        tile_12x32(i + 1, nc, kc, ks, a, a_offset, zero, w, NR, 0, 0, c, ldc, ep, NULL);     \
        break;
            REP12(CASE)
#undef CASE
        }
}

/* A packed by the caller (rows MK_GEMM_PACKED_LDA floats apart). */
static void gemm_12x32_packed__avx512(int mr, int nc, int64_t kc, const float *pa,
                                     const float *w, float *c, int64_t ldc,
                                     const mk_gemm_epilogue *ep) {
    if (!pa) __builtin_unreachable();   /* so that the row-pointer loop is not compiled in */
    if (nc <= 16)
        switch (mr) {
#define CASE(i)                                                                              \
    case i + 1: tile_12x32(i + 1, nc, kc, 1, NULL, 0, NULL, w, NR, 0, 1, c, ldc, ep, pa); break;
            REP12(CASE)
#undef CASE
        }
    else
        switch (mr) {
#define CASE(i)                                                                              \
    case i + 1: tile_12x32(i + 1, nc, kc, 1, NULL, 0, NULL, w, NR, 0, 0, c, ldc, ep, pa); break;
            REP12(CASE)
#undef CASE
        }
}

/* B read in place (rows ldw floats apart, columns past nc never touched). */
static void gemm_12x32_strided__avx512(int mr, int nc, int64_t kc, const float *const *a,
                                       const float *zero, const float *w, int64_t ldw, float *c,
                                       int64_t ldc, const mk_gemm_epilogue *ep) {
    switch (mr) {
#define CASE(i)                                                                              \
    case i + 1: tile_12x32(i + 1, nc, kc, 1, a, 0, zero, w, ldw, 1, 0, c, ldc, ep, NULL); break;
        REP12(CASE)
#undef CASE
    }
}

/* 12 independent FMA chains (latency 4 x 1 zmm FMA per cycle needs >= 4). */
static double fma_burn__avx512(int64_t iters) {
    const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
#define INIT(i) __m512 x##i = _mm512_set1_ps(1.0f + i);
    REP12(INIT)
#undef INIT
    for (int64_t t = 0; t < iters; t++) {
#define STEP(i) x##i = _mm512_fmadd_ps(x##i, b, c);
        REP12(STEP)
#undef STEP
    }
    __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, x##i);
    REP12(SUM)
#undef SUM
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return (double)iters * 12 * 32;
}

static inline __attribute__((always_inline)) void
gemv_pass(int rows, int64_t n, const float *x, const float *b, int64_t ldb, float *y) {
    __m512 xv[MK_GEMM_GEMV_ROWS];
    for (int r = 0; r < rows; r++) xv[r] = _mm512_set1_ps(x[r]);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 acc = _mm512_loadu_ps(y + j);
        for (int r = 0; r < rows; r++)
            acc = _mm512_fmadd_ps(xv[r], _mm512_loadu_ps(b + r * ldb + j), acc);
        _mm512_storeu_ps(y + j, acc);
    }
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 acc = _mm512_maskz_loadu_ps(m, y + j);
        for (int r = 0; r < rows; r++)
            acc = _mm512_fmadd_ps(xv[r], _mm512_maskz_loadu_ps(m, b + r * ldb + j), acc);
        _mm512_mask_storeu_ps(y + j, m, acc);
    }
}

static void gemv__avx512(int rows, int64_t n, const float *x, const float *b, int64_t ldb,
                         float *y) {
    if (rows == MK_GEMM_GEMV_ROWS) gemv_pass(MK_GEMM_GEMV_ROWS, n, x, b, ldb, y);
    else gemv_pass(rows, n, x, b, ldb, y);
}

/* One zmm of 16 partial sums per row: lane l is sum l of the documented order. With four rows
 * four FMA chains run side by side, and x is loaded once for all of them. */
static inline __attribute__((always_inline)) void
dot_pass(int rows, int64_t k, const float *a, int64_t lda, const float *x, float *out) {
    __m512 s[MK_GEMM_DOT_ROWS];
    for (int r = 0; r < rows; r++) s[r] = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + 16 <= k; q += 16) {
        const __m512 xv = _mm512_loadu_ps(x + q);
        for (int r = 0; r < rows; r++) s[r] = _mm512_fmadd_ps(_mm512_loadu_ps(a + r * lda + q), xv, s[r]);
    }
    if (q < k) {   /* the lanes past k keep their sums (merge masking) */
        const __mmask16 m = (__mmask16)((1u << (k - q)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + q);
        for (int r = 0; r < rows; r++)
            s[r] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(m, a + r * lda + q), xv, s[r], m);
    }
    for (int r = 0; r < rows; r++) {
        __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s[r]), _mm512_extractf32x8_ps(s[r], 1));
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        out[r] = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    }
}

static void dot__avx512(int rows, int64_t k, const float *a, int64_t lda, const float *x,
                        float *out) {
    if (rows == MK_GEMM_DOT_ROWS) dot_pass(MK_GEMM_DOT_ROWS, k, a, lda, x, out);
    else dot_pass(rows, k, a, lda, x, out);
}

const mk_gemm_ukernel mk_gemm_ukernel__avx512 = {MR, gemm_12x32__avx512, "gemm_12x32__avx512",
                                                 gemm_12x32_strided__avx512, fma_burn__avx512,
                                                 gemv__avx512, gemm_12x32_packed__avx512,
                                                 dot__avx512};
