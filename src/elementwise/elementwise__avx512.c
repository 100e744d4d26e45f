/* AVX-512 (F/BW/DQ/VL) elementwise microkernels: 16 floats per vector, tails through
 * AVX-512 masks. The math and the neuron / arithmetic loops are in elementwise_simd.h. */
#include "elementwise.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define EWN(name) name##__avx512
#define VL 16

typedef __m512 V;
typedef __m512i VI;
typedef __mmask16 M;
typedef __m512d VD;
typedef __mmask8 MD;

static inline __mmask16 ew_tail16(int r) { return (__mmask16)((1u << r) - 1u); }

#define v_load(p) _mm512_loadu_ps(p)
#define v_store(p, v) _mm512_storeu_ps((p), (v))
#define v_load_n(p, r) _mm512_maskz_loadu_ps(ew_tail16(r), (p))
#define v_store_n(p, v, r) _mm512_mask_storeu_ps((p), ew_tail16(r), (v))
#define v_set1(x) _mm512_set1_ps(x)
#define v_zero() _mm512_setzero_ps()
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_fma _mm512_fmadd_ps
#define v_fms _mm512_fmsub_ps
#define v_fnma _mm512_fnmadd_ps
#define v_min _mm512_min_ps
#define v_max _mm512_max_ps
#define v_and _mm512_and_ps
#define v_andnot _mm512_andnot_ps
#define v_or _mm512_or_ps
#define v_xor _mm512_xor_ps
#define v_round(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_cvt_i(x) _mm512_cvtps_epi32(x)
#define v_cvti_f(x) _mm512_cvtepi32_ps(x)
#define v_castf(x) _mm512_castsi512_ps(x)
#define v_casti(x) _mm512_castps_si512(x)
#define m_lt(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_LT_OQ)
#define m_gt(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_GT_OQ)
#define m_ge(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_GE_OQ)
#define m_eq(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_EQ_OQ)
#define m_and(a, b) ((__mmask16)((a) & (b)))
#define v_sel(m, t, f) _mm512_mask_blend_ps((m), (f), (t))
#define vi_set1(x) _mm512_set1_epi32(x)
#define vi_add _mm512_add_epi32
#define vi_sub _mm512_sub_epi32
#define vi_and _mm512_and_si512
#define vi_slli(x, k) _mm512_slli_epi32((x), (k))
#define vi_srli(x, k) _mm512_srli_epi32((x), (k))
#define vi_srai(x, k) _mm512_srai_epi32((x), (k))

#define vd_set1(x) _mm512_set1_pd(x)
#define vd_add _mm512_add_pd
#define vd_sub _mm512_sub_pd
#define vd_mul _mm512_mul_pd
#define vd_div _mm512_div_pd
#define vd_fma _mm512_fmadd_pd
#define vd_min _mm512_min_pd
#define vd_max _mm512_max_pd
#define vd_and _mm512_and_pd
#define vd_andnot _mm512_andnot_pd
#define vd_xor _mm512_xor_pd
#define vd_round(x) _mm512_roundscale_pd((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vd_castf(x) _mm512_castsi512_pd(x)
#define vd_casti(x) _mm512_castpd_si512(x)
#define md_lt(a, b) _mm512_cmp_pd_mask((a), (b), _CMP_LT_OQ)
#define md_gt(a, b) _mm512_cmp_pd_mask((a), (b), _CMP_GT_OQ)
#define md_eq(a, b) _mm512_cmp_pd_mask((a), (b), _CMP_EQ_OQ)
#define md_and(a, b) ((__mmask8)((a) & (b)))
#define vd_sel(m, t, f) _mm512_mask_blend_pd((m), (f), (t))
#define vl_set1(x) _mm512_set1_epi64(x)
#define vl_add _mm512_add_epi64
#define vl_and _mm512_and_si512
#define vl_or _mm512_or_si512
#define vl_slli(x, k) _mm512_slli_epi64((x), (k))
#define vl_srli(x, k) _mm512_srli_epi64((x), (k))

static inline void v_split_d(V x, VD *lo, VD *hi) {
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    *hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}
static inline V v_join_d(VD lo, VD hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo)), _mm512_cvtpd_ps(hi), 1);
}

#include "elementwise_simd.h"

/* ---- format load / store ------------------------------------------------------------- */

static inline V ld_u8(const uint8_t *s, __mmask16 m) {
    return v_div(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s))),
                 v_set1(255.0f));
}
static inline V ld_u16(const uint16_t *s, __mmask16 m) {
    return v_div(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s))),
                 v_set1(65535.0f));
}
static inline V ld_f16(const uint16_t *s, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s));
}
static inline V ld_bf16(const uint16_t *s, __mmask16 m) {
    return v_castf(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s)), 16));
}

#define EW_LOADER(NAME, T, LD)                                                           \
    static void NAME##__avx512(const void *src, float *dst, int64_t n) {                 \
        const T *s = (const T *)src;                                                     \
        int64_t i = 0;                                                                   \
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, LD(s + i, 0xffff));       \
        if (i < n) {                                                                     \
            __mmask16 m = ew_tail16((int)(n - i));                                       \
            _mm512_mask_storeu_ps(dst + i, m, LD(s + i, m));                             \
        }                                                                                \
    }
EW_LOADER(load_u8, uint8_t, ld_u8)
EW_LOADER(load_u16, uint16_t, ld_u16)
EW_LOADER(load_f16, uint16_t, ld_f16)
EW_LOADER(load_bf16, uint16_t, ld_bf16)

static void load_f32__avx512(const void *src, float *dst, int64_t n) {
    if ((const void *)dst != src) memmove(dst, src, (size_t)n * sizeof(float));
}
static void store_f32__avx512(const float *src, void *dst, int64_t n) {
    if ((void *)src != dst) memmove(dst, src, (size_t)n * sizeof(float));
}

/* round half even of clamp(x, 0, 1) * scale; NaN -> 0 (maxps returns the 2nd operand) */
static inline __m512i unorm_q(V x, float scale) {
    V v = _mm512_min_ps(_mm512_max_ps(x, v_zero()), v_set1(1.0f));
    return _mm512_cvt_roundps_epi32(v_mul(v, v_set1(scale)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline __m512i bf16_q(V x) {
    __m512i u = v_casti(x);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __m512i qn = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, qn);
}

static void store_u8__avx512(const float *src, void *dst, int64_t n) {
    uint8_t *d = (uint8_t *)dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm_storeu_si128((__m128i *)(d + i), _mm512_cvtepi32_epi8(unorm_q(v_load(src + i), 255.0f)));
    if (i < n) {
        __mmask16 m = ew_tail16((int)(n - i));
        _mm512_mask_cvtepi32_storeu_epi8(d + i, m, unorm_q(_mm512_maskz_loadu_ps(m, src + i), 255.0f));
    }
}
static void store_u16__avx512(const float *src, void *dst, int64_t n) {
    uint16_t *d = (uint16_t *)dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i),
                            _mm512_cvtepi32_epi16(unorm_q(v_load(src + i), 65535.0f)));
    if (i < n) {
        __mmask16 m = ew_tail16((int)(n - i));
        _mm512_mask_cvtepi32_storeu_epi16(d + i, m,
                                          unorm_q(_mm512_maskz_loadu_ps(m, src + i), 65535.0f));
    }
}
static void store_f16__avx512(const float *src, void *dst, int64_t n) {
    uint16_t *d = (uint16_t *)dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtps_ph(v_load(src + i), 0));
    if (i < n) {
        __mmask16 m = ew_tail16((int)(n - i));
        _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), 0));
    }
}
static void store_bf16__avx512(const float *src, void *dst, int64_t n) {
    uint16_t *d = (uint16_t *)dst;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(d + i), _mm512_cvtepi32_epi16(bf16_q(v_load(src + i))));
    if (i < n) {
        __mmask16 m = ew_tail16((int)(n - i));
        _mm512_mask_cvtepi32_storeu_epi16(d + i, m, bf16_q(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

static void fill__avx512(void *dst, int64_t n, uint32_t bits, int esize) {
    __m512i v = esize == 1 ? _mm512_set1_epi8((char)bits)
              : esize == 2 ? _mm512_set1_epi16((short)bits) : _mm512_set1_epi32((int)bits);
    uint8_t *d = (uint8_t *)dst;
    int64_t nb = n * esize, i = 0;
    for (; i + 64 <= nb; i += 64) _mm512_storeu_si512((void *)(d + i), v);
    if (i < nb) {
        __mmask64 m = (__mmask64)((1ULL << (nb - i)) - 1ULL); /* nb - i < 64 */
        _mm512_mask_storeu_epi8(d + i, m, v);
    }
}

const mk_ew_kernels mk_ew_kernels__avx512 = {
    .name = "avx512",
    .load = {NULL, load_u8__avx512, load_u16__avx512, load_f16__avx512, load_f32__avx512,
             load_bf16__avx512},
    .store = {NULL, store_u8__avx512, store_u16__avx512, store_f16__avx512, store_f32__avx512,
              store_bf16__avx512},
    .neuron = EW_TABLE_NEURONS,
    .arith = EW_TABLE_ARITH,
    .fill = fill__avx512,
};

#endif /* MK_X86 */
