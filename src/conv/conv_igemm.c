/* The general convolution kernel: indirect GEMM (XNNPACK's "indirect convolution") over the
 * shared micro-kernel of src/gemm/. Accepts every shape.
 *
 * Rows are output pixels, flattened over (image, y, x); columns are output channels, one
 * packed-B panel of MK_GEMM_NR per group and column block; K = taps x group channels.
 * The indirection buffer (built once per geometry) holds, for every tile of mr rows and every
 * tap, a pointer to the tap's source pixel relative to a private base, or the zero buffer
 * (ZERO padding and the stuffed zeros of a transpose); CLAMP taps point at the edge pixel.
 * At run time a_offset = source address (+ the group's first channel) - base. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <xmmintrin.h>
#include <string.h>

#include "conv/conv_kernels.h"

#define IGEMM_MAX_MR 32
#define IGEMM_CHUNK_ROWS 128   /* rows per parallel work item */
#define IGEMM_MIN_ITEMS 8      /* ... fewer rows when that gives fewer items */
#define IGEMM_IM2COL_CHANNELS 16   /* im2col below this many channels per group */
#define IGEMM_IM2COL_MAX_K 4096    /* ... when a tile's rows fit in L1/L2 */
#define IGEMM_L2_WEIGHTS (256 << 10)   /* bytes of a group's packed weights kept in L2 */

typedef struct igemm_plan {
    const mk_gemm_ukernel *uk;   /* the micro-kernel the indirection was laid out for */
    const float **indirection;   /* tiles x taps x mr */
    float *zero;                 /* cin_g zeros (64-byte aligned) */
    int64_t a_n, a_y, a_x;       /* element strides of the A image the offsets refer to */
    int im2col;                  /* gather each tile's rows once (few channels per tap) */
    int tight;                   /* ... from a tight copy of the source */
} igemm_plan;

static const char *base_of(const igemm_plan *s) { return (const char *)s->zero + 64; }

/* Few channels per tap: the micro-kernel's tap loop would dominate, so gather rows. */
static int im2col_wanted(const mk_conv_params *p) {
    const int64_t k = (int64_t)p->kh * p->kw * p->cin_g;
    return p->cin_g < IGEMM_IM2COL_CHANNELS && k > p->cin_g && k <= IGEMM_IM2COL_MAX_K;
}

static int igemm_supports(const mk_conv_params *shape) {
    (void)shape;
    return 1;
}

static int64_t panels_of(const mk_conv_params *s) {
    return (s->cout_g + MK_GEMM_NR - 1) / MK_GEMM_NR;
}

static mk_status igemm_pack(mk_conv_weights *w, const void *weights, int format) {
    const mk_conv_params *s = &w->shape;
    const int64_t k = (int64_t)s->kh * s->kw * s->cin_g;
    int64_t per_group;
    if (mk_gemm_packed_b_floats(k, s->cout_g, &per_group) != MK_OK) return MK_EINVAL;
    if (per_group > INT64_MAX / 4 / s->groups) return MK_EINVAL;
    w->packed = aligned_alloc(64, (size_t)((per_group * s->groups * 4 + 63) / 64 * 64));
    if (w->packed == NULL) return MK_ENOMEM;
    const size_t es = mk_format_size(format);
    for (int64_t g = 0; g < s->groups; g++)
        mk_gemm_pack_b(k, s->cout_g, (const char *)weights + g * s->cout_g * k * (int64_t)es,
                       format, 1, k, w->packed + g * per_group);
    return MK_OK;
}

static void igemm_unpack(const mk_conv_weights *w, float *weights) {
    const mk_conv_params *s = &w->shape;
    const int64_t k = (int64_t)s->kh * s->kw * s->cin_g, panels = panels_of(s);
    for (int64_t g = 0; g < s->groups; g++)
        for (int64_t o = 0; o < s->cout_g; o++) {
            const float *panel = w->packed + (g * panels + o / MK_GEMM_NR) * k * MK_GEMM_NR;
            float *dst = weights + (g * s->cout_g + o) * k;
            for (int64_t r = 0; r < k; r++) dst[r] = panel[r * MK_GEMM_NR + o % MK_GEMM_NR];
        }
}

static const char *igemm_implementation(const mk_conv_weights *w, char *buffer, size_t size) {
    (void)w;
    const char *name = mk_gemm_ukernel_active()->name;
    if (strncmp(name, "gemm_", 5) == 0) name += 5;
    snprintf(buffer, size, "igemm_%s", name);
    return buffer;
}

static void igemm_free_plan(mk_conv_plan *plan) {
    igemm_plan *s = plan->state;
    if (s == NULL) return;
    free(s->indirection);
    free(s->zero);
    free(s);
    plan->state = NULL;
}

static mk_status igemm_plan_create(mk_conv_plan *plan) {
    const mk_conv_params *p = &plan->params;
    const mk_gemm_ukernel *uk = mk_gemm_ukernel_active();
    const int mr = uk->mr;
    if (mr < 1 || mr > IGEMM_MAX_MR) return MK_EINVAL;
    const int64_t m = (int64_t)p->n * p->out_h * p->out_w;
    const int64_t tiles = (m + mr - 1) / mr, taps = (int64_t)p->kh * p->kw;
    if (tiles > INT64_MAX / 8 / taps / mr) return MK_EINVAL;
    igemm_plan *s = calloc(1, sizeof *s);
    if (s == NULL) return MK_ENOMEM;
    plan->state = s;
    s->uk = uk;
    s->im2col = im2col_wanted(p);
    /* im2col from a tight copy copies whole kernel rows (kw taps x channels) in one go and
     * needs no indirection buffer */
    s->tight = s->im2col && p->dx == 1 && p->up_x == 1 && p->groups == 1;
    mk_conv_source_strides_tight(p, s->tight, &s->a_n, &s->a_y, &s->a_x);
    /* the micro-kernel may read kc floats of zero: a tap's channels, or a whole im2col row */
    const int64_t zero_bytes = (s->im2col ? (int64_t)p->kh * p->kw * p->cin_g : p->cin_g) * 4 + 64;
    s->zero = aligned_alloc(64, (size_t)((zero_bytes + 63) / 64 * 64));
    if (!s->tight) s->indirection = malloc((size_t)(tiles * taps * mr) * sizeof(float *));
    if (s->zero == NULL || (!s->tight && s->indirection == NULL)) {
        igemm_free_plan(plan);
        return MK_ENOMEM;
    }
    memset(s->zero, 0, (size_t)zero_bytes);
    if (s->tight) return MK_OK;
    const char *base = base_of(s);
    for (int64_t t = 0; t < tiles; t++)
        for (int i = 0; i < mr; i++) {
            const float **dst = s->indirection + t * taps * mr + i;
            const int64_t row = t * mr + i;
            if (row >= m) {
                for (int64_t tap = 0; tap < taps; tap++) dst[tap * mr] = s->zero;
                continue;
            }
            const int64_t plane = (int64_t)p->out_h * p->out_w;
            const int64_t img = row / plane, oy = (row % plane) / p->out_w, ox = row % p->out_w;
            for (int64_t q = 0; q < p->kh; q++) {
                const int64_t y = mk_conv_source_index(p->top + oy * p->sy + q * p->dy, p->src_h,
                                                       p->up_y, p->edge_mode);
                for (int64_t pp = 0; pp < p->kw; pp++) {
                    const int64_t x = mk_conv_source_index(p->left + ox * p->sx + pp * p->dx,
                                                           p->src_w, p->up_x, p->edge_mode);
                    const float **at = dst + (q * p->kw + pp) * mr;
                    if (x < 0 || y < 0)
                        *at = s->zero;
                    else
                        *at = (const float *)(base + (img * s->a_n + y * s->a_y + x * s->a_x) * 4);
                }
            }
        }
    return MK_OK;
}

typedef struct igemm_ctx {
    const mk_conv_params *p;
    const mk_conv_weights *w;
    const igemm_plan *s;
    const char *a;              /* float32 source, group 0's first channel */
    int64_t m, tiles, chunk_tiles, chunks, panels, k;
    int im2col;
    int panels_inside;          /* an item runs its tiles through all of its group's panels */
    int fused;                  /* the neuron is the epilogue's clamp */
    float lo, hi;
    mk_status status;
} igemm_ctx;

/* One tile x one panel: the micro-kernel, then the neuron / store. out: the tile's first
 * result in the destination (rows ldc floats apart), or NULL: through `tile` and mk_conv_store. */
static mk_status igemm_tile(const igemm_ctx *c, int64_t m0, int rows, int64_t panel_index,
                            int64_t o0, int nc, int64_t kc, int64_t ks, const float *const *a,
                            intptr_t a_offset, float *out, int64_t ldc, float *tile) {
    const mk_conv_params *p = c->p;
    const mk_gemm_ukernel_fn run = c->s->uk->run;
    const float *wp = c->w->packed + panel_index * c->k * MK_GEMM_NR;
    if (out == NULL) {
        const mk_gemm_epilogue ep = {1.0f, 0.0f, c->w->bias + o0, -INFINITY, INFINITY};
        run(rows, nc, kc, ks, a, a_offset, c->s->zero, wp, tile, MK_GEMM_NR, &ep);
        return mk_conv_store(p, tile, MK_GEMM_NR, m0, rows, o0, nc);
    }
    /* straight into the destination: a residual there is the epilogue's beta * c_old */
    const mk_gemm_epilogue ep = {1.0f, p->accumulate ? 1.0f : 0.0f, c->w->bias + o0, c->lo, c->hi};
    run(rows, nc, kc, ks, a, a_offset, c->s->zero, wp, out, ldc, &ep);
    if (c->fused) return MK_OK;
    mk_neuron_params n = p->neuron;   /* in place, while the tile is in L1 */
    if (n.type == MK_NEURON_PRELU) n.prelu += o0;
    mk_operand v = {out, MK_FMT_F32, 0, 0, ldc, 1};
    return mk_neuron(&n, &v, &v, (mk_extent){1, 1, rows, nc}, NULL);
}

/* One im2col row (output row m): the taps' channels in (tap, channel) order. */
static void gather_row(const igemm_ctx *c, const float *const *ind, int64_t m, intptr_t a_offset,
                       float *dst) {
    const mk_conv_params *p = c->p;
    const igemm_plan *s = c->s;
    const int64_t kc = p->cin_g, mr = s->uk->mr;
    if (!s->tight) {   /* through the indirection buffer, one tap at a time */
        for (int64_t tap = 0; tap < (int64_t)p->kh * p->kw; tap++, dst += kc) {
            const float *src = ind[tap * mr];
            if (src == s->zero) {
                for (int64_t k = 0; k < kc; k++) dst[k] = 0.0f;
            } else {
                src = (const float *)((const char *)src + a_offset);
                for (int64_t k = 0; k < kc; k++) dst[k] = src[k];
            }
        }
        return;
    }
    /* tight source, one group, dilation 1 in x: a kernel row inside the image is one run */
    const int64_t plane = (int64_t)p->out_h * p->out_w, img = m / plane;
    const int64_t oy = (m - img * plane) / p->out_w, ox = m - img * plane - oy * p->out_w;
    const int64_t x0 = p->left + ox * p->sx, y0 = p->top + oy * p->sy, n = p->kw * kc;
    const int inside = x0 >= 0 && x0 + p->kw <= p->src_w;
    const float *image = (const float *)c->a + img * s->a_n;
    for (int64_t q = 0; q < p->kh; q++, dst += n) {
        const int64_t y = mk_conv_source_index(y0 + q * p->dy, p->src_h, p->up_y, p->edge_mode);
        if (y < 0) {
            for (int64_t k = 0; k < n; k++) dst[k] = 0.0f;
            continue;
        }
        const float *row = image + y * s->a_y;
        if (inside) {
            for (int64_t k = 0; k < n; k++) dst[k] = row[x0 * kc + k];
            continue;
        }
        for (int64_t pp = 0; pp < p->kw; pp++) {
            const int64_t x = mk_conv_source_index(x0 + pp, p->src_w, 1, p->edge_mode);
            for (int64_t k = 0; k < kc; k++) dst[pp * kc + k] = x < 0 ? 0.0f : row[x * kc + k];
        }
    }
}

/* Work item = (group, column panel, chunk of tiles), or (group, chunk of tiles) running each
 * tile through all of the group's panels (when they fit in L2), gathering im2col rows once. */
static void igemm_task(void *arg, int64_t begin, int64_t end) {
    igemm_ctx *c = arg;
    const mk_conv_params *p = c->p;
    const igemm_plan *s = c->s;
    const int mr = s->uk->mr;
    const int64_t taps = (int64_t)p->kh * p->kw, kc = p->cin_g;
    float tile[IGEMM_MAX_MR * MK_GEMM_NR] __attribute__((aligned(64)));
    float *rows_buf = NULL;
    const float *row_ptr[IGEMM_MAX_MR];
    if (c->im2col) {
        rows_buf = malloc((size_t)(mr * c->k) * sizeof(float));
        if (rows_buf == NULL) {
            c->status = MK_ENOMEM;
            return;
        }
        for (int i = 0; i < mr; i++) row_ptr[i] = rows_buf + i * c->k;
    }
    for (int64_t item = begin; item < end; item++) {
        const int64_t chunk = item % c->chunks, block = item / c->chunks;
        const int64_t per_group = c->panels_inside ? 1 : c->panels;
        const int64_t g = block / per_group, first_panel = c->panels_inside ? 0 : block % per_group;
        const int64_t last_panel = c->panels_inside ? c->panels : first_panel + 1;
        const intptr_t a_offset = (intptr_t)((uintptr_t)(c->a + g * p->cin_g * 4) -
                                             (uintptr_t)base_of(s));
        const int64_t t0 = chunk * c->chunk_tiles, t1 = t0 + c->chunk_tiles < c->tiles
                                                            ? t0 + c->chunk_tiles : c->tiles;
        const int64_t m1 = t1 * mr < c->m ? t1 * mr : c->m;
        /* the item's rows evenly spaced in the destination (one check, not one per tile) */
        float *out = NULL;
        int64_t ldc = 0;
        if (!mk_conv_direct(p, t0 * mr, (int)(m1 - t0 * mr), g * p->cout_g, &out, &ldc))
            out = NULL;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t m0 = t * mr;
            const int rows = (int)(m1 - m0 < mr ? m1 - m0 : mr);
            const float *const *ind = s->tight ? NULL : s->indirection + t * taps * mr;
            if (taps == 1 && kc <= 64 && !s->tight && !c->im2col && t + 1 < t1) {
                /* A 1x1 convolution with few input channels streams its source from L3 at
                 * batch 8: fetch the next tile's rows while this one computes (figures in
                 * docs/convolution.md). Not for longer rows: a tile's own rows then fill L1,
                 * and fetching the next ones evicts them (960 -> 160 at 7x7: 0.76 -> 1.2 ms). */
                const float *const *next = ind + taps * mr;
                const int64_t lines = (kc * 4 + 63) / 64;
                for (int i = 0; i < mr; i++) {
                    if (next[i] == s->zero) continue;
                    const char *r = (const char *)next[i] + a_offset;
                    for (int64_t l = 0; l < lines; l++) _mm_prefetch(r + 64 * l, _MM_HINT_T0);
                }
            }
            if (c->im2col) {
                for (int i = 0; i < rows; i++)
                    gather_row(c, s->tight ? NULL : ind + i, m0 + i, a_offset, rows_buf + i * c->k);
            }
            for (int64_t panel = first_panel; panel < last_panel; panel++) {
                const int64_t o0 = g * p->cout_g + panel * MK_GEMM_NR;
                const int nc = (int)(p->cout_g - panel * MK_GEMM_NR < MK_GEMM_NR
                                         ? p->cout_g - panel * MK_GEMM_NR : MK_GEMM_NR);
                float *at = out ? out + (m0 - t0 * mr) * ldc + panel * MK_GEMM_NR : NULL;
                mk_status st = c->im2col
                    ? igemm_tile(c, m0, rows, g * c->panels + panel, o0, nc, c->k, 1, row_ptr, 0,
                                 at, ldc, tile)
                    : igemm_tile(c, m0, rows, g * c->panels + panel, o0, nc, kc, taps, ind,
                                 a_offset, at, ldc, tile);
                if (st != MK_OK) c->status = st;
            }
        }
    }
    free(rows_buf);
}

static mk_status igemm_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool) {
    const igemm_plan *s = plan->state;
    igemm_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.w = plan->weights;
    c.s = s;
    c.status = MK_OK;
    float *converted;
    const float *a;
    int64_t an, ay, ax;
    mk_status st = mk_conv_source_f32_tight(p, s->tight, pool, &a, &converted, &an, &ay, &ax);
    if (st != MK_OK) return st;
    c.a = (const char *)a;
    const int mr = s->uk->mr;
    c.m = (int64_t)p->n * p->out_h * p->out_w;
    c.tiles = (c.m + mr - 1) / mr;
    c.panels = panels_of(p);
    c.k = (int64_t)p->kh * p->kw * p->cin_g;
    c.fused = mk_conv_clamp(&p->neuron, &c.lo, &c.hi);
    c.im2col = s->im2col;
    /* a group's packed weights that stay in L2: keep the tiles' rows in L1 across panels */
    c.panels_inside = c.im2col || c.panels * c.k * MK_GEMM_NR * 4 <= IGEMM_L2_WEIGHTS;
    const int64_t blocks = (int64_t)p->groups * (c.panels_inside ? 1 : c.panels);
    /* chunks of 128 rows, smaller where that leaves fewer than IGEMM_MIN_ITEMS items (small
     * images: 14x14, 7x7), so that threads taking items in turn get even shares; from the
     * shape only, never the thread count */
    c.chunk_tiles = (IGEMM_CHUNK_ROWS + mr - 1) / mr;
    if (blocks * ((c.tiles + c.chunk_tiles - 1) / c.chunk_tiles) < IGEMM_MIN_ITEMS) {
        const int64_t wanted = (IGEMM_MIN_ITEMS + blocks - 1) / blocks;
        const int64_t t = (c.tiles + wanted - 1) / wanted;
        if (t < c.chunk_tiles) c.chunk_tiles = t;
    }
    c.chunks = (c.tiles + c.chunk_tiles - 1) / c.chunk_tiles;
    mk_parallel_for(pool, blocks * c.chunks, 1, igemm_task, &c);
    free(converted);
    return c.status;
}

const mk_conv_kernel mk_conv_kernel_igemm = {
    "igemm", igemm_supports, igemm_pack, igemm_unpack, igemm_plan_create, igemm_free_plan,
    igemm_run, igemm_implementation,
};
