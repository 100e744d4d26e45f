/* AVX2 + FMA + F16C elementwise microkernels: 8 floats per vector; fp32 tails through
 * vmaskmovps, format tails through a zero-padded stack vector. The math and the neuron /
 * arithmetic loops are in elementwise_simd.h. */
#include "elementwise.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define EWN(name) name##__avx2
#define VL 8

typedef __m256 V;
typedef __m256i VI;
typedef __m256 M;
typedef __m256d VD;
typedef __m256d MD;

static inline __m256i ew_tail8(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define v_load(p) _mm256_loadu_ps(p)
#define v_store(p, v) _mm256_storeu_ps((p), (v))
#define v_load_n(p, r) _mm256_maskload_ps((p), ew_tail8(r))
#define v_store_n(p, v, r) _mm256_maskstore_ps((p), ew_tail8(r), (v))
#define v_set1(x) _mm256_set1_ps(x)
#define v_zero() _mm256_setzero_ps()
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_fma _mm256_fmadd_ps
#define v_fms _mm256_fmsub_ps
#define v_fnma _mm256_fnmadd_ps
#define v_min _mm256_min_ps
#define v_max _mm256_max_ps
#define v_and _mm256_and_ps
#define v_andnot _mm256_andnot_ps
#define v_or _mm256_or_ps
#define v_xor _mm256_xor_ps
#define v_round(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_cvt_i(x) _mm256_cvtps_epi32(x)
#define v_cvti_f(x) _mm256_cvtepi32_ps(x)
#define v_castf(x) _mm256_castsi256_ps(x)
#define v_casti(x) _mm256_castps_si256(x)
#define m_lt(a, b) _mm256_cmp_ps((a), (b), _CMP_LT_OQ)
#define m_gt(a, b) _mm256_cmp_ps((a), (b), _CMP_GT_OQ)
#define m_ge(a, b) _mm256_cmp_ps((a), (b), _CMP_GE_OQ)
#define m_eq(a, b) _mm256_cmp_ps((a), (b), _CMP_EQ_OQ)
#define m_and(a, b) _mm256_and_ps((a), (b))
#define v_sel(m, t, f) _mm256_blendv_ps((f), (t), (m))
#define vi_set1(x) _mm256_set1_epi32(x)
#define vi_add _mm256_add_epi32
#define vi_sub _mm256_sub_epi32
#define vi_and _mm256_and_si256
#define vi_slli(x, k) _mm256_slli_epi32((x), (k))
#define vi_srli(x, k) _mm256_srli_epi32((x), (k))
#define vi_srai(x, k) _mm256_srai_epi32((x), (k))

#define vd_set1(x) _mm256_set1_pd(x)
#define vd_add _mm256_add_pd
#define vd_sub _mm256_sub_pd
#define vd_mul _mm256_mul_pd
#define vd_div _mm256_div_pd
#define vd_fma _mm256_fmadd_pd
#define vd_min _mm256_min_pd
#define vd_max _mm256_max_pd
#define vd_and _mm256_and_pd
#define vd_andnot _mm256_andnot_pd
#define vd_xor _mm256_xor_pd
#define vd_round(x) _mm256_round_pd((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vd_castf(x) _mm256_castsi256_pd(x)
#define vd_casti(x) _mm256_castpd_si256(x)
#define md_lt(a, b) _mm256_cmp_pd((a), (b), _CMP_LT_OQ)
#define md_gt(a, b) _mm256_cmp_pd((a), (b), _CMP_GT_OQ)
#define md_eq(a, b) _mm256_cmp_pd((a), (b), _CMP_EQ_OQ)
#define md_and(a, b) _mm256_and_pd((a), (b))
#define vd_sel(m, t, f) _mm256_blendv_pd((f), (t), (m))
#define vl_set1(x) _mm256_set1_epi64x(x)
#define vl_add _mm256_add_epi64
#define vl_and _mm256_and_si256
#define vl_or _mm256_or_si256
#define vl_slli(x, k) _mm256_slli_epi64((x), (k))
#define vl_srli(x, k) _mm256_srli_epi64((x), (k))

static inline void v_split_d(V x, VD *lo, VD *hi) {
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
}
static inline V v_join_d(VD lo, VD hi) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1);
}

#include "elementwise_simd.h"

/* ---- format load / store ------------------------------------------------------------- */
/* 8 elements at s (full vector); tails copy into a zeroed 8-element buffer first. */

static inline V ld_u8(const void *s) {
    __m128i b = _mm_loadl_epi64((const __m128i *)s);
    return v_div(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), v_set1(255.0f));
}
static inline V ld_u16(const void *s) {
    __m128i b = _mm_loadu_si128((const __m128i *)s);
    return v_div(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(b)), v_set1(65535.0f));
}
static inline V ld_f16(const void *s) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s)); }
static inline V ld_bf16(const void *s) {
    __m128i b = _mm_loadu_si128((const __m128i *)s);
    return v_castf(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

#define EW_LOADER(NAME, ES, LD)                                                          \
    static void NAME##__avx2(const void *src, float *dst, int64_t n) {                   \
        const uint8_t *s = (const uint8_t *)src;                                         \
        int64_t i = 0;                                                                   \
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LD(s + i * ES));            \
        if (i < n) {                                                                     \
            int r = (int)(n - i);                                                        \
            _Alignas(32) uint8_t buf[8 * ES];                                            \
            memset(buf, 0, sizeof buf);                                                  \
            memcpy(buf, s + i * ES, (size_t)r * ES);                                     \
            v_store_n(dst + i, LD(buf), r);                                              \
        }                                                                                \
    }
EW_LOADER(load_u8, 1, ld_u8)
EW_LOADER(load_u16, 2, ld_u16)
EW_LOADER(load_f16, 2, ld_f16)
EW_LOADER(load_bf16, 2, ld_bf16)

static void load_f32__avx2(const void *src, float *dst, int64_t n) {
    if ((const void *)dst != src) memmove(dst, src, (size_t)n * sizeof(float));
}
static void store_f32__avx2(const float *src, void *dst, int64_t n) {
    if ((void *)src != dst) memmove(dst, src, (size_t)n * sizeof(float));
}

/* 8 x int32 (each 0..65535) -> 8 x uint16 */
static inline __m128i pack16(__m256i v) {
    return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}
/* round half even of clamp(x, 0, 1) * scale; NaN -> 0 (maxps returns the 2nd operand) */
static inline __m256i unorm_q(V x, float scale) {
    V v = _mm256_min_ps(_mm256_max_ps(x, v_zero()), v_set1(1.0f));
    return _mm256_cvtps_epi32(v_mul(v, v_set1(scale))); /* MXCSR: round to nearest even */
}
static inline __m256i bf16_q(V x) {
    __m256i u = v_casti(x);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qn),
                                                _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

static inline void st_u8(void *d, V x) {
    __m128i p = pack16(unorm_q(x, 255.0f));
    _mm_storel_epi64((__m128i *)d, _mm_packus_epi16(p, p));
}
static inline void st_u16(void *d, V x) { _mm_storeu_si128((__m128i *)d, pack16(unorm_q(x, 65535.0f))); }
static inline void st_f16(void *d, V x) { _mm_storeu_si128((__m128i *)d, _mm256_cvtps_ph(x, 0)); }
static inline void st_bf16(void *d, V x) { _mm_storeu_si128((__m128i *)d, pack16(bf16_q(x))); }

#define EW_STORER(NAME, ES, ST)                                                          \
    static void NAME##__avx2(const float *src, void *dst, int64_t n) {                   \
        uint8_t *d = (uint8_t *)dst;                                                     \
        int64_t i = 0;                                                                   \
        for (; i + 8 <= n; i += 8) ST(d + i * ES, v_load(src + i));                      \
        if (i < n) {                                                                     \
            int r = (int)(n - i);                                                        \
            _Alignas(32) uint8_t buf[8 * ES];                                            \
            ST(buf, v_load_n(src + i, r));                                               \
            memcpy(d + i * ES, buf, (size_t)r * ES);                                     \
        }                                                                                \
    }
EW_STORER(store_u8, 1, st_u8)
EW_STORER(store_u16, 2, st_u16)
EW_STORER(store_f16, 2, st_f16)
EW_STORER(store_bf16, 2, st_bf16)

static void fill__avx2(void *dst, int64_t n, uint32_t bits, int esize) {
    __m256i v = esize == 1 ? _mm256_set1_epi8((char)bits)
              : esize == 2 ? _mm256_set1_epi16((short)bits) : _mm256_set1_epi32((int)bits);
    uint8_t *d = (uint8_t *)dst;
    int64_t nb = n * esize, i = 0;
    for (; i + 32 <= nb; i += 32) _mm256_storeu_si256((__m256i *)(d + i), v);
    if (i < nb) {
        _Alignas(32) uint8_t buf[32];
        _mm256_store_si256((__m256i *)buf, v);
        memcpy(d + i, buf, (size_t)(nb - i));
    }
}

const mk_ew_kernels mk_ew_kernels__avx2 = {
    .name = "avx2",
    .load = {NULL, load_u8__avx2, load_u16__avx2, load_f16__avx2, load_f32__avx2,
             load_bf16__avx2},
    .store = {NULL, store_u8__avx2, store_u16__avx2, store_f16__avx2, store_f32__avx2,
              store_bf16__avx2},
    .neuron = EW_TABLE_NEURONS,
    .arith = EW_TABLE_ARITH,
    .fill = fill__avx2,
};

#endif /* MK_X86 */
