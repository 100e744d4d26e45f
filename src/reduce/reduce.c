/* Reduction driver: mk_reduce, mk_reduce_read_probe and the ISA dispatch.
 *
 * Work is split over outputs only, in chunks of a grain fixed by the shape:
 *  - across channels: chunks of pixels; each pixel's channels are reduced by one call.
 *  - along a row / column: "items" = (image, row or column, span of up to RD_SPAN channels;
 *    the spans of one item's channels are of equal size); a column reduction of an image
 *    without channel padding takes (x, c) as one run of channels.
 *    Each item walks the reduced axis in order, in blocks of RD_ROWS steps whose partial
 *    results stay in a stack accumulator (one pass over the source, few streams at once).
 * fp32 sources are read in place; other formats are decoded into fp32 scratch blocks first
 * with the elementwise family's decoders (the same values whatever the ISA).
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "elementwise/elementwise.h"
#include "reduce.h"

/* ---- dispatch ------------------------------------------------------------------------ */

typedef struct rd_isa {
    const mk_rd_kernels *rd;
    const mk_ew_kernels *ew;  /* format decoders of the same ISA */
} rd_isa;

static const rd_isa rd_generic = {&mk_rd_kernels__generic, &mk_ew_kernels__generic};
#if MK_X86
static const rd_isa rd_avx2 = {&mk_rd_kernels__avx2, &mk_ew_kernels__avx2};
static const rd_isa rd_avx512 = {&mk_rd_kernels__avx512, &mk_ew_kernels__avx512};
#endif

static _Atomic(const rd_isa *) g_isa = NULL;

void mk_reduce_select_isa(mk_isa isa) {
    const rd_isa *k = &rd_generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) k = &rd_avx512;
    else if (isa == MK_ISA_AVX2) k = &rd_avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_isa, k, memory_order_release);
}

static const rd_isa *rd_kernels(void) {
    const rd_isa *k = atomic_load_explicit(&g_isa, memory_order_acquire);
    if (k == NULL) { /* nobody called mk_select_isa yet: take the best this CPU supports */
        mk_reduce_select_isa(mk_best_isa());
        k = atomic_load_explicit(&g_isa, memory_order_acquire);
    }
    return k;
}

/* ---- shared ---------------------------------------------------------------------------- */

#define RD_SCRATCH 4096   /* fp32 elements of decoded source (and of weights) per block */
#define RD_OUT 256        /* pixels per output block (across channels) */
#define RD_SPAN 4096      /* channels (or merged column elements) per row / column item */
#define RD_ROWS 16        /* steps of the reduced axis per accumulator pass (fp32 source):
                           * 4 -> 16 took row / column sums of 1.6 MB in L2 from 77-81% /
                           * 67-69% to 84-90% / 80-84% of the read probe's rate, 3.2 MB and
                           * 64 MiB 90-97% -> 95-99% (one thread; two threads on 64 MiB:
                           * no change through the noise; in session 2, 8 steps were 4x
                           * slower than 4 there, on a machine then loaded to 6-8) */
#define RD_GRAIN 65536    /* about this many source elements per chunk */
_Static_assert(RD_SPAN <= RD_SCRATCH, "a decoded row of a span must fit the scratch");

typedef struct rd_ctx {
    const mk_rd_kernels *K;
    mk_ew_load_fn load_x, load_w;  /* NULL: fp32, read in place */
    mk_reduce_params p;
    const mk_operand *src, *w, *dst;
    size_t xes, wes, des;
    int64_t N, H, W, C;
    /* rows / columns: B outputs per image along the kept axis, L steps of stride S; the C
     * channels (or merged column elements) in nspan spans of `span` (the last may be short) */
    int64_t B, L, S, sb_src, sb_dst, dst_sc, nspan, span;
    atomic_int failed;
} rd_ctx;

static inline const char *rd_at(const mk_operand *o, size_t es, int64_t n, int64_t y, int64_t x) {
    return (const char *)o->data + (n * o->stride_n + y * o->stride_y + x * o->stride_x) * (int64_t)es;
}

/* Store m fp32 results to dst, `stride` elements apart. */
static void rd_store(const rd_ctx *c, const float *v, char *d, int64_t stride, int64_t m) {
    if (c->dst->format == MK_FMT_F32 && stride == 1) memcpy(d, v, (size_t)m * sizeof(float));
    else mk_ew_store_strided(c->dst->format, v, d, stride, m);
}

/* Scratch for decoded pixels: the stack block, or (more channels than it holds) the heap. */
static float *rd_scratch(rd_ctx *c, float *stack, int64_t need, float **heap) {
    if (need <= RD_SCRATCH) return stack;
    *heap = (float *)malloc((size_t)need * sizeof(float));
    if (*heap == NULL) atomic_store(&c->failed, 1);
    return *heap;
}

/* ---- across channels ----------------------------------------------------------------- */

/* Decode q pixels of C channels, `stride` bytes apart, into packed fp32 scratch. */
static void rd_decode(mk_ew_load_fn load, const char *p, int64_t stride, int64_t q, int64_t C,
                      float *scratch) {
    for (int64_t k = 0; k < q; k++) load(p + k * stride, scratch + k * C, C);
}

static void rd_channels_task(void *vctx, int64_t begin, int64_t end) {
    rd_ctx *c = (rd_ctx *)vctx;
    const mk_rd_kernels *K = c->K;
    const int op = c->p.op;
    const int64_t C = c->C, W = c->W, H = c->H;
    const int weighted = c->w != NULL, by_count = weighted && c->p.by_nonzero_weights;
    _Alignas(64) float out[RD_OUT], cnt[RD_OUT];
    _Alignas(64) float xs_stack[RD_SCRATCH], ws_stack[RD_SCRATCH];
    float *xheap = NULL, *wheap = NULL, *xs = NULL, *ws = NULL;
    if (c->load_x) xs = rd_scratch(c, xs_stack, C, &xheap);
    if (weighted && c->load_w) ws = rd_scratch(c, ws_stack, C, &wheap);
    if ((c->load_x && !xs) || (weighted && c->load_w && !ws)) goto done;
    /* pixels per decoded block */
    const int64_t per = C <= RD_SCRATCH ? RD_SCRATCH / C : 1;

    for (int64_t p = begin; p < end;) {
        const int64_t x = p % W, y = (p / W) % H, n = p / (W * H);
        int64_t r = W - x;
        if (r > end - p) r = end - p;
        if (r > RD_OUT) r = RD_OUT;
        const char *sp = rd_at(c->src, c->xes, n, y, x);
        const char *wp = weighted ? rd_at(c->w, c->wes, n, y, x) : NULL;
        const int64_t sx = c->src->stride_x, wsx = weighted ? c->w->stride_x : 0;
        for (int64_t i = 0; i < r;) {
            int64_t q = r - i;
            if ((c->load_x || (weighted && c->load_w)) && q > per) q = per;
            const float *xb = (const float *)(sp + i * sx * (int64_t)c->xes);
            int64_t xst = sx;
            if (c->load_x) {
                rd_decode(c->load_x, (const char *)xb, sx * (int64_t)c->xes, q, C, xs);
                xb = xs;
                xst = C;
            }
            if (!weighted) {
                if (op == MK_REDUCE_ARGMIN || op == MK_REDUCE_ARGMAX)
                    K->channels_arg(op, xb, xst, C, q, out + i);
                else
                    K->channels(op == MK_REDUCE_MEAN ? MK_REDUCE_SUM : op, xb, xst, C, q, out + i);
            } else {
                const float *wb = (const float *)(wp + i * wsx * (int64_t)c->wes);
                int64_t wst = wsx;
                if (c->load_w) {
                    rd_decode(c->load_w, (const char *)wb, wsx * (int64_t)c->wes, q, C, ws);
                    wb = ws;
                    wst = C;
                }
                K->channels_weighted(xb, xst, wb, wst, C, q, out + i, by_count ? cnt + i : NULL);
            }
            i += q;
        }
        if (op == MK_REDUCE_MEAN) {
            for (int64_t i = 0; i < r; i++) out[i] /= (float)C;
        } else if (op == MK_REDUCE_SUM) {
            if (by_count) for (int64_t i = 0; i < r; i++) out[i] /= cnt[i];
            else if (!weighted) for (int64_t i = 0; i < r; i++) out[i] *= c->p.weight;
        }
        rd_store(c, out, (char *)rd_at(c->dst, c->des, n, y, x), c->dst->stride_x, r);
        p += r;
    }
done:
    free(xheap);
    free(wheap);
}

/* ---- along a row or a column ------------------------------------------------------------ */

static void rd_axis_task(void *vctx, int64_t begin, int64_t end) {
    rd_ctx *c = (rd_ctx *)vctx;
    const mk_rd_kernels *K = c->K;
    const int op = c->p.op == MK_REDUCE_MEAN ? MK_REDUCE_SUM : c->p.op;
    const int64_t L = c->L, S = c->S, C = c->C;
    _Alignas(64) float acc[RD_SPAN];
    _Alignas(64) float xs[RD_SCRATCH];
    for (int64_t t = begin; t < end; t++) {
        const int64_t sb = t % c->nspan, b = (t / c->nspan) % c->B, n = t / (c->nspan * c->B);
        const int64_t j0 = sb * c->span;
        const int64_t M = C - j0 < c->span ? C - j0 : c->span;
        const char *base = (const char *)c->src->data +
                           (n * c->src->stride_n + b * c->sb_src + j0) * (int64_t)c->xes;
        if (!c->load_x) {
            for (int64_t i = 0; i < L; i += RD_ROWS) {
                const int64_t m = L - i < RD_ROWS ? L - i : RD_ROWS;
                K->strided(op, (const float *)base + i * S, S, m, M, acc, i == 0);
            }
        } else {
            const int64_t rows = M <= RD_SCRATCH ? RD_SCRATCH / M : 1;
            for (int64_t i = 0; i < L; i += rows) {
                const int64_t m = L - i < rows ? L - i : rows;
                rd_decode(c->load_x, base + i * S * (int64_t)c->xes, S * (int64_t)c->xes, m, M, xs);
                K->strided(op, xs, M, m, M, acc, i == 0);
            }
        }
        if (c->p.op == MK_REDUCE_MEAN)
            for (int64_t j = 0; j < M; j++) acc[j] /= (float)L;
        char *d = (char *)c->dst->data +
                  (n * c->dst->stride_n + b * c->sb_dst + j0 * c->dst_sc) * (int64_t)c->des;
        rd_store(c, acc, d, c->dst_sc, M);
    }
}

/* ---- entry points ----------------------------------------------------------------------- */

/* The grain of n outputs of `size` source elements each: chunks of about RD_GRAIN elements,
 * their number rounded up to a multiple of 4, so that the pool's contiguous shares are equal
 * for 2 or 4 threads (1x256x56x56 across channels: 13 chunks of 256 pixels gave 2 threads
 * 6 and 7 chunks; now 16 of 196). */
static int64_t rd_grain(int64_t n, int64_t size) {
    const int64_t g = RD_GRAIN / size > 1 ? RD_GRAIN / size : 1;
    const int64_t chunks = ((n + g - 1) / g + 3) & ~(int64_t)3;
    return (n + chunks - 1) / chunks;
}

static int rd_valid(const mk_operand *o) {
    return o != NULL && o->data != NULL && mk_format_size(o->format) != 0;
}

mk_status mk_reduce(const mk_reduce_params *p, const mk_operand *src, const mk_operand *weights,
                    const mk_operand *dst, mk_extent e, mk_pool *pool) {
    if (p == NULL || !rd_valid(src) || !rd_valid(dst) || src->stride_c != 1) return MK_EINVAL;
    if (p->op < MK_REDUCE_SUM || p->op > MK_REDUCE_ARGMAX) return MK_EINVAL;
    if (p->axis < MK_REDUCE_FEATURE_CHANNELS || p->axis > MK_REDUCE_COLUMN) return MK_EINVAL;
    const int arg = p->op == MK_REDUCE_ARGMIN || p->op == MK_REDUCE_ARGMAX;
    if (arg && p->axis != MK_REDUCE_FEATURE_CHANNELS) return MK_EINVAL;
    if (weights != NULL && (!rd_valid(weights) || weights->stride_c != 1 ||
                            p->axis != MK_REDUCE_FEATURE_CHANNELS ||
                            (p->op != MK_REDUCE_SUM && p->op != MK_REDUCE_MEAN)))
        return MK_EINVAL;
    if (e.n < 0 || e.h < 0 || e.w < 0 || e.c < 0) return MK_EINVAL;
    if ((int64_t)e.n * e.h * e.w * e.c == 0) return MK_OK;

    const rd_isa *isa = rd_kernels();
    rd_ctx c;
    memset(&c, 0, sizeof c);
    c.K = isa->rd;
    c.p = *p;
    c.src = src; c.w = weights; c.dst = dst;
    c.xes = mk_format_size(src->format);
    c.des = mk_format_size(dst->format);
    c.load_x = src->format == MK_FMT_F32 ? NULL : isa->ew->load[src->format];
    if (weights) {
        c.wes = mk_format_size(weights->format);
        c.load_w = weights->format == MK_FMT_F32 ? NULL : isa->ew->load[weights->format];
    }
    c.N = e.n; c.H = e.h; c.W = e.w; c.C = e.c;
    atomic_init(&c.failed, 0);

    if (p->axis == MK_REDUCE_FEATURE_CHANNELS) {
        const int64_t P = (int64_t)e.n * e.h * e.w;
        mk_parallel_for(pool, P, rd_grain(P, e.c), rd_channels_task, &c);
    } else {
        c.dst_sc = dst->stride_c;
        if (p->axis == MK_REDUCE_ROW) {
            c.B = e.h; c.L = e.w; c.S = src->stride_x;
            c.sb_src = src->stride_y; c.sb_dst = dst->stride_y;
        } else {
            c.B = e.w; c.L = e.h; c.S = src->stride_y;
            c.sb_src = src->stride_x; c.sb_dst = dst->stride_x;
            /* no channel padding in source and destination: (x, c) is one span */
            if (src->stride_x == e.c && dst->stride_x == e.c * dst->stride_c) {
                c.B = 1;
                c.C = (int64_t)e.w * e.c;
            }
        }
        c.nspan = (c.C + RD_SPAN - 1) / RD_SPAN;
        /* spans of equal size (a multiple of 16): with 2 threads, the two shares of a column
         * reduction of 1x56x56x256 (3.5 spans of 4096) did 8192 and 6144 columns */
        c.span = ((c.C + c.nspan - 1) / c.nspan + 15) & ~(int64_t)15;
        c.nspan = (c.C + c.span - 1) / c.span;   /* the rounding may leave fewer */
        const int64_t items = c.N * c.B * c.nspan;
        mk_parallel_for(pool, items, rd_grain(items, c.L * (c.C < c.span ? c.C : c.span)),
                        rd_axis_task, &c);
    }
    return atomic_load(&c.failed) ? MK_ENOMEM : MK_OK;
}

/* ---- read bandwidth probe ----------------------------------------------------------------- */

typedef struct rd_probe_ctx {
    const mk_rd_kernels *K;
    const uint64_t *x;
    _Atomic uint64_t result;
} rd_probe_ctx;

#define RD_PROBE_GRAIN (1 << 17) /* 64-bit words: 1 MiB per chunk */

static void rd_probe_task(void *vctx, int64_t begin, int64_t end) {
    rd_probe_ctx *c = (rd_probe_ctx *)vctx;
    atomic_fetch_or(&c->result, c->K->read_or(c->x + begin, end - begin));
}

uint64_t mk_reduce_read_probe(const void *data, int64_t nbytes, mk_pool *pool) {
    if (data == NULL || nbytes < 8) return 0;
    rd_probe_ctx c;
    c.K = rd_kernels()->rd;
    c.x = (const uint64_t *)data;
    atomic_init(&c.result, 0);
    mk_parallel_for(pool, nbytes / 8, RD_PROBE_GRAIN, rd_probe_task, &c);
    return atomic_load(&c.result);
}
