/* The AVX512 vector layer of elementwise_simd.h (V / VI / M float vectors, VD / MD
 * double vectors and their operations). Included by elementwise__avx512.c, and by other
 * families' avx512 files that use the same vector math (src/nn). Needs <immintrin.h>. */
#ifndef MK_ELEMENTWISE_VEC_AVX512_H
#define MK_ELEMENTWISE_VEC_AVX512_H

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

#endif
