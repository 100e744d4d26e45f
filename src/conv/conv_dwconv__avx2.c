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
/* one load per source column, kept in a register for the up to three FMAs that use it (the
 * compiler would fold a load into each FMA: three loads, and loads are what this loop is
 * short of) */
#define DW_IN_REGISTER(x) __asm__("" : "+x"(x))
#define DW_ISA _avx2
#define DW_NAME "_avx2"
#include "conv/conv_dwconv_rows.h"
