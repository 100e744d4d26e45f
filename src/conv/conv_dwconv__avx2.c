/* Depthwise rows, AVX2: four (or two) 8-lane accumulators per output pixel. */
#include <immintrin.h>
#include <math.h>

#include "conv/conv_dwconv.h"

#define VT __m256
#define VL 8
#define LOAD(p) _mm256_loadu_ps(p)
#define STORE(p, v) _mm256_storeu_ps(p, v)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MAX(a, b) _mm256_max_ps(a, b)
#define MIN(a, b) _mm256_min_ps(a, b)
#define SET1(x) _mm256_set1_ps(x)
#define DW_ISA _avx2
#define DW_NAME "_avx2"
#include "conv/conv_dwconv_rows.h"
