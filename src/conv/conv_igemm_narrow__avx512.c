/* The indirect-GEMM tile for a panel's last <= 16 columns on AVX-512: 12 rows x 16 columns.
 * The shared 12x32 micro-kernel issues 24 FMAs per k step whatever nc is, so a panel with
 * nc <= 16 (16 output channels, the last half panel of 144) wastes half of them; this tile
 * issues 12 (12 independent chains still hide the FMA latency on two pipes). Same arguments
 * and indirection layout as mk_gemm_ukernel_fn with MR = 12 (alpha = 1, beta = 0 only), and
 * the same summation order, so its results are bitwise those of the 12x32 kernel. */
#include <immintrin.h>

#include "conv/conv_kernels.h"
#include "gemm/gemm.h"

#define MR 12

#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static inline __attribute__((always_inline)) void
tile_12x16(int mr, int nc, int64_t kc, int64_t ks, const float *const *a, intptr_t a_offset,
           const float *zero, const float *w, float *c, int64_t ldc, const mk_gemm_epilogue *ep) {
    const __mmask16 m = (__mmask16)(nc >= 16 ? 0xffff : (1u << nc) - 1);
#define DECL(i) __m512 c##i = _mm512_setzero_ps();
    REP12(DECL)
#undef DECL
    for (int64_t s = 0; s < ks; s++, a += MR) {
#define ROW(i)                                                                               \
    const float *r##i = zero;                                                                \
    if (i < mr && a[i] != zero) r##i = (const float *)((uintptr_t)a[i] + (uintptr_t)a_offset);
        REP12(ROW)
#undef ROW
        for (int64_t k = 0; k < kc; k++, w += MK_GEMM_NR) {
            const __m512 b = _mm512_loadu_ps(w);
#define FMA(i) if (i < mr) c##i = _mm512_fmadd_ps(_mm512_set1_ps(r##i[k]), b, c##i);
            REP12(FMA)
#undef FMA
        }
    }
    const __m512 lo = _mm512_set1_ps(ep->lo), hi = _mm512_set1_ps(ep->hi);
    const __m512 bias = ep->bias ? _mm512_maskz_loadu_ps(m, ep->bias) : _mm512_setzero_ps();
    /* bias and clamp as the 12x32 kernel applies them (a -0 sum stays -0 without bias) */
#define OUT(i)                                                                               \
    if (i < mr) {                                                                            \
        if (ep->bias) c##i = _mm512_add_ps(c##i, bias);                                      \
        _mm512_mask_storeu_ps(c + i * ldc, m, _mm512_min_ps(hi, _mm512_max_ps(lo, c##i)));   \
    }
    REP12(OUT)
#undef OUT
}

/* One copy per row count, as the 12x32 kernel. */
void ck_igemm_12x16__avx512(int mr, int nc, int64_t kc, int64_t ks, const float *const *a,
                            intptr_t a_offset, const float *zero, const float *w, float *c,
                            int64_t ldc, const mk_gemm_epilogue *ep) {
    switch (mr) {
#define CASE(i) case i + 1: tile_12x16(i + 1, nc, kc, ks, a, a_offset, zero, w, c, ldc, ep); break;
        REP12(CASE)
#undef CASE
    }
}
