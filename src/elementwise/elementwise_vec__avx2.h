/* The AVX2 vector layer of elementwise_simd.h (V / VI / M float vectors, VD / MD
 * double vectors and their operations). Included by elementwise__avx2.c, and by other
 * families' avx2 files that use the same vector math (src/nn). Needs <immintrin.h>. */
#ifndef MK_ELEMENTWISE_VEC_AVX2_H
#define MK_ELEMENTWISE_VEC_AVX2_H

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

#endif
