/* AVX-512 reduction microkernels: the 16 logical lanes are one zmm; tails through masks.
 * The loops are in reduce_simd.h. */
#include "reduce.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>

#define RDN(name) name##__avx512
#define VL 16

typedef __m512 L;
typedef __m512 V;

static inline __mmask16 rd_tail(int r) { return (__mmask16)((1u << r) - 1u); }

/* a < b ? a : b (vminps), except where a is NaN: a stays. */
static inline __m512 l_min(__m512 a, __m512 b) {
    return _mm512_mask_min_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a, b);
}
static inline __m512 l_max(__m512 a, __m512 b) {
    return _mm512_mask_max_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a, b);
}
#define l_add _mm512_add_ps
#define l_mul _mm512_mul_ps
#define l_load(p) _mm512_loadu_ps(p)
#define l_load_n(p, r, fill) _mm512_mask_loadu_ps(_mm512_set1_ps(fill), rd_tail(r), (p))
#define l_ne0(x) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask((x), _mm512_setzero_ps(), _CMP_NEQ_UQ), \
                                     _mm512_set1_ps(1.0f))

#define l_set1 _mm512_set1_ps
#define l_eqmask(v, m) ((unsigned)_mm512_cmp_ps_mask((v), (m), _CMP_EQ_OQ))
#define l_nanmask(v) ((unsigned)_mm512_cmp_ps_mask((v), (v), _CMP_UNORD_Q))

/* a OP b on 4 / 8 lanes; min / max keep a NaN in a (unless v is known to hold none) */
static inline __attribute__((always_inline)) __m128 h_op(int op, int nan, __m128 a, __m128 b) {
    if (op == MK_REDUCE_SUM) return _mm_add_ps(a, b);
    const __m128 m = op == MK_REDUCE_MIN ? _mm_min_ps(a, b) : _mm_max_ps(a, b);
    return nan ? _mm_blendv_ps(a, m, _mm_cmpord_ps(a, a)) : m;
}
static inline __attribute__((always_inline)) __m256 h_op8(int op, int nan, __m256 a, __m256 b) {
    if (op == MK_REDUCE_SUM) return _mm256_add_ps(a, b);
    const __m256 m = op == MK_REDUCE_MIN ? _mm256_min_ps(a, b) : _mm256_max_ps(a, b);
    return nan ? _mm256_blendv_ps(a, m, _mm256_cmp_ps(a, a, _CMP_ORD_Q)) : m;
}
static inline __attribute__((always_inline)) float fold(int op, int nan, __m512 v) {
    __m256 a = h_op8(op, nan, _mm512_castps512_ps256(v),
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = h_op(op, nan, _mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = h_op(op, nan, b, _mm_movehl_ps(b, b));
    b = h_op(op, nan, b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(b);
}
/* lanes k with k+8, k+4, k+2, k+1. Without a NaN in v, min / max are the plain vminps /
 * vmaxps (a < b ? a : b, as l_min / l_max then), without a compare and blend at each level:
 * channel max of 1.6 MB in L2 77-79% -> 80-82% of the read probe's rate. */
static inline float l_fold(int op, __m512 v) {
    if (op != MK_REDUCE_SUM && l_nanmask(v)) return fold(op, 1, v);
    return fold(op, 0, v);
}

/* argmin / argmax: plain vminps / vmaxps (NaNs are looked for apart) */
static inline __m512 l_pick(int op, __m512 a, __m512 b) {
    return op == MK_REDUCE_MAX ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
}
static inline unsigned l_better(int op, __m512 a, __m512 b) {
    return op == MK_REDUCE_MAX ? _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) : _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ);
}
/* NaN masks stay in mask registers (kor): argmax in L2 +3 points of the probe's rate */
typedef __mmask16 LM;
#define lm_or _kor_mask16
#define l_unord(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_UNORD_Q)
/* every lane = the least / greatest lane of v (no NaNs) */
static inline __m512 l_all(int op, __m512 v) {
    v = l_pick(op, v, _mm512_shuffle_f32x4(v, v, 0x4E));
    v = l_pick(op, v, _mm512_shuffle_f32x4(v, v, 0xB1));
    v = l_pick(op, v, _mm512_permute_ps(v, 0x4E));
    return l_pick(op, v, _mm512_permute_ps(v, 0xB1));
}

typedef __m512i LI;
#define li_set1 _mm512_set1_epi32
static inline LI li_where(LI a, unsigned k, int n) { return _mm512_mask_set1_epi32(a, (__mmask16)k, n); }
static inline int32_t li_min(LI a, unsigned k) { return _mm512_mask_reduce_min_epi32((__mmask16)k, a); }

#define v_load(p) _mm512_loadu_ps(p)
#define v_load_n(p, r) _mm512_maskz_loadu_ps(rd_tail(r), (p))
#define v_store(p, v) _mm512_storeu_ps((p), (v))
#define v_store_n(p, v, r) _mm512_mask_storeu_ps((p), rd_tail(r), (v))
#define v_add _mm512_add_ps
#define v_min l_min
#define v_max l_max

static uint64_t read_or__avx512(const uint64_t *x, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_or_si512(a0, _mm512_loadu_si512((const void *)(x + i)));
        a1 = _mm512_or_si512(a1, _mm512_loadu_si512((const void *)(x + i + 8)));
        a2 = _mm512_or_si512(a2, _mm512_loadu_si512((const void *)(x + i + 16)));
        a3 = _mm512_or_si512(a3, _mm512_loadu_si512((const void *)(x + i + 24)));
    }
    uint64_t r = (uint64_t)_mm512_reduce_or_epi64(
        _mm512_or_si512(_mm512_or_si512(a0, a1), _mm512_or_si512(a2, a3)));
    for (; i < n; i++) r |= x[i];
    return r;
}

#include "reduce_simd.h"

const mk_rd_kernels mk_rd_kernels__avx512 = RD_TABLE("avx512");

#endif /* MK_X86 */
