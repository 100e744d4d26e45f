/* AVX-512 nn loops (nn_simd.h) on the elementwise family's AVX-512 vector layer and math. */
#include "nn.h"

#if MK_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "elementwise/elementwise_vec__avx512.h"
#define EW_MATH_ONLY
#include "elementwise/elementwise_simd.h"

#define NNN(name) name##__avx512
static inline float v_hsum(V x) { return _mm512_reduce_add_ps(x); }
static inline float v_hmax(V x) { return _mm512_reduce_max_ps(x); }

#include "nn_simd.h"

const mk_nn_kernels mk_nn_kernels__avx512 = NN_TABLE("nn__avx512");

#endif /* MK_X86 */
