/* Private to the depthwise kernel (conv_dwconv*.c): the per-ISA row functions. */
#ifndef MK_CONV_DWCONV_H
#define MK_CONV_DWCONV_H

#include "conv/conv.h"

/* One output row of one channel block (32 or 16 channels, multiplier 1). */
typedef struct mk_dw_row {
    const float *a;          /* the source image's channel 0 */
    int64_t ay, ax;          /* element strides of a */
    const int32_t *ys;       /* kh source rows of this output row (-1: zero) */
    const int32_t *xs;       /* out_w x kw source columns (-1: zero) */
    int32_t kh, kw, out_w;
    const float *w;          /* packed [taps][cpad], at the block's first channel */
    int64_t cpad;
    const float *bias;       /* at the block's first channel */
    float lo, hi;            /* fused clamp (-inf, inf: none) */
    float *out;              /* output pixel 0 of the row, block's first channel */
    int64_t ld;              /* floats between output pixels */
    /* 3x3 only: pixels [run_begin, run_end) have every tap inside, tap p of pixel i reading
     * column xs[run_begin * 3] + (i - run_begin) * run_step + p; run_step 1 or 2 (else 0) */
    int32_t run_begin, run_end, run_step;
} mk_dw_row;

typedef void (*mk_dw_row_fn)(const mk_dw_row *r);

typedef struct mk_dw_rows {
    mk_dw_row_fn block32, block16;
    const char *name;        /* "dwconv__avx512" */
} mk_dw_rows;

extern const mk_dw_rows mk_dw_rows__generic;
#if MK_X86
extern const mk_dw_rows mk_dw_rows__avx2;
extern const mk_dw_rows mk_dw_rows__avx512;
#endif

#endif
