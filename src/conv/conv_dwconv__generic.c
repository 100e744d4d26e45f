/* Depthwise rows, portable C: scalar lanes the compiler may vectorize. */
#include <math.h>

#include "conv/conv_dwconv.h"

#define VT float
#define VL 1
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define FMA(a, b, c) ((a) * (b) + (c))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define SET1(x) (x)
#define DW_ISA _generic
#define DW_NAME "_generic"
#include "conv/conv_dwconv_rows.h"
