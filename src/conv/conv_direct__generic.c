/* Direct convolution for few input channels, inner loop: vectorised across output channels
 * (blocks of NV vectors), PX output pixels at a time sharing every weight load, taps and input
 * channels summed in registers, each input value broadcast from the source as it is. Compiled
 * once per ISA (conv_kernels.h). */
#include "conv/conv_kernels.h"

/* Register blocks: NV vectors x PX pixels, and for the channels left over (e.g. 32 output
 * channels on AVX-512) narrower blocks over more pixels, so that accumulators stay as many. */
#if CK_VL == 16
#define NV 4   /* 24 accumulators + 4 weights + 1 broadcast of 32 registers */
#define PX 6
#define PX2 12 /* 2 vectors: 24 + 2 + 1 */
#define PX1 12 /* 1 vector: 12 + 1 + 1 (12 chains still hide the FMA latency) */
#elif CK_VL == 8
#define NV 2   /* 12 + 2 + 1 of 16 */
#define PX 6
#define PX2 6
#define PX1 12 /* 12 + 1 + 1 */
#else
#define NV 2
#define PX 4
#define PX2 4
#define PX1 4
#endif
#define PX_MAX 12

/* Pixels [x, x + px), channels o.. : nv full vectors, or one of `last` < CK_VL channels. */
static inline __attribute__((always_inline)) void direct_pixels(const ck_direct_row *r, int64_t o,
                                                                int nv, int last, int x, int px,
                                                                int interior) {
    ck_v acc[PX_MAX][NV];
    for (int j = 0; j < nv; j++) {
        const ck_v b = last ? ck_loadn(r->bias + o, last) : ck_load(r->bias + o + j * CK_VL);
        for (int i = 0; i < px; i++) acc[i][j] = b;
    }
    const int32_t *xs = r->xs + (int64_t)x * r->kw;
    for (int q = 0; q < r->kh; q++) {
        const float *row = r->rows[q];
        if (row == NULL) continue;
        const float *w = r->w + (int64_t)q * r->kw * r->cin * r->ldw + o;
        if (interior) {
            const float *s = row + xs[0] * r->pixel;
            for (int p = 0; p < r->kw; p++, s += r->dstep)
                for (int c = 0; c < r->cin; c++, w += r->ldw) {
                    ck_v wv[NV];
                    for (int j = 0; j < nv; j++) wv[j] = ck_load(w + j * CK_VL);
                    for (int i = 0; i < px; i++) {
                        const ck_v a = ck_set1(s[i * r->step + c]);
                        for (int j = 0; j < nv; j++) acc[i][j] = ck_fma(a, wv[j], acc[i][j]);
                    }
                }
        } else {
            for (int p = 0; p < r->kw; p++) {
                if (xs[p] < 0) {
                    w += r->cin * r->ldw;
                    continue;
                }
                const float *s = row + xs[p] * r->pixel;
                for (int c = 0; c < r->cin; c++, w += r->ldw) {
                    const ck_v a = ck_set1(s[c]);
                    for (int j = 0; j < nv; j++) acc[0][j] = ck_fma(a, ck_load(w + j * CK_VL), acc[0][j]);
                }
            }
        }
    }
    const ck_v lo = ck_set1(r->lo), hi = ck_set1(r->hi);
    for (int i = 0; i < px; i++) {
        float *d = r->out + (x + i) * r->out_pixel + o;
        for (int j = 0; j < nv; j++) {
            ck_v v = acc[i][j];
            if (r->acc) v += last ? ck_loadn(d, last) : ck_load(d + j * CK_VL);
            v = ck_clamp(v, lo, hi);
            if (last) ck_storen(d, v, last);
            else ck_store(d + j * CK_VL, v);
        }
    }
}

static inline __attribute__((always_inline)) void direct_block(const ck_direct_row *r, int64_t o,
                                                               int nv, int px, int last) {
    int x = 0;
    for (; x < r->x0 && x < r->count; x++) direct_pixels(r, o, nv, last, x, 1, 0);
    const int x1 = r->x1 < r->count ? r->x1 : r->count;
    for (; x + px <= x1; x += px) direct_pixels(r, o, nv, last, x, px, 1);
    for (; x < x1; x++) direct_pixels(r, o, nv, last, x, 1, 1);
    for (; x < r->count; x++) direct_pixels(r, o, nv, last, x, 1, 0);
}

void CK_NAME(ck_direct_row)(const ck_direct_row *r) {
    int64_t o = 0;
    for (; o + NV * CK_VL <= r->nc; o += NV * CK_VL) direct_block(r, o, NV, PX, 0);
    if (NV > 2 && o + 2 * CK_VL <= r->nc) {
        direct_block(r, o, 2, PX2, 0);
        o += 2 * CK_VL;
    }
    for (; o + CK_VL <= r->nc; o += CK_VL) direct_block(r, o, 1, PX1, 0);
    if (o < r->nc) direct_block(r, o, 1, PX1, (int)(r->nc - o));
}
