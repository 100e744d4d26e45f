/* AVX2 reduction microkernels: the 16 logical lanes are two ymm (lanes 0-7 and 8-15); tails
 * through vmaskmovps. The loops are in reduce_simd.h. */
#include "reduce.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>

#define RDN(name) name##__avx2
#define VL 8

typedef struct { __m256 lo, hi; } L;
typedef __m256 V;

static inline __m256i rd_tail(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* a < b ? a : b (vminps), except where a is NaN: a stays. */
static inline __m256 v_min(__m256 a, __m256 b) {
    return _mm256_blendv_ps(a, _mm256_min_ps(a, b), _mm256_cmp_ps(a, a, _CMP_ORD_Q));
}
static inline __m256 v_max(__m256 a, __m256 b) {
    return _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_cmp_ps(a, a, _CMP_ORD_Q));
}
#define v_add _mm256_add_ps
#define v_load(p) _mm256_loadu_ps(p)
#define v_load_n(p, r) _mm256_maskload_ps((p), rd_tail(r))
#define v_store(p, v) _mm256_storeu_ps((p), (v))
#define v_store_n(p, v, r) _mm256_maskstore_ps((p), rd_tail(r), (v))

#define L_PAIR(NAME, F)                                                                  \
    static inline L NAME(L a, L b) { return (L){F(a.lo, b.lo), F(a.hi, b.hi)}; }
L_PAIR(l_add, _mm256_add_ps)
L_PAIR(l_mul, _mm256_mul_ps)
L_PAIR(l_min, v_min)
L_PAIR(l_max, v_max)

static inline L l_load(const float *p) { return (L){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline __m256 load8_n(const float *p, int r, float fill) {
    if (r <= 0) return _mm256_set1_ps(fill);
    if (r >= 8) return _mm256_loadu_ps(p);
    __m256i m = rd_tail(r);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline L l_load_n(const float *p, int r, float fill) {
    return (L){load8_n(p, r, fill), load8_n(p + 8, r - 8, fill)};
}
static inline __m256 ne0(__m256 x) {
    return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_UQ), _mm256_set1_ps(1.0f));
}
static inline L l_ne0(L x) { return (L){ne0(x.lo), ne0(x.hi)}; }

static inline L l_set1(float x) { return (L){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
static inline unsigned l_eqmask(L v, L m) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v.lo, m.lo, _CMP_EQ_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v.hi, m.hi, _CMP_EQ_OQ)) << 8;
}
static inline unsigned l_nanmask(L v) {
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v.lo, v.lo, _CMP_UNORD_Q)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v.hi, v.hi, _CMP_UNORD_Q)) << 8;
}

/* argmin / argmax: plain vminps / vmaxps (NaNs are looked for apart) */
static inline L l_pick(int op, L a, L b) {
    if (op == MK_REDUCE_MAX) return (L){_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)};
    return (L){_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)};
}
static inline unsigned bits(__m256 lo, __m256 hi) {
    return (unsigned)_mm256_movemask_ps(lo) | (unsigned)_mm256_movemask_ps(hi) << 8;
}
static inline unsigned l_better(int op, L a, L b) {
    if (op == MK_REDUCE_MAX)
        return bits(_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ));
    return bits(_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ));
}
typedef unsigned LM;
static inline LM lm_or(LM a, LM b) { return a | b; }
static inline LM l_unord(L a, L b) {
    return bits(_mm256_cmp_ps(a.lo, b.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, b.hi, _CMP_UNORD_Q));
}

/* every lane = the least / greatest lane of v (no NaNs) */
static inline L l_all(int op, L v) {
    __m256 a = op == MK_REDUCE_MAX ? _mm256_max_ps(v.lo, v.hi) : _mm256_min_ps(v.lo, v.hi);
    L t = l_pick(op, (L){a, a}, (L){_mm256_permute2f128_ps(a, a, 1), a});
    t = l_pick(op, t, (L){_mm256_permute_ps(t.lo, 0x4E), a});
    t = l_pick(op, t, (L){_mm256_permute_ps(t.lo, 0xB1), a});
    return (L){t.lo, t.lo};
}

typedef struct { __m256i lo, hi; } LI;
static inline LI li_set1(int n) { return (LI){_mm256_set1_epi32(n), _mm256_set1_epi32(n)}; }
static inline __m256i lanes_in(unsigned k) {   /* all ones in lane i where bit i of k is set */
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)k), bit), bit);
}
static inline LI li_where(LI a, unsigned k, int n) {
    const __m256i v = _mm256_set1_epi32(n);
    return (LI){_mm256_blendv_epi8(a.lo, v, lanes_in(k)), _mm256_blendv_epi8(a.hi, v, lanes_in(k >> 8))};
}
static inline int32_t li_min(LI a, unsigned k) {
    int32_t x[16], best = INT32_MAX;
    _mm256_storeu_si256((__m256i *)x, a.lo);
    _mm256_storeu_si256((__m256i *)(x + 8), a.hi);
    for (; k; k &= k - 1) best = x[__builtin_ctz(k)] < best ? x[__builtin_ctz(k)] : best;
    return best;
}

/* a OP b on 4 / 8 lanes; min / max keep a NaN in a (unless v is known to hold none) */
static inline __attribute__((always_inline)) __m128 h_op(int op, int nan, __m128 a, __m128 b) {
    if (op == MK_REDUCE_SUM) return _mm_add_ps(a, b);
    const __m128 m = op == MK_REDUCE_MIN ? _mm_min_ps(a, b) : _mm_max_ps(a, b);
    return nan ? _mm_blendv_ps(a, m, _mm_cmpord_ps(a, a)) : m;
}
static inline __attribute__((always_inline)) float fold(int op, int nan, L v) {
    __m256 a = op == MK_REDUCE_SUM ? _mm256_add_ps(v.lo, v.hi)
             : op == MK_REDUCE_MIN ? _mm256_min_ps(v.lo, v.hi) : _mm256_max_ps(v.lo, v.hi);
    if (op != MK_REDUCE_SUM && nan)
        a = _mm256_blendv_ps(v.lo, a, _mm256_cmp_ps(v.lo, v.lo, _CMP_ORD_Q));
    __m128 b = h_op(op, nan, _mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = h_op(op, nan, b, _mm_movehl_ps(b, b));
    b = h_op(op, nan, b, _mm_shuffle_ps(b, b, 1));
    return _mm_cvtss_f32(b);
}
/* lanes k with k+8, k+4, k+2, k+1; without a NaN in v, min / max without the blends (as in
 * reduce__avx512.c) */
static inline float l_fold(int op, L v) {
    if (op != MK_REDUCE_SUM && l_nanmask(v)) return fold(op, 1, v);
    return fold(op, 0, v);
}

static uint64_t read_or__avx2(const uint64_t *x, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_or_si256(a0, _mm256_loadu_si256((const __m256i *)(x + i)));
        a1 = _mm256_or_si256(a1, _mm256_loadu_si256((const __m256i *)(x + i + 4)));
        a2 = _mm256_or_si256(a2, _mm256_loadu_si256((const __m256i *)(x + i + 8)));
        a3 = _mm256_or_si256(a3, _mm256_loadu_si256((const __m256i *)(x + i + 12)));
    }
    __m256i a = _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3));
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, a);
    uint64_t r = t[0] | t[1] | t[2] | t[3];
    for (; i < n; i++) r |= x[i];
    return r;
}

#include "reduce_simd.h"

const mk_rd_kernels mk_rd_kernels__avx2 = RD_TABLE("avx2");

#endif /* MK_X86 */
