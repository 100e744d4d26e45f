/* nn driver: argument checks, ISA dispatch, the split over rows / pixels, and the gather
 * (a memory copy with index tables: plain C, the same for every ISA). */
#include <stdatomic.h>
#include <string.h>

#include "nn.h"

static _Atomic(const mk_nn_kernels *) g_kernels = NULL;

void mk_nn_select_isa(mk_isa isa) {
    const mk_nn_kernels *k = &mk_nn_kernels__generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) k = &mk_nn_kernels__avx512;
    else if (isa == MK_ISA_AVX2) k = &mk_nn_kernels__avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_kernels, k, memory_order_release);
}

static const mk_nn_kernels *kernels(void) {
    const mk_nn_kernels *k = atomic_load_explicit(&g_kernels, memory_order_acquire);
    if (k == NULL) {
        mk_nn_select_isa(mk_best_isa());
        k = atomic_load_explicit(&g_kernels, memory_order_acquire);
    }
    return k;
}

static int f32_operand(const mk_operand *o) {
    return o != NULL && o->data != NULL && o->format == MK_FMT_F32;
}

static int extent_ok(mk_extent e) { return e.n > 0 && e.h > 0 && e.w > 0 && e.c > 0; }

/* chunks of about `work` elements, whole units (rows, pixels) each: bounds by shape only */
static int64_t grain_for(int64_t per_unit, int64_t work) {
    return per_unit >= work ? 1 : work / (per_unit > 0 ? per_unit : 1);
}

/* ---- rows ------------------------------------------------------------------------------- */

typedef struct rows_ctx {
    const mk_nn_kernels *k;
    const mk_nn_rows_params *p;
    const mk_operand *src, *dst;
    mk_extent e;
} rows_ctx;

static void rows_task(void *ctx, int64_t begin, int64_t end) {
    const rows_ctx *r = ctx;
    const mk_operand *s = r->src, *d = r->dst;
    const mk_nn_rows_params *p = r->p;
    const int64_t h = r->e.h, w = r->e.w, c = r->e.c;
    for (int64_t i = begin; i < end; i++) {
        const int64_t n = i / (h * w), y = i / w % h, x = i % w;
        const float *src = (const float *)s->data + n * s->stride_n + y * s->stride_y + x * s->stride_x;
        float *dst = (float *)d->data + n * d->stride_n + y * d->stride_y + x * d->stride_x;
        float mean, inv_std;
        switch (p->op) {
        case MK_NN_SOFTMAX:
            r->k->softmax(src, dst, c);
            break;
        case MK_NN_LAYER_NORM:
            r->k->layer_norm(src, dst, c, p->epsilon, p->scale, p->bias, &mean, &inv_std);
            break;
        case MK_NN_LAYER_NORM_MEAN:
        case MK_NN_LAYER_NORM_INV_STD:
            r->k->layer_norm(src, NULL, c, p->epsilon, NULL, NULL, &mean, &inv_std);
            *dst = p->op == MK_NN_LAYER_NORM_MEAN ? mean : inv_std;
            break;
        default:
            r->k->unary(p->op, src, dst, c);
        }
    }
}

mk_status mk_nn_rows(const mk_nn_rows_params *p, const mk_operand *src, const mk_operand *dst,
                     mk_extent e, mk_pool *pool) {
    if (p == NULL || p->op < 0 || p->op >= MK_NN_NUM_ROW_OPS) return MK_EINVAL;
    if (!f32_operand(src) || !f32_operand(dst) || !extent_ok(e)) return MK_EINVAL;
    const int per_row = p->op == MK_NN_LAYER_NORM_MEAN || p->op == MK_NN_LAYER_NORM_INV_STD;
    if (e.c > 1 && (src->stride_c != 1 || (!per_row && dst->stride_c != 1))) return MK_EINVAL;
    rows_ctx r = {kernels(), p, src, dst, e};
    mk_parallel_for(pool, (int64_t)e.n * e.h * e.w, grain_for(e.c, 16384), rows_task, &r);
    return MK_OK;
}

/* ---- gather ----------------------------------------------------------------------------- */

typedef struct gather_ctx {
    const mk_nn_gather_params *p;
    const mk_operand *src, *dst;
    mk_extent e;
    int c_run;   /* index[3] is i0, i0 + 1, ... and both channel strides are 1: one memcpy */
} gather_ctx;

static void gather_task(void *ctx, int64_t begin, int64_t end) {
    const gather_ctx *g = ctx;
    const mk_operand *s = g->src, *d = g->dst;
    const int32_t *const *index = g->p->index;
    const float value = g->p->value;
    const int64_t h = g->e.h, w = g->e.w, c = g->e.c;
    for (int64_t i = begin; i < end; i++) {
        const int64_t n = i / (h * w), y = i / w % h, x = i % w;
        float *dst = (float *)d->data + n * d->stride_n + y * d->stride_y + x * d->stride_x;
        const int64_t in = index[0][n], iy = index[1][y], ix = index[2][x];
        if (in < 0 || iy < 0 || ix < 0) {
            for (int64_t k = 0; k < c; k++) dst[k * d->stride_c] = value;
            continue;
        }
        const float *src = (const float *)s->data + in * s->stride_n + iy * s->stride_y + ix * s->stride_x;
        if (g->c_run) {
            memcpy(dst, src + index[3][0], (size_t)c * sizeof(float));
            continue;
        }
        for (int64_t k = 0; k < c; k++) {
            const int64_t ic = index[3][k];
            dst[k * d->stride_c] = ic < 0 ? value : src[ic * s->stride_c];
        }
    }
}

static int table_ok(const int32_t *t, int32_t n, int32_t limit, int allow_pad) {
    if (t == NULL) return 0;
    for (int32_t i = 0; i < n; i++)
        if (t[i] >= limit || t[i] < (allow_pad ? -1 : 0)) return 0;
    return 1;
}

mk_status mk_nn_gather(const mk_nn_gather_params *p, const mk_operand *src, mk_extent src_e,
                       const mk_operand *dst, mk_extent e, mk_pool *pool) {
    if (p == NULL || !f32_operand(src) || !f32_operand(dst) || !extent_ok(src_e) || !extent_ok(e))
        return MK_EINVAL;
    const int32_t out[4] = {e.n, e.h, e.w, e.c}, in[4] = {src_e.n, src_e.h, src_e.w, src_e.c};
    for (int k = 0; k < 4; k++)
        if (!table_ok(p->index[k], out[k], in[k], 1)) return MK_EINVAL;
    int c_run = src->stride_c == 1 && dst->stride_c == 1 && p->index[3][0] >= 0;
    for (int32_t k = 1; c_run && k < e.c; k++) c_run = p->index[3][k] == p->index[3][0] + k;
    gather_ctx g = {p, src, dst, e, c_run};
    mk_parallel_for(pool, (int64_t)e.n * e.h * e.w, grain_for(e.c, 16384), gather_task, &g);
    return MK_OK;
}

/* ---- bilinear resize -------------------------------------------------------------------- */

typedef struct resize_ctx {
    const mk_nn_kernels *k;
    const mk_nn_resize_params *p;
    const mk_operand *src, *dst;
    mk_extent e;
} resize_ctx;

static void resize_task(void *ctx, int64_t begin, int64_t end) {
    const resize_ctx *r = ctx;
    const mk_operand *s = r->src, *d = r->dst;
    const mk_nn_resize_params *p = r->p;
    for (int64_t i = begin; i < end; i++) {
        const int64_t n = i / r->e.h, y = i % r->e.h;
        const float *image = (const float *)s->data + n * s->stride_n;
        mk_nn_resize_row a = {
            .r0 = image + p->y0[y] * s->stride_y, .r1 = image + p->y1[y] * s->stride_y,
            .sx = s->stride_x, .wy = p->wy[y], .x0 = p->x0, .x1 = p->x1, .wx = p->wx,
            .dst = (float *)d->data + n * d->stride_n + y * d->stride_y, .dx = d->stride_x,
            .out_w = r->e.w, .c = r->e.c,
        };
        r->k->resize_row(&a);
    }
}

mk_status mk_nn_resize_linear(const mk_nn_resize_params *p, const mk_operand *src, int32_t src_h,
                              int32_t src_w, const mk_operand *dst, mk_extent e, mk_pool *pool) {
    if (p == NULL || !f32_operand(src) || !f32_operand(dst) || !extent_ok(e) || src_h < 1 || src_w < 1)
        return MK_EINVAL;
    if (src->stride_c != 1 || dst->stride_c != 1 || p->wy == NULL || p->wx == NULL) return MK_EINVAL;
    if (!table_ok(p->y0, e.h, src_h, 0) || !table_ok(p->y1, e.h, src_h, 0) ||
        !table_ok(p->x0, e.w, src_w, 0) || !table_ok(p->x1, e.w, src_w, 0))
        return MK_EINVAL;
    resize_ctx r = {kernels(), p, src, dst, e};
    mk_parallel_for(pool, (int64_t)e.n * e.h, grain_for((int64_t)e.w * e.c, 16384), resize_task, &r);
    return MK_OK;
}
