/* AVX-512 (F/BW/DQ/VL) elementwise microkernels: 16 floats per vector, tails through
 * AVX-512 masks. The math and the neuron / arithmetic loops are in elementwise_simd.h. */
#include "elementwise.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define EWN(name) name##__avx512
#include "elementwise_vec__avx512.h"

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

/* RGB in RGBA pixels of 1- or 2-byte elements: 16 bytes of pixels (4 or 2) <-> 12 bytes of
 * runs with one byte shuffle. */
static void runs_rgb__avx512(char *d, const char *s, int pack, int es, int64_t steps) {
    const __m128i pk = es == 1 ? _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1)
                               : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, -1, -1, -1, -1);
    const __m128i up = es == 1 ? _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1)
                               : _mm_setr_epi8(0, 1, 2, 3, 4, 5, -1, -1, 6, 7, 8, 9, 10, 11, -1, -1);
    const __mmask16 px = es == 1 ? 0x7777 : 0x3f3f, run = 0x0fff;
    for (int64_t i = 0; i < steps; i++) {
        if (pack)
            _mm_mask_storeu_epi8(d + 12 * i, run, _mm_shuffle_epi8(_mm_maskz_loadu_epi8(px, s + 16 * i), pk));
        else
            _mm_mask_storeu_epi8(d + 16 * i, px, _mm_shuffle_epi8(_mm_maskz_loadu_epi8(run, s + 12 * i), up));
    }
}

/* One masked load and store a run (up to 64 bytes); RGB in RGBA pixels (runs of 3 elements
 * 4 apart, to or from 3 apart) 16 bytes of pixels at a time: compress / expand for 4-byte
 * elements, a byte shuffle for 1 and 2. */
static void runs__avx512(char *d, int64_t db, const char *s, int64_t sb, int64_t rb, int64_t P) {
    int64_t p = 0;
    if (rb == 3 || rb == 6 || rb == 12) {
        const int es = (int)(rb / 3);
        const int64_t k = es == 4 ? 4 : 4 / es; /* pixels a step */
        if (db == rb && sb == 4 * es) {
            p = P - P % k;
            if (es == 4)
                for (int64_t q = 0; q < p; q += 4)
                    _mm512_mask_storeu_ps(d + q * 12, 0x0fff, _mm512_maskz_compress_ps(
                                          0x7777, _mm512_maskz_loadu_ps(0x7777, s + q * 16)));
            else runs_rgb__avx512(d, s, 1, es, p * rb / 12);
        } else if (db == 4 * es && sb == rb) {
            p = P - P % k;
            if (es == 4)
                for (int64_t q = 0; q < p; q += 4)
                    _mm512_mask_storeu_ps(d + q * 16, 0x7777, _mm512_maskz_expandloadu_ps(0x7777, s + q * 12));
            else runs_rgb__avx512(d, s, 0, es, p * rb / 12);
        }
    }
    if (rb > 64) {
        mk_ew_runs__generic(d + p * db, db, s + p * sb, sb, rb, P - p);
        return;
    }
    const __mmask64 m = rb == 64 ? ~0ULL : (1ULL << rb) - 1ULL;
    for (; p < P; p++) _mm512_mask_storeu_epi8(d + p * db, m, _mm512_maskz_loadu_epi8(m, s + p * sb));
}

static void interleave3__avx512(const uint32_t *a, const uint32_t *b, const uint32_t *c,
                              uint32_t *d, int64_t n) {
    mk_ew_interleave3_loop(a, b, c, d, n);
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
    .runs = runs__avx512,
    .interleave3 = interleave3__avx512,
};

#endif /* MK_X86 */
