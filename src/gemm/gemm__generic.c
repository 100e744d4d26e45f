/* Portable GEMM micro-kernel (no ISA flags; any architecture): 4 rows x 32 columns. */
#include <math.h>

#include "gemm.h"

#define MR 4
#define NR MK_GEMM_NR

/* w: rows ldw floats apart; `masked`: columns >= nc of w may hold anything (unpacked B). */
static void tile_4x32(int mr, int nc, int64_t kc, int64_t ks, const float *const *a,
                      intptr_t a_offset, const float *zero, const float *w, int64_t ldw,
                      int masked, float *c, int64_t ldc, const mk_gemm_epilogue *ep) {
    float acc[MR][NR] = {{0}};
    const int ncols = masked ? nc : NR;
    for (int64_t s = 0; s < ks; s++) {
        const float *row[MR];
        for (int i = 0; i < MR; i++) {   /* rows past mr read the zero buffer, never a[] */
            const float *p = i < mr ? a[s * MR + i] : zero;
            row[i] = p == zero ? zero : (const float *)((uintptr_t)p + (uintptr_t)a_offset);
        }
        for (int64_t k = 0; k < kc; k++, w += ldw)
            for (int i = 0; i < MR; i++) {
                float v = row[i][k];
                for (int j = 0; j < ncols; j++) acc[i][j] += v * w[j];
            }
    }
    const int clamp = ep->lo != -INFINITY || ep->hi != INFINITY;
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        for (int j = 0; j < nc; j++) {
            float v = ep->alpha * acc[i][j];
            if (ep->beta != 0.0f) v += ep->beta * ci[j];
            if (ep->bias) v += ep->bias[j];
            if (clamp) {   /* max then min, as the SIMD paths do: a NaN is kept */
                v = v < ep->lo ? ep->lo : v;
                v = v > ep->hi ? ep->hi : v;
            }
            ci[j] = v;
        }
    }
}

static void gemm_4x32__generic(int mr, int nc, int64_t kc, int64_t ks, const float *const *a,
                               intptr_t a_offset, const float *zero, const float *w, float *c,
                               int64_t ldc, const mk_gemm_epilogue *ep) {
    tile_4x32(mr, nc, kc, ks, a, a_offset, zero, w, NR, 0, c, ldc, ep);
}

static void gemm_4x32_strided__generic(int mr, int nc, int64_t kc, const float *const *a,
                                       const float *zero, const float *w, int64_t ldw, float *c,
                                       int64_t ldc, const mk_gemm_epilogue *ep) {
    tile_4x32(mr, nc, kc, 1, a, 0, zero, w, ldw, 1, c, ldc, ep);
}

/* 16 independent multiply-add chains, in whatever the compiler makes of them. */
static double fma_burn__generic(int64_t iters) {
    float x[16];
    for (int i = 0; i < 16; i++) x[i] = 1.0f + (float)i;
    for (int64_t t = 0; t < iters; t++)
        for (int i = 0; i < 16; i++) x[i] = x[i] * 0.999999f + 1e-7f;
    volatile float sink = x[0] + x[15];
    (void)sink;
    return (double)iters * 16 * 2;
}

static void gemv__generic(int rows, int64_t n, const float *x, const float *b, int64_t ldb,
                          float *y) {
    for (int64_t j = 0; j < n; j++) {
        float s = y[j];
        for (int r = 0; r < rows; r++) s += x[r] * b[r * ldb + j];
        y[j] = s;
    }
}

static void dot__generic(int rows, int64_t k, const float *a, int64_t lda, const float *x,
                         float *out) {
    for (int r = 0; r < rows; r++, a += lda) {
        float s[16] = {0};
        int64_t q = 0;
        for (; q + 16 <= k; q += 16)
            for (int l = 0; l < 16; l++) s[l] += a[q + l] * x[q + l];
        for (int l = 0; q < k; q++, l++) s[l] += a[q] * x[q];
        for (int w = 8; w >= 1; w /= 2)
            for (int l = 0; l < w; l++) s[l] += s[l + w];
        out[r] = s[0];
    }
}

const mk_gemm_ukernel mk_gemm_ukernel__generic = {MR, gemm_4x32__generic, "gemm_4x32__generic",
                                                  gemm_4x32_strided__generic, fma_burn__generic,
                                                  gemv__generic, NULL, dot__generic};
