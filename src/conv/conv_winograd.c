/* Winograd F(4,3) for 3x3, stride 1, dilation 1, one group: each 4x4 output tile is
 * A^T [sum_c U[c] * V[c]] A with U = G g G^T (weights, transformed once at pack time) and
 * V = B^T d B (6x6 input tiles): 36 multiplications per 16 outputs and channel pair instead of
 * 144. The channel sums are 36 independent GEMMs (tiles x cin times cin x cout), run on the
 * shared micro-kernel (mk_gemm_ukernel_active) with U packed as its B panels.
 *
 * Work items are (block of consecutive tiles over image, tile row, tile column; group of 64
 * or 128 output channels: layers with few tiles still split evenly), sized from the shape only so
 * that the block's transformed input V [36][tiles][cin] and products
 * M [36][tiles][cout] stay in L2: input transform, 36 GEMMs (each U panel reused across the
 * block's tiles), output transform (bias, clamp-like neuron; other neurons right after, on
 * the tile's rows). Selection (supports): channels >= WINO_MIN_CHANNELS both ways (below,
 * the transforms cost more than they save) and 36*cin*cout floats <= WINO_MAX_U_BYTES (the
 * transformed weights are 4x the originals; past that, streaming them costs more than the
 * multiplications saved, e.g. 512->512). MPSKERNELS_CONV_WINOGRAD=0 in the environment at
 * creation turns it off (igemm takes these shapes). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "conv/conv_kernels.h"
#include "gemm/gemm.h"

#define WINO_MIN_CHANNELS 16
#define WINO_MAX_U_BYTES (16 << 20)
#define WINO_BLOCK_BYTES (768 << 10)   /* V + M of one work item */
#define WINO_MAX_MR 32

typedef struct wino_plan {
    const mk_gemm_ukernel *uk;
    ck_wino_in_fn in;
    ck_wino_out_fn out;
    int32_t *ys, *xs;            /* tiles_y x 6 source rows, tiles_x x 6 source columns */
    int64_t tiles_y, tiles_x, tiles, block, blocks;
    int64_t group, groups;       /* output channels per work item (a multiple of NR), groups */
    float *zero;                 /* cin zeros for the micro-kernel's unused rows */
} wino_plan;

static int wino_enabled(void) {
    const char *e = getenv("MPSKERNELS_CONV_WINOGRAD");
    return e == NULL || strcmp(e, "0") != 0;
}

static int wino_supports(const mk_conv_params *s) {
    return s->kh == 3 && s->kw == 3 && s->sy == 1 && s->sx == 1 && s->dy == 1 && s->dx == 1 &&
           s->up_y == 1 && s->up_x == 1 && s->groups == 1 && s->cin_g >= WINO_MIN_CHANNELS &&
           s->cout_g >= WINO_MIN_CHANNELS &&
           36.0 * 4.0 * s->cin_g * s->cout_g <= WINO_MAX_U_BYTES && wino_enabled();
}

/* packed: 36 packed-B matrices (cin x cout) of U, then the original weights (for unpack) */
static int64_t u_floats(const mk_conv_params *s) {
    int64_t f = 0;
    mk_gemm_packed_b_floats(s->cin_g, s->cout_g, &f);
    return f;
}

static mk_status wino_pack(mk_conv_weights *w, const void *weights, int format) {
    const mk_conv_params *s = &w->shape;
    const int64_t cin = s->cin_g, cout = s->cout_g, per = u_floats(s);
    const int64_t total = 36 * per + 9 * cin * cout;
    w->packed = aligned_alloc(64, (size_t)ck_round_up(total * 4, 64));
    float *u = malloc((size_t)(36 * cin * cout) * sizeof(float));
    if (w->packed == NULL || u == NULL) {
        free(u);
        return MK_ENOMEM;
    }
    float *g = w->packed + 36 * per;   /* [o][3][3][c] as float32 */
    mk_operand src = {(void *)weights, format, 0, 0, 1, 1};
    mk_operand dst = {g, MK_FMT_F32, 0, 0, 1, 1};
    mk_status st = mk_copy(&src, &dst, (mk_extent){1, 1, (int32_t)(9 * cin * cout), 1}, NULL);
    if (st != MK_OK) {
        free(u);
        return st;
    }
    static const double G[6][3] = {{1.0 / 4, 0, 0}, {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                   {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                   {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
    for (int64_t o = 0; o < cout; o++)
        for (int64_t c = 0; c < cin; c++) {
            const float *k = g + o * 9 * cin + c;   /* k[(a*3 + b)*cin] = g[a][b] */
            double t[6][3];                          /* G g */
            for (int i = 0; i < 6; i++)
                for (int b = 0; b < 3; b++)
                    t[i][b] = G[i][0] * k[b * cin] + G[i][1] * k[(3 + b) * cin] + G[i][2] * k[(6 + b) * cin];
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 6; j++)    /* U[i*6 + j] as a cin x cout matrix */
                    u[((i * 6 + j) * cin + c) * cout + o] =
                        (float)(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
        }
    for (int xi = 0; xi < 36; xi++)
        mk_gemm_pack_b(cin, cout, u + xi * cin * cout, MK_FMT_F32, cout, 1, w->packed + xi * per);
    free(u);
    return MK_OK;
}

static void wino_unpack(const mk_conv_weights *w, float *weights) {
    const mk_conv_params *s = &w->shape;
    memcpy(weights, w->packed + 36 * u_floats(s), (size_t)(9 * s->cin_g * s->cout_g) * sizeof(float));
}

static const char *wino_implementation(const mk_conv_weights *w, char *buffer, size_t size) {
    (void)w;
    snprintf(buffer, size, "winograd_f4x3__%s", ck_isa_name());
    return buffer;
}

static void wino_free_plan(mk_conv_plan *plan) {
    wino_plan *s = plan->state;
    if (s == NULL) return;
    free(s->ys);
    free(s->xs);
    free(s->zero);
    free(s);
    plan->state = NULL;
}

static mk_status wino_plan_create(mk_conv_plan *plan) {
    const mk_conv_params *p = &plan->params;
    wino_plan *s = calloc(1, sizeof *s);
    if (s == NULL) return MK_ENOMEM;
    plan->state = s;
    s->uk = mk_gemm_ukernel_active();
    if (s->uk->mr < 1 || s->uk->mr > WINO_MAX_MR) {
        wino_free_plan(plan);
        return MK_EINVAL;
    }
    s->tiles_y = (p->out_h + 3) / 4;
    s->tiles_x = (p->out_w + 3) / 4;
    s->tiles = p->n * s->tiles_y * s->tiles_x;
    /* tiles per block: fit WINO_BLOCK_BYTES, a multiple of mr, blocks of equal size */
    const int64_t mr = s->uk->mr;
    int64_t fit = WINO_BLOCK_BYTES / (36 * 4 * ((int64_t)p->cin_g + p->cout_g));
    fit = fit < mr ? mr : fit / mr * mr;
    s->blocks = (s->tiles + fit - 1) / fit;
    s->block = ck_round_up((s->tiles + s->blocks - 1) / s->blocks, mr);
    s->blocks = (s->tiles + s->block - 1) / s->block;
    /* 64 channels when there are few: more, evenly sized items (e.g. 128->128 at 28x28 has
     * 5 blocks; 2 groups make 10 items) for little repeated input transform */
    s->group = p->cout_g <= 128 ? 64 : 128;
    s->groups = (p->cout_g + s->group - 1) / s->group;
    s->ys = malloc((size_t)(s->tiles_y * 6) * sizeof(int32_t));
    s->xs = malloc((size_t)(s->tiles_x * 6) * sizeof(int32_t));
    s->zero = calloc((size_t)p->cin_g, sizeof(float));
    if (s->ys == NULL || s->xs == NULL || s->zero == NULL) {
        wino_free_plan(plan);
        return MK_ENOMEM;
    }
    for (int64_t t = 0; t < s->tiles_y; t++)
        for (int i = 0; i < 6; i++)
            s->ys[t * 6 + i] = (int32_t)mk_conv_source_index(p->top + 4 * t + i, p->src_h, 1, p->edge_mode);
    for (int64_t t = 0; t < s->tiles_x; t++)
        for (int i = 0; i < 6; i++)
            s->xs[t * 6 + i] = (int32_t)mk_conv_source_index(p->left + 4 * t + i, p->src_w, 1, p->edge_mode);
    switch (mk_active_isa()) {
#if MK_X86
    case MK_ISA_AVX512: s->in = ck_wino_in__avx512; s->out = ck_wino_out__avx512; break;
    case MK_ISA_AVX2: s->in = ck_wino_in__avx2; s->out = ck_wino_out__avx2; break;
#endif
    default: s->in = ck_wino_in__generic; s->out = ck_wino_out__generic; break;
    }
    return MK_OK;
}

typedef struct wino_ctx {
    const mk_conv_params *p;
    const mk_conv_weights *w;
    const wino_plan *s;
    const float *a;              /* float32 source */
    int64_t a_n, a_y, a_x;
    int64_t coutp;               /* row stride of M and of the store tile */
    int fused;
    float lo, hi;
    mk_status status;
} wino_ctx;

/* Store (or finish) output rows of a tile, channels [o0, o0 + nc): the tile buffer through mk_conv_store, or the
 * neuron in place when results went straight to the destination. */
static mk_status wino_finish(const wino_ctx *c, int direct, float *const *out, float *tile,
                             int64_t img, int64_t y0, int64_t x0, int64_t o0, int64_t nc) {
    const mk_conv_params *p = c->p;
    const int cols = (int)(p->out_w - x0 < 4 ? p->out_w - x0 : 4);
    for (int i = 0; i < 4 && y0 + i < p->out_h; i++) {
        mk_status st = MK_OK;
        if (!direct)
            st = mk_conv_store(p, tile + i * 4 * c->coutp + o0, c->coutp,
                               (img * p->out_h + y0 + i) * p->out_w + x0, cols, o0, (int)nc);
        else if (!c->fused) {
            mk_neuron_params n = p->neuron;
            if (n.type == MK_NEURON_PRELU) n.prelu += o0;
            mk_operand v = {out[i * 4], MK_FMT_F32, 0, 0, p->dst.stride_x, 1};
            st = mk_neuron(&n, &v, &v, (mk_extent){1, 1, cols, (int32_t)nc}, NULL);
        }
        if (st != MK_OK) return st;
    }
    return MK_OK;
}

static void wino_task(void *arg, int64_t begin, int64_t end) {
    wino_ctx *c = arg;
    const mk_conv_params *p = c->p;
    const wino_plan *s = c->s;
    const mk_gemm_ukernel *uk = s->uk;
    const int64_t cin = p->cin_g, cout = p->cout_g, B = s->block, per = u_floats(p);
    const int direct = p->dst.format == MK_FMT_F32 && p->sub_pixel == 1;
    float *v = malloc((size_t)(36 * B * (cin + c->coutp) + (direct ? 0 : 16 * c->coutp)) * sizeof(float));
    if (v == NULL) {
        c->status = MK_ENOMEM;
        return;
    }
    float *m = v + 36 * B * cin, *tile = m + 36 * B * c->coutp;
    const float *px[36];
    float *out[16];
    const mk_gemm_epilogue ep = {1.0f, 0.0f, NULL, -INFINITY, INFINITY};
    for (int64_t item = begin; item < end; item++) {
        const int64_t t0 = item / s->groups * B, nt = s->tiles - t0 < B ? s->tiles - t0 : B;
        const int64_t o0 = item % s->groups * s->group;
        const int64_t nc_group = cout - o0 < s->group ? cout - o0 : s->group;
        for (int64_t t = 0; t < nt; t++) {   /* input transform */
            const int64_t tile_i = t0 + t, plane = s->tiles_y * s->tiles_x;
            const int64_t img = tile_i / plane, ty = tile_i % plane / s->tiles_x, tx = tile_i % s->tiles_x;
            const float *base = c->a + img * c->a_n;
            for (int i = 0; i < 6; i++)
                for (int j = 0; j < 6; j++) {
                    const int32_t y = s->ys[ty * 6 + i], x = s->xs[tx * 6 + j];
                    px[i * 6 + j] = y < 0 || x < 0 ? NULL : base + y * c->a_y + x * c->a_x;
                }
            s->in(px, cin, v + t * cin, B * cin);
        }
        for (int xi = 0; xi < 36; xi++)   /* M[xi] = V[xi] U[xi] */
            for (int64_t j = o0; j < o0 + nc_group; j += MK_GEMM_NR) {
                const float *w = c->w->packed + xi * per + j * cin;
                const int nc = (int)(cout - j < MK_GEMM_NR ? cout - j : MK_GEMM_NR);
                for (int64_t t = 0; t < nt; t += uk->mr) {
                    const float *rows[WINO_MAX_MR];
                    const int mr = (int)(nt - t < uk->mr ? nt - t : uk->mr);
                    for (int i = 0; i < mr; i++) rows[i] = v + (xi * B + t + i) * cin;
                    uk->run(mr, nc, cin, 1, rows, 0, s->zero, w,
                            m + (xi * B + t) * c->coutp + j, c->coutp, &ep);
                }
            }
        for (int64_t t = 0; t < nt; t++) {   /* output transform */
            const int64_t tile_i = t0 + t, plane = s->tiles_y * s->tiles_x;
            const int64_t img = tile_i / plane, ty = tile_i % plane / s->tiles_x, tx = tile_i % s->tiles_x;
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) {
                    const int64_t y = ty * 4 + i, x = tx * 4 + j;
                    float **o = &out[i * 4 + j];
                    if (y >= p->out_h || x >= p->out_w) *o = NULL;
                    else if (direct)
                        *o = (float *)p->dst.data + img * p->dst.stride_n + y * p->dst.stride_y +
                             x * p->dst.stride_x + o0;
                    else *o = tile + (i * 4 + j) * c->coutp + o0;
                }
            s->out(m + t * c->coutp + o0, B * c->coutp, nc_group, c->w->bias + o0, out,
                   direct && p->accumulate, direct ? c->lo : -INFINITY, direct ? c->hi : INFINITY);
            mk_status st = wino_finish(c, direct, out, tile, img, ty * 4, tx * 4, o0, nc_group);
            if (st != MK_OK) c->status = st;
        }
    }
    free(v);
}

static mk_status wino_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool) {
    wino_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.w = plan->weights;
    c.s = plan->state;
    c.status = MK_OK;
    c.coutp = ck_round_up(p->cout_g, CK_CPAD);
    float *converted = NULL;
    mk_status st = mk_conv_source_f32(p, pool, &c.a, &converted, &c.a_n, &c.a_y, &c.a_x);
    if (st != MK_OK) return st;
    c.fused = mk_conv_clamp(&p->neuron, &c.lo, &c.hi);
    mk_parallel_for(pool, c.s->blocks * c.s->groups, 1, wino_task, &c);
    free(converted);
    return c.status;
}

const mk_conv_kernel mk_conv_kernel_winograd = {
    "winograd", wino_supports, wino_pack, wino_unpack, wino_plan_create, wino_free_plan,
    wino_run, wino_implementation,
};
