/* The pooling row loop, compiled once per ISA (pool__<isa>.c include it with their flags):
 * plain C whose channel loops the compiler vectorises. */
#include "pool.h"

#define POOL_BLOCK 256   /* channels per accumulator block (stays in registers / L1) */

#define POOL_VEC 64      /* channels per block when the compiler knows the width (4 AVX-512 registers) */

/* out[c0 .. c0 + nc) for the window at (iy0, ix0); inlined with nc = POOL_VEC a constant. */
static inline __attribute__((always_inline)) void pool_block(const mk_pool_row_args *a, int64_t iy0,
                                                             int64_t ix0, int32_t c0, int32_t nc,
                                                             int avg, float scale, float *out) {
    const mk_pool2d_params *p = a->p;
    float acc[POOL_BLOCK];
    const float init = avg ? 0.0f : -__builtin_inff();
    for (int32_t c = 0; c < nc; c++) acc[c] = init;
    for (int32_t ky = 0; ky < p->kh; ky++) {
        const int64_t iy = iy0 + (int64_t)ky * p->dy;
        if (iy < 0 || iy >= a->src_h) continue;
        for (int32_t kx = 0; kx < p->kw; kx++) {
            const int64_t ix = ix0 + (int64_t)kx * p->dx;
            if (ix < 0 || ix >= a->src_w) continue;
            const float *x = a->src + iy * a->sy_src + ix * a->sx_src + c0;
            if (avg)
                for (int32_t c = 0; c < nc; c++) acc[c] += x[c];
            else
                for (int32_t c = 0; c < nc; c++) acc[c] = acc[c] > x[c] ? acc[c] : x[c];
        }
    }
    if (avg)
        for (int32_t c = 0; c < nc; c++) out[c0 + c] = acc[c] * scale;
    else
        for (int32_t c = 0; c < nc; c++) out[c0 + c] = acc[c];
}

static void pool_row(const mk_pool_row_args *a) {
    const mk_pool2d_params *p = a->p;
    const int avg = p->mode == MK_POOL_AVERAGE;
    const int64_t iy0 = (int64_t)a->oy * p->sy - p->pad_top;
    for (int32_t ox = 0; ox < a->out_w; ox++) {
        const int64_t ix0 = (int64_t)ox * p->sx - p->pad_left;
        int64_t taps = 0, padded = 0;
        for (int32_t ky = 0; ky < p->kh; ky++) {
            const int64_t iy = iy0 + (int64_t)ky * p->dy;
            for (int32_t kx = 0; kx < p->kw; kx++) {
                const int64_t ix = ix0 + (int64_t)kx * p->dx;
                taps += iy >= 0 && iy < a->src_h && ix >= 0 && ix < a->src_w;
                padded += iy < a->src_h + p->pad_bottom && ix < a->src_w + p->pad_right;
            }
        }
        const int64_t count = p->count_include_pad ? padded : taps;
        const float scale = count ? 1.0f / (float)count : 0.0f;
        float *out = a->dst + ox * a->sx_dst;
        int32_t c0 = 0;
        for (; c0 + POOL_VEC <= a->c; c0 += POOL_VEC)   /* a constant width: acc in registers */
            pool_block(a, iy0, ix0, c0, POOL_VEC, avg, scale, out);
        for (; c0 < a->c; c0 += POOL_BLOCK)
            pool_block(a, iy0, ix0, c0, a->c - c0 < POOL_BLOCK ? a->c - c0 : POOL_BLOCK, avg, scale, out);
    }
}
