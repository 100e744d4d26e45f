/* AVX2 + FMA nn loops (nn_simd.h) on the elementwise family's AVX2 vector layer and math. */
#include "nn.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "elementwise/elementwise_vec__avx2.h"
#define EW_MATH_ONLY
#include "elementwise/elementwise_simd.h"

#define NNN(name) name##__avx2
static inline float v_hsum(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float v_hmax(V x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

#include "nn_simd.h"

const mk_nn_kernels mk_nn_kernels__avx2 = NN_TABLE("nn__avx2");

#endif /* MK_X86 */
