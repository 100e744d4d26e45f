/* Pooling driver: argument checks, ISA dispatch, the split over output rows. */
#include <stdatomic.h>

#include "pool.h"

static _Atomic(mk_pool_row_fn) g_row = NULL;

void mk_pool_select_isa(mk_isa isa) {
    mk_pool_row_fn f = mk_pool_row__generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) f = mk_pool_row__avx512;
    else if (isa == MK_ISA_AVX2) f = mk_pool_row__avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_row, f, memory_order_release);
}

typedef struct pool_ctx {
    mk_pool_row_fn row;
    const mk_pool2d_params *p;
    const mk_operand *src, *dst;
    int32_t src_h, src_w;
    mk_extent out;
} pool_ctx;

static void pool_task(void *ctx, int64_t begin, int64_t end) {
    const pool_ctx *k = ctx;
    for (int64_t r = begin; r < end; r++) {
        const int64_t n = r / k->out.h, oy = r % k->out.h;
        mk_pool_row_args a = {
            .p = k->p,
            .src = (const float *)k->src->data + n * k->src->stride_n,
            .sy_src = k->src->stride_y, .sx_src = k->src->stride_x,
            .src_h = k->src_h, .src_w = k->src_w, .c = k->out.c,
            .dst = (float *)k->dst->data + n * k->dst->stride_n + oy * k->dst->stride_y,
            .sx_dst = k->dst->stride_x, .oy = (int32_t)oy, .out_w = k->out.w,
        };
        k->row(&a);
    }
}

mk_status mk_pool2d(const mk_pool2d_params *p, const mk_operand *src, int32_t src_h,
                    int32_t src_w, const mk_operand *dst, mk_extent out, mk_pool *pool) {
    if (!p || !src || !dst || !src->data || !dst->data) return MK_EINVAL;
    if (src->format != MK_FMT_F32 || dst->format != MK_FMT_F32) return MK_EINVAL;
    if (src->stride_c != 1 || dst->stride_c != 1) return MK_EINVAL;
    if (p->mode != MK_POOL_MAX && p->mode != MK_POOL_AVERAGE) return MK_EINVAL;
    if (p->kh < 1 || p->kw < 1 || p->sy < 1 || p->sx < 1 || p->dy < 1 || p->dx < 1) return MK_EINVAL;
    if (p->pad_top < 0 || p->pad_left < 0 || p->pad_bottom < 0 || p->pad_right < 0) return MK_EINVAL;
    if (src_h < 1 || src_w < 1 || out.n < 1 || out.h < 1 || out.w < 1 || out.c < 1) return MK_EINVAL;
    mk_pool_row_fn row = atomic_load_explicit(&g_row, memory_order_acquire);
    if (row == NULL) {
        mk_pool_select_isa(mk_best_isa());
        row = atomic_load_explicit(&g_row, memory_order_acquire);
    }
    pool_ctx k = {row, p, src, dst, src_h, src_w, out};
    /* about 32k source taps per chunk; the grain depends on the shape only */
    int64_t per_row = (int64_t)out.w * p->kh * p->kw * out.c;
    int64_t grain = per_row >= 32768 ? 1 : 32768 / (per_row ? per_row : 1);
    mk_parallel_for(pool, (int64_t)out.n * out.h, grain, pool_task, &k);
    return MK_OK;
}
