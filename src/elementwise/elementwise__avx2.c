/* AVX2 + FMA + F16C elementwise microkernels: 8 floats per vector; fp32 tails through
 * vmaskmovps, format tails through a zero-padded stack vector. The math and the neuron /
 * arithmetic loops are in elementwise_simd.h. */
#include "elementwise.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define EWN(name) name##__avx2
#include "elementwise_vec__avx2.h"

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

static void interleave3__avx2(const uint32_t *a, const uint32_t *b, const uint32_t *c,
                              uint32_t *d, int64_t n) {
    mk_ew_interleave3_loop(a, b, c, d, n);
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
    .runs = mk_ew_runs__generic,
    .interleave3 = interleave3__avx2,
};

#endif /* MK_X86 */
