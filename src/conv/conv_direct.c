/* Direct convolution for few input channels (one group, cin <= DIRECT_MAX_CIN: first layers on
 * RGB(A) images, e.g. 3->64 7x7 stride 2). There K = kh*kw*cin is awkward for a GEMM (a few
 * channels per tap); here output channels are the vector axis, several output pixels share
 * each weight load, and each input value is broadcast straight from the source: no gather.
 *
 * Weights are packed once as [tap][cin][output channel], rows padded to CK_CPAD floats. The
 * plan holds, per output row and column, the source row / column of every tap (-1: zero; CLAMP
 * taps hold the edge index) and the interior columns (every tap inside). Work items are output
 * rows (image, y): independent of the thread count. Sub-pixel and transposed (up-sampled)
 * convolutions and windows taller than DIRECT_MAX_KH go to igemm. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "conv/conv_kernels.h"

#define DIRECT_MAX_CIN 4
#define DIRECT_MAX_KH 16
#define DIRECT_CHUNK 64   /* output pixels per store */

typedef struct direct_plan {
    ck_direct_row_fn row;
    int32_t *ys, *xs;            /* out_h x kh source rows, out_w x kw source columns */
    int32_t x0, x1;              /* output columns [x0, x1) have every tap inside the source */
} direct_plan;

static int direct_supports(const mk_conv_params *s) {
    return s->groups == 1 && s->cin_g <= DIRECT_MAX_CIN && s->up_y == 1 && s->up_x == 1 &&
           s->sub_pixel == 1 && s->kh <= DIRECT_MAX_KH;
}

static int64_t direct_ldw(const mk_conv_params *s) { return ck_round_up(s->cout_g, CK_CPAD); }

static mk_status direct_pack(mk_conv_weights *w, const void *weights, int format) {
    const mk_conv_params *s = &w->shape;
    const int64_t k = (int64_t)s->kh * s->kw * s->cin_g, ldw = direct_ldw(s);
    if (ldw > INT64_MAX / 4 / k) return MK_EINVAL;
    w->packed = aligned_alloc(64, (size_t)ck_round_up(k * ldw * 4, 64));
    if (w->packed == NULL) return MK_ENOMEM;
    memset(w->packed, 0, (size_t)(k * ldw * 4));
    /* source (row r = (tap, channel), output o) at o*k + r; destination at r*ldw + o */
    mk_operand src = {(void *)weights, format, 0, 1, k, 1};
    mk_operand dst = {w->packed, MK_FMT_F32, 0, ldw, 1, 1};
    return mk_copy(&src, &dst, (mk_extent){1, (int32_t)k, s->cout_g, 1}, NULL);
}

static void direct_unpack(const mk_conv_weights *w, float *weights) {
    const mk_conv_params *s = &w->shape;
    const int64_t k = (int64_t)s->kh * s->kw * s->cin_g, ldw = direct_ldw(s);
    for (int64_t o = 0; o < s->cout_g; o++)
        for (int64_t r = 0; r < k; r++) weights[o * k + r] = w->packed[r * ldw + o];
}

static const char *direct_implementation(const mk_conv_weights *w, char *buffer, size_t size) {
    (void)w;
    snprintf(buffer, size, "direct__%s", ck_isa_name());
    return buffer;
}

static void direct_free_plan(mk_conv_plan *plan) {
    direct_plan *s = plan->state;
    if (s == NULL) return;
    free(s->ys);
    free(s->xs);
    free(s);
    plan->state = NULL;
}

static mk_status direct_plan_create(mk_conv_plan *plan) {
    const mk_conv_params *p = &plan->params;
    direct_plan *s = calloc(1, sizeof *s);
    if (s == NULL) return MK_ENOMEM;
    plan->state = s;
    s->ys = malloc((size_t)p->out_h * p->kh * sizeof(int32_t));
    s->xs = malloc((size_t)p->out_w * p->kw * sizeof(int32_t));
    if (s->ys == NULL || s->xs == NULL) {
        direct_free_plan(plan);
        return MK_ENOMEM;
    }
    for (int64_t i = 0; i < p->out_h; i++)
        for (int64_t q = 0; q < p->kh; q++)
            s->ys[i * p->kh + q] = (int32_t)mk_conv_source_index(p->top + i * p->sy + q * p->dy,
                                                                 p->src_h, 1, p->edge_mode);
    s->x0 = p->out_w;
    for (int64_t i = 0; i < p->out_w; i++) {
        const int64_t first = p->left + i * p->sx, last = first + (int64_t)(p->kw - 1) * p->dx;
        for (int64_t q = 0; q < p->kw; q++)
            s->xs[i * p->kw + q] = (int32_t)mk_conv_source_index(first + q * p->dx, p->src_w, 1,
                                                                 p->edge_mode);
        if (first >= 0 && last < p->src_w) {
            if (s->x0 == p->out_w) s->x0 = (int32_t)i;
            s->x1 = (int32_t)i + 1;
        }
    }
    switch (mk_active_isa()) {
#if MK_X86
    case MK_ISA_AVX512: s->row = ck_direct_row__avx512; break;
    case MK_ISA_AVX2: s->row = ck_direct_row__avx2; break;
#endif
    default: s->row = ck_direct_row__generic; break;
    }
    return MK_OK;
}

typedef struct direct_ctx {
    const mk_conv_params *p;
    const mk_conv_weights *w;
    const direct_plan *s;
    const float *a;              /* float32 source */
    int64_t a_n, a_y, a_x;       /* its element strides */
    int fused;
    float lo, hi;
    mk_status status;
} direct_ctx;

static void direct_task(void *arg, int64_t begin, int64_t end) {
    direct_ctx *c = arg;
    const mk_conv_params *p = c->p;
    const direct_plan *s = c->s;
    const int64_t cout = p->cout_g;
    const int direct = p->dst.format == MK_FMT_F32;   /* a run on one row: evenly spaced */
    const float *rows[DIRECT_MAX_KH];
    float *tile = NULL;
    if (!direct && (tile = malloc((size_t)(DIRECT_CHUNK * cout) * sizeof(float))) == NULL) {
        c->status = MK_ENOMEM;
        return;
    }
    ck_direct_row r = {rows, NULL, c->a_x, c->a_x * p->sx, c->a_x * p->dx, c->w->packed,
                       direct_ldw(p), c->w->bias, p->kh, p->kw, p->cin_g, 0, (int)cout, 0, 0,
                       NULL, 0, direct && p->accumulate, c->lo, c->hi};
    if (!direct) {   /* mk_conv_store adds the residual, applies the whole neuron */
        r.lo = -INFINITY;
        r.hi = INFINITY;
        r.out = tile;
        r.out_pixel = cout;
    }
    for (int64_t item = begin; item < end; item++) {
        const int64_t img = item / p->out_h, oy = item % p->out_h;
        for (int q = 0; q < p->kh; q++) {
            const int32_t y = s->ys[oy * p->kh + q];
            rows[q] = y < 0 ? NULL : c->a + img * c->a_n + y * c->a_y;
        }
        for (int64_t x0 = 0; x0 < p->out_w; x0 += DIRECT_CHUNK) {
            r.count = (int)(p->out_w - x0 < DIRECT_CHUNK ? p->out_w - x0 : DIRECT_CHUNK);
            r.xs = s->xs + x0 * p->kw;
            r.x0 = (int)(s->x0 - x0 < 0 ? 0 : s->x0 - x0 > r.count ? r.count : s->x0 - x0);
            r.x1 = (int)(s->x1 - x0 < r.x0 ? r.x0 : s->x1 - x0 > r.count ? r.count : s->x1 - x0);
            if (direct) {
                r.out = (float *)p->dst.data + img * p->dst.stride_n + oy * p->dst.stride_y +
                        x0 * p->dst.stride_x;
                r.out_pixel = p->dst.stride_x;
            }
            s->row(&r);
            mk_status st = MK_OK;
            if (!direct) {
                st = mk_conv_store(p, tile, cout, item * p->out_w + x0, r.count, 0, (int)cout);
            } else if (!c->fused) {   /* in place, while it is in cache */
                mk_operand v = {r.out, MK_FMT_F32, 0, 0, r.out_pixel, 1};
                st = mk_neuron(&p->neuron, &v, &v, (mk_extent){1, 1, r.count, (int32_t)cout}, NULL);
            }
            if (st != MK_OK) c->status = st;
        }
    }
    free(tile);
}

static mk_status direct_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool) {
    direct_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.w = plan->weights;
    c.s = plan->state;
    c.status = MK_OK;
    float *converted = NULL;
    mk_status st = mk_conv_source_f32(p, pool, &c.a, &converted, &c.a_n, &c.a_y, &c.a_x);
    if (st != MK_OK) return st;
    c.fused = mk_conv_clamp(&p->neuron, &c.lo, &c.hi);
    mk_parallel_for(pool, (int64_t)p->n * p->out_h, 1, direct_task, &c);
    free(converted);
    return c.status;
}

const mk_conv_kernel mk_conv_kernel_direct = {
    "direct", direct_supports, direct_pack, direct_unpack, direct_plan_create, direct_free_plan,
    direct_run, direct_implementation,
};
