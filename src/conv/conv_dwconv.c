/* Depthwise and small-group convolution: a direct kernel over blocks of output channels.
 * Depthwise = one input channel per group (any multiplier m = cout_g); small groups = at most
 * 16 outputs per group dividing 16, no more inputs than outputs per group (e.g. 128 channels
 * in 32 groups of 4), so a 16-output block reads at most 16 input channels.
 * Weights are packed [tap][cin_g][cpad] (output channel fastest, zero past cout), so one tap
 * of a block is one contiguous vector load; the source rows and columns each output reads are
 * tabulated once per geometry (-1: a zero tap, skipped). Depthwise multiplier 1 runs the
 * per-ISA register-blocked rows (conv_dwconv__*.c) on 32- and 16-channel blocks; small groups
 * run the AVX-512 permute rows (conv_gconv__avx512.c); everything else (other ISAs for small
 * groups, other multipliers, the last < 16 channels) the portable loop below.
 * Threads split over output rows, and over channel blocks as well when there are few rows. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conv/conv_dwconv.h"
#include "conv/conv_gconv.h"

#define DW_BLOCK 32
#define DW_MIN_ITEMS 16

typedef struct dw_plan {
    const mk_dw_rows *rows;  /* the ISA's row functions, fixed at plan time */
    int gc_avx512;           /* small groups: the AVX-512 permute rows */
    int32_t *ys;             /* out_h x kh */
    int32_t *xs;             /* out_w x kw */
    int32_t run_begin, run_end, run_step;   /* mk_dw_row's regular run (whole row) */
} dw_plan;

static const mk_dw_rows *dw_active(void) {
#if MK_X86
    switch (mk_active_isa()) {
    case MK_ISA_AVX512: return &mk_dw_rows__avx512;
    case MK_ISA_AVX2: return &mk_dw_rows__avx2;
    default: break;
    }
#endif
    return &mk_dw_rows__generic;
}

static int64_t cpad_of(const mk_conv_params *s) {
    int64_t cout = (int64_t)s->groups * s->cout_g;
    return (cout + DW_BLOCK - 1) / DW_BLOCK * DW_BLOCK;
}

static int small_groups(const mk_conv_params *s) {
    return s->groups > 1 && s->cin_g > 1 && s->cout_g <= 16 && 16 % s->cout_g == 0 &&
           s->cin_g <= s->cout_g;
}

static int dw_supports(const mk_conv_params *s) { return s->cin_g == 1 || small_groups(s); }

static mk_status dw_pack(mk_conv_weights *w, const void *weights, int format) {
    const mk_conv_params *s = &w->shape;
    const int64_t taps = (int64_t)s->kh * s->kw, cout = (int64_t)s->groups * s->cout_g;
    const int64_t cpad = cpad_of(s), k = taps * s->cin_g;
    if (k > INT64_MAX / 4 / cpad) return MK_EINVAL;
    w->packed = aligned_alloc(64, (size_t)(k * cpad * 4 + 63) / 64 * 64);
    if (w->packed == NULL) return MK_ENOMEM;
    memset(w->packed, 0, (size_t)(k * cpad * 4));
    /* [o][tap][c] -> [tap][c][o], converting through mk_copy (f16 or f32) */
    mk_operand src = {(void *)weights, format, 0, s->cin_g, 1, k};
    mk_operand dst = {w->packed, MK_FMT_F32, 0, s->cin_g * cpad, cpad, 1};
    return mk_copy(&src, &dst, (mk_extent){1, (int32_t)taps, s->cin_g, (int32_t)cout}, NULL);
}

static void dw_unpack(const mk_conv_weights *w, float *weights) {
    const mk_conv_params *s = &w->shape;
    const int64_t taps = (int64_t)s->kh * s->kw, cout = (int64_t)s->groups * s->cout_g;
    const int64_t cpad = cpad_of(s), k = taps * s->cin_g;
    for (int64_t o = 0; o < cout; o++)
        for (int64_t r = 0; r < k; r++) weights[o * k + r] = w->packed[r * cpad + o];
}

static int gc_avx512(void) {
#if MK_X86
    return mk_active_isa() == MK_ISA_AVX512;
#else
    return 0;
#endif
}

static const char *dw_implementation(const mk_conv_weights *w, char *buffer, size_t size) {
    const char *name = dw_active()->name;   /* "dwconv__<isa>" */
    if (w->shape.cin_g > 1) snprintf(buffer, size, "gconv_%s", gc_avx512() ? "_avx512" : "_generic");
    else snprintf(buffer, size, "%s", name);
    return buffer;
}

static void dw_free_plan(mk_conv_plan *plan) {
    dw_plan *s = plan->state;
    if (s == NULL) return;
    free(s->ys);
    free(s->xs);
    free(s);
    plan->state = NULL;
}

/* The longest run of 3x3 output pixels whose taps are all inside and evenly spaced (stride 1 or
 * 2, no dilation or up-sampling in x): the columns the row kernels read with no table. */
static void find_run(const mk_conv_params *p, dw_plan *s) {
    s->run_begin = s->run_end = s->run_step = 0;
    if (p->kh != 3 || p->kw != 3 || (p->sx != 1 && p->sx != 2)) return;
    for (int32_t i = 0; i < p->out_w;) {
        int32_t j = i;
        while (j < p->out_w && s->xs[j * 3] >= 0 && s->xs[j * 3 + 1] == s->xs[j * 3] + 1 &&
               s->xs[j * 3 + 2] == s->xs[j * 3] + 2 &&
               (j == i || s->xs[j * 3] == s->xs[(j - 1) * 3] + p->sx))
            j++;
        if (j - i > s->run_end - s->run_begin) {
            s->run_begin = i;
            s->run_end = j;
        }
        i = j > i ? j : i + 1;
    }
    s->run_step = p->sx;
}

static mk_status dw_plan_create(mk_conv_plan *plan) {
    const mk_conv_params *p = &plan->params;
    if ((int64_t)p->out_h * p->kh > INT32_MAX || (int64_t)p->out_w * p->kw > INT32_MAX)
        return MK_EINVAL;
    dw_plan *s = calloc(1, sizeof *s);
    if (s == NULL) return MK_ENOMEM;
    plan->state = s;
    s->rows = dw_active();
    s->gc_avx512 = gc_avx512();
    s->ys = malloc((size_t)p->out_h * p->kh * sizeof(int32_t));
    s->xs = malloc((size_t)p->out_w * p->kw * sizeof(int32_t));
    if (s->ys == NULL || s->xs == NULL) {
        dw_free_plan(plan);
        return MK_ENOMEM;
    }
    for (int64_t j = 0; j < p->out_h; j++)
        for (int64_t q = 0; q < p->kh; q++)
            s->ys[j * p->kh + q] = (int32_t)mk_conv_source_index(p->top + j * p->sy + q * p->dy,
                                                                 p->src_h, p->up_y, p->edge_mode);
    for (int64_t i = 0; i < p->out_w; i++)
        for (int64_t q = 0; q < p->kw; q++)
            s->xs[i * p->kw + q] = (int32_t)mk_conv_source_index(p->left + i * p->sx + q * p->dx,
                                                                 p->src_w, p->up_x, p->edge_mode);
    find_run(p, s);
    return MK_OK;
}

typedef struct dw_ctx {
    const mk_conv_params *p;
    const mk_conv_weights *w;
    const dw_plan *s;
    const float *a;
    int64_t an, ay, ax, cout, cpad;
    int64_t parts, part_channels;   /* work item = (output row, part of the channel blocks) */
    int fused;
    float lo, hi;
    mk_status status;
} dw_ctx;

/* Any shape, any block width: out[x][j] for channels o0 + j, j < nc; r->a at channel 0. */
static void dw_row_portable(const dw_ctx *c, const mk_dw_row *r, int64_t o0, int nc) {
    const int64_t m = c->p->cout_g, cin_g = c->p->cin_g;
    for (int32_t ox = 0; ox < r->out_w; ox++) {
        float acc[DW_BLOCK];
        for (int j = 0; j < nc; j++) acc[j] = r->bias[j];
        for (int32_t q = 0; q < r->kh; q++) {
            if (r->ys[q] < 0) continue;
            for (int32_t p = 0; p < r->kw; p++) {
                const int32_t x = r->xs[(int64_t)ox * r->kw + p];
                if (x < 0) continue;
                const float *in = r->a + r->ys[q] * r->ay + x * r->ax;   /* channel 0 */
                const float *wt = r->w + (int64_t)(q * r->kw + p) * cin_g * r->cpad;
                for (int64_t ci = 0; ci < cin_g; ci++)
                    for (int j = 0; j < nc; j++)
                        acc[j] += wt[ci * r->cpad + j] * in[(o0 + j) / m * cin_g + ci];
            }
        }
        float *out = r->out + ox * r->ld;
        for (int j = 0; j < nc; j++) {
            float v = acc[j];
            if (r->lo > -INFINITY || r->hi < INFINITY) v = v < r->lo ? r->lo : v > r->hi ? r->hi : v;
            out[j] = v;
        }
    }
}

/* Small groups on AVX-512: the block in 16-output pieces. */
static void grouped_rows(const dw_ctx *c, const mk_dw_row *r, int64_t o0, int nc) {
#if MK_X86
    const mk_conv_params *p = c->p;
    for (int j0 = 0; j0 < nc; j0 += 16) {
        const int n16 = nc - j0 < 16 ? nc - j0 : 16;
        const int64_t first = (o0 + j0) / p->cout_g;   /* first group */
        mk_gc_row g = {r->a + first * p->cin_g, r->ay, r->ax, r->ys, r->xs, r->kh, r->kw,
                       r->out_w, p->cin_g, p->cout_g,
                       (int32_t)((n16 + p->cout_g - 1) / p->cout_g * p->cin_g), n16,
                       r->w + j0, r->cpad, r->bias + j0, r->lo, r->hi, r->out + j0, r->ld};
        mk_gc_row__avx512(&g);
    }
#else
    (void)c, (void)r, (void)o0, (void)nc;
#endif
}

static void dw_task(void *arg, int64_t begin, int64_t end) {
    dw_ctx *c = arg;
    const mk_conv_params *p = c->p;
    float rowbuf[256 * DW_BLOCK] __attribute__((aligned(64)));
    for (int64_t item = begin; item < end; item++) {
        const int64_t row = item / c->parts, part = item % c->parts;
        const int64_t img = row / p->out_h, oy = row % p->out_h;
        const int64_t m0 = row * p->out_w;
        const int64_t o1 = (part + 1) * c->part_channels < c->cout ? (part + 1) * c->part_channels
                                                                   : c->cout;
        for (int64_t o0 = part * c->part_channels; o0 < o1; o0 += DW_BLOCK) {
            const int nc = (int)(o1 - o0 < DW_BLOCK ? o1 - o0 : DW_BLOCK);
            for (int32_t x0 = 0; x0 < p->out_w; x0 += 256) {   /* row pieces that fit rowbuf */
                const int32_t w = p->out_w - x0 < 256 ? p->out_w - x0 : 256;
                mk_dw_row r = {c->a + img * c->an, c->ay, c->ax, c->s->ys + oy * p->kh,
                               c->s->xs + (int64_t)x0 * p->kw, p->kh, p->kw, w,
                               c->w->packed + o0, c->cpad, c->w->bias + o0, c->lo, c->hi,
                               rowbuf, DW_BLOCK, c->s->run_begin - x0,
                               c->s->run_end - x0 < w ? c->s->run_end - x0 : w, c->s->run_step};
                float *direct;
                int64_t ldc;
                const int in_place = c->fused && mk_conv_direct(p, m0 + x0, w, o0, &direct, &ldc);
                if (in_place) {
                    r.out = direct;
                    r.ld = ldc;
                }
                if (p->cin_g > 1 && c->s->gc_avx512) {
                    grouped_rows(c, &r, o0, nc);
                } else if (p->cin_g == 1 && p->cout_g == 1 && nc == 32) {
                    r.a += o0;
                    c->s->rows->block32(&r);
                } else if (p->cin_g == 1 && p->cout_g == 1 && nc == 16) {
                    r.a += o0;
                    c->s->rows->block16(&r);
                } else {
                    dw_row_portable(c, &r, o0, nc);
                }
                if (!in_place) {
                    mk_status st = mk_conv_store(p, rowbuf, DW_BLOCK, m0 + x0, w, o0, nc);
                    if (st != MK_OK) c->status = st;
                }
            }
        }
    }
}

static mk_status dw_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool) {
    dw_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.w = plan->weights;
    c.s = plan->state;
    float *copy;
    mk_status st = mk_conv_source_f32(p, pool, &c.a, &copy, &c.an, &c.ay, &c.ax);
    if (st != MK_OK) return st;
    c.cout = (int64_t)p->groups * p->cout_g;
    c.cpad = cpad_of(p);
    c.fused = mk_conv_clamp(&p->neuron, &c.lo, &c.hi);
    if (p->accumulate) {   /* a residual to add first: rows go through mk_conv_store */
        c.fused = 0;
        c.lo = -INFINITY;
        c.hi = INFINITY;
    }
    c.status = MK_OK;
    /* fewer than DW_MIN_ITEMS rows (7x7, 14x14 images): split the channels too, so two
     * threads get even shares (from the shape only, never the thread count) */
    const int64_t rows = (int64_t)p->n * p->out_h, blocks = (c.cout + DW_BLOCK - 1) / DW_BLOCK;
    c.parts = rows < DW_MIN_ITEMS ? (DW_MIN_ITEMS + rows - 1) / rows : 1;
    if (c.parts > blocks) c.parts = blocks;
    c.part_channels = (blocks + c.parts - 1) / c.parts * DW_BLOCK;
    c.parts = (blocks * DW_BLOCK + c.part_channels - 1) / c.part_channels;
    mk_parallel_for(pool, rows * c.parts, 1, dw_task, &c);
    free(copy);
    return c.status;
}

const mk_conv_kernel mk_conv_kernel_dwconv = {
    "dwconv", dw_supports, dw_pack, dw_unpack, dw_plan_create, dw_free_plan, dw_run,
    dw_implementation,
};
