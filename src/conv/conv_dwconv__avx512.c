/* Depthwise rows, AVX-512: two (or one) 16-lane accumulators per output pixel. */
#include <immintrin.h>
#include <math.h>

#include "conv/conv_dwconv.h"

#define VT __m512
#define VL 16
#define LOAD(p) _mm512_loadu_ps(p)
#define STORE(p, v) _mm512_storeu_ps(p, v)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MAX(a, b) _mm512_max_ps(a, b)
#define MIN(a, b) _mm512_min_ps(a, b)
#define SET1(x) _mm512_set1_ps(x)
/* one load per source column, kept in a register for the up to three FMAs that use it (the
 * compiler would fold a load into each FMA: three loads, and loads are what this loop is
 * short of) */
#define DW_IN_REGISTER(x) __asm__("" : "+v"(x))
#define DW_ISA _avx512
#define DW_NAME "_avx512"
#include "conv/conv_dwconv_rows.h"
