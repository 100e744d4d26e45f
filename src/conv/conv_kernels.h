/* Private to the specialised convolution kernels (conv_winograd*.c, conv_direct*.c,
 * conv_igemm*.c): a few vector operations for the ISA the including file is compiled for,
 * and the per-ISA inner functions. Each kernel's hot code is written once in its
 * `__generic.c` file; the `__avx2.c` / `__avx512.c` files include it again with that ISA's
 * flags, and CK_NAME gives every copy its own suffix. */
#ifndef MK_CONV_KERNELS_H
#define MK_CONV_KERNELS_H

#include <string.h>

#include "conv/conv.h"
#include "gemm/gemm.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define CK_VL 16
#define CK_NAME(f) f##__avx512
typedef __m512 ck_v;
static inline __mmask16 ck_mask(int n) { return (__mmask16)((1u << n) - 1u); }
static inline ck_v ck_load(const float *p) { return _mm512_loadu_ps(p); }
static inline ck_v ck_loadn(const float *p, int n) { return _mm512_maskz_loadu_ps(ck_mask(n), p); }
static inline void ck_store(float *p, ck_v v) { _mm512_storeu_ps(p, v); }
static inline void ck_storen(float *p, ck_v v, int n) { _mm512_mask_storeu_ps(p, ck_mask(n), v); }
static inline ck_v ck_set1(float x) { return _mm512_set1_ps(x); }
static inline ck_v ck_fma(ck_v a, ck_v b, ck_v c) { return _mm512_fmadd_ps(a, b, c); }
static inline ck_v ck_clamp(ck_v v, ck_v lo, ck_v hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CK_VL 8
#define CK_NAME(f) f##__avx2
typedef __m256 ck_v;
static inline __m256i ck_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline ck_v ck_load(const float *p) { return _mm256_loadu_ps(p); }
static inline ck_v ck_loadn(const float *p, int n) { return _mm256_maskload_ps(p, ck_mask(n)); }
static inline void ck_store(float *p, ck_v v) { _mm256_storeu_ps(p, v); }
static inline void ck_storen(float *p, ck_v v, int n) { _mm256_maskstore_ps(p, ck_mask(n), v); }
static inline ck_v ck_set1(float x) { return _mm256_set1_ps(x); }
static inline ck_v ck_fma(ck_v a, ck_v b, ck_v c) { return _mm256_fmadd_ps(a, b, c); }
static inline ck_v ck_clamp(ck_v v, ck_v lo, ck_v hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }
#else   /* portable: GCC/Clang vector extension (SSE2 on x86-64) */
#define CK_VL 4
#define CK_NAME(f) f##__generic
typedef float ck_v __attribute__((vector_size(16)));
static inline ck_v ck_load(const float *p) { ck_v v; memcpy(&v, p, sizeof v); return v; }
static inline ck_v ck_loadn(const float *p, int n) {
    ck_v v = {0, 0, 0, 0};
    for (int i = 0; i < n; i++) v[i] = p[i];
    return v;
}
static inline void ck_store(float *p, ck_v v) { memcpy(p, &v, sizeof v); }
static inline void ck_storen(float *p, ck_v v, int n) {
    for (int i = 0; i < n; i++) p[i] = v[i];
}
static inline ck_v ck_set1(float x) { return (ck_v){x, x, x, x}; }
static inline ck_v ck_fma(ck_v a, ck_v b, ck_v c) { return a * b + c; }
static inline ck_v ck_clamp(ck_v v, ck_v lo, ck_v hi) {
    for (int i = 0; i < 4; i++) {
        float x = v[i] > lo[i] ? v[i] : lo[i];   /* as maxps/minps: NaN gives the bound */
        v[i] = x < hi[i] ? x : hi[i];
    }
    return v;
}
#endif

/* Padding of packed channel vectors: a multiple of every ISA's vector length. */
#define CK_CPAD 16
static inline int64_t ck_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* The ISA the dispatch uses now, as in implementation names. */
static inline const char *ck_isa_name(void) {
    switch (mk_active_isa()) {
    case MK_ISA_AVX512: return "avx512";
    case MK_ISA_AVX2: return "avx2";
    default: return "generic";
    }
}

/* ---- Winograd F(4,3) (conv_winograd*.c) ---- */

/* Input transform of one 6x6 tile, channels [0, cin): px[i*6 + j] is the source pixel of
 * tile row i, column j (NULL: zero); V_xi = (B^T d B)[xi] goes to v + xi*v_xi. */
typedef void (*ck_wino_in_fn)(const float *const *px, int64_t cin, float *v, int64_t v_xi);
/* Output transform of one tile, channels [0, cout): m + xi*m_xi holds M[xi]; out[i*4 + j]
 * receives clamp(A^T M A + bias (+ out[i*4 + j] if acc)) of output row i, column j (NULL:
 * outside, skipped). */
typedef void (*ck_wino_out_fn)(const float *m, int64_t m_xi, int64_t cout, const float *bias,
                               float *const *out, int acc, float lo, float hi);
void ck_wino_in__generic(const float *const *px, int64_t cin, float *v, int64_t v_xi);
void ck_wino_in__avx2(const float *const *px, int64_t cin, float *v, int64_t v_xi);
void ck_wino_in__avx512(const float *const *px, int64_t cin, float *v, int64_t v_xi);
void ck_wino_out__generic(const float *m, int64_t m_xi, int64_t cout, const float *bias,
                          float *const *out, int acc, float lo, float hi);
void ck_wino_out__avx2(const float *m, int64_t m_xi, int64_t cout, const float *bias,
                       float *const *out, int acc, float lo, float hi);
void ck_wino_out__avx512(const float *m, int64_t m_xi, int64_t cout, const float *bias,
                         float *const *out, int acc, float lo, float hi);

/* ---- direct, few input channels (conv_direct*.c) ---- */

/* One run of output pixels along a row, all output channels [0, nc): row pointers per tap
 * row (NULL: zeros), per-pixel tap columns, interior pixels [x0, x1) addressed directly. */
typedef struct ck_direct_row {
    const float *const *rows;  /* kh source rows (channel 0 of pixel 0), NULL = zeros */
    const int32_t *xs;         /* per output pixel kw source columns (-1: zero) */
    int64_t pixel;             /* source element stride between pixels */
    int64_t step, dstep;       /* interior: pixel x + i, tap p at xs[x*kw] + i*step + p*dstep */
    const float *w;            /* packed [tap][cin][ldw] */
    int64_t ldw;
    const float *bias;
    int kh, kw, cin, count, nc, x0, x1;
    float *out;                /* count pixels of nc channels, out_pixel apart */
    int64_t out_pixel;
    int acc;                   /* add what out holds (a residual) before the clamp */
    float lo, hi;
} ck_direct_row;

typedef void (*ck_direct_row_fn)(const ck_direct_row *r);
void ck_direct_row__generic(const ck_direct_row *r);
void ck_direct_row__avx2(const ck_direct_row *r);
void ck_direct_row__avx512(const ck_direct_row *r);

#endif
