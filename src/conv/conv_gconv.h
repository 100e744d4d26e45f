/* Private to the grouped-convolution kernel (conv_gconv*.c). */
#ifndef MK_CONV_GCONV_H
#define MK_CONV_GCONV_H

#include "conv/conv.h"

/* One output row of one 16-channel block: the block's outputs o0..o0+15 read the input
 * channels b0..b0+span-1 (span <= 16); lane j takes input lane (j / cout_g) * cin_g + c. */
typedef struct mk_gc_row {
    const float *a;          /* the source image at channel b0 */
    int64_t ay, ax;
    const int32_t *ys, *xs;  /* as mk_conv_tap tables: -1 = zero tap */
    int32_t kh, kw, out_w, cin_g, cout_g, span, nc;
    const float *w;          /* packed [tap][cin_g][cpad] at o0 */
    int64_t cpad;
    const float *bias;       /* at o0, nc floats */
    float lo, hi;
    float *out;
    int64_t ld;
} mk_gc_row;

void mk_gc_row__avx512(const mk_gc_row *r);

#endif
