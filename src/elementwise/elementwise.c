/* Elementwise driver: mk_copy, mk_fill, mk_neuron, mk_arithmetic, mk_sum and the ISA dispatch.
 *
 * Geometry: the four axes (n, y, x, c) lose their extent-1 members, are ordered by the
 * destination's |stride| (largest outermost; stable, so the natural order is kept for the
 * usual layouts) and neighbours are merged whenever every operand satisfies
 * stride_outer == extent_inner * stride_inner. The innermost merged axis is the "run".
 * The flattened element index space [0, total) is cut into chunks of a fixed grain (shape
 * and operation only, never the thread count) for mk_parallel_for; a chunk walks its runs
 * with an odometer and hands each run, in blocks of at most MK_EW_BLOCK elements when a
 * conversion is needed, to the microkernels of the active ISA table. fp32 contiguous
 * operands are used in place; everything else goes through stack scratch.
 */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "elementwise.h"

/* ---- dispatch ------------------------------------------------------------------------ */

static _Atomic(const mk_ew_kernels *) g_kernels = NULL;

void mk_elementwise_select_isa(mk_isa isa) {
    const mk_ew_kernels *k = &mk_ew_kernels__generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) k = &mk_ew_kernels__avx512;
    else if (isa == MK_ISA_AVX2) k = &mk_ew_kernels__avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_kernels, k, memory_order_release);
}

static const mk_ew_kernels *ew_kernels(void) {
    const mk_ew_kernels *k = atomic_load_explicit(&g_kernels, memory_order_acquire);
    if (k == NULL) { /* nobody called mk_select_isa yet: take the best this CPU supports */
        mk_elementwise_select_isa(mk_best_isa());
        k = atomic_load_explicit(&g_kernels, memory_order_acquire);
    }
    return k;
}

size_t mk_format_size(int format) {
    switch (format) {
    case MK_FMT_UNORM8: return 1;
    case MK_FMT_UNORM16: case MK_FMT_F16: case MK_FMT_BF16: return 2;
    case MK_FMT_F32: return 4;
    default: return 0;
    }
}

/* ---- geometry ------------------------------------------------------------------------ */

#define EW_MAXOP 3 /* operand 0 is the destination */
#define EW_SHORT 16 /* runs shorter than this go in blocks (ew_geom.block) */

typedef struct ew_geom {
    int nd;                      /* merged dims, dim nd-1 is the run */
    int64_t ext[4];
    int64_t st[EW_MAXOP][4];     /* element strides */
    int chan_dim;                /* PRELU: outer dim that is the channel axis alone, or -1 */
    int chan_inner;              /* PRELU: the channel axis is the run's innermost part */
    int64_t block;               /* short runs: at most this many runs per block, 0: none */
    int64_t total;
} ew_geom;

/* prelu: keep the channel axis (3) either as the innermost component of the run or alone. */
static void ew_geom_build(ew_geom *g, mk_extent e, const mk_operand *const *ops, int nops,
                          int prelu) {
    int64_t E[4] = {e.n, e.h, e.w, e.c};
    int ax[4], na = 0;
    for (int a = 0; a < 4; a++)
        if (E[a] != 1) ax[na++] = a;
    g->total = E[0] * E[1] * E[2] * E[3];
    g->chan_dim = -1;
    g->chan_inner = 0;
    g->block = 0;
    if (na == 0) { /* a single element */
        g->nd = 1;
        g->ext[0] = 1;
        for (int k = 0; k < nops; k++) g->st[k][0] = 1;
        return;
    }
    int64_t S[EW_MAXOP][4];
    for (int k = 0; k < nops; k++) {
        S[k][0] = ops[k]->stride_n; S[k][1] = ops[k]->stride_y;
        S[k][2] = ops[k]->stride_x; S[k][3] = ops[k]->stride_c;
    }
    /* The innermost run follows the destination's unit-stride axis, unless a source's is
     * far longer (a layout change such as NCHW -> NHWC with 3 channels: runs of 224 source
     * pixels written 3 apart instead of runs of 3 gathered from 3 planes). */
    int key = 0;
    if (!prelu) {
        int64_t best = 0;
        for (int k = 0; k < nops; k++)
            for (int i = 0; i < na; i++)
                if ((S[k][ax[i]] == 1 || S[k][ax[i]] == -1) && E[ax[i]] > best * (k ? 4 : 1)) {
                    best = E[ax[i]];
                    key = k;
                }
    }
    /* stable insertion sort by the key operand's |stride|, descending */
    for (int i = 1; i < na; i++) {
        int a = ax[i], j = i;
        int64_t sa = S[key][a] < 0 ? -S[key][a] : S[key][a];
        while (j > 0) {
            int64_t sb = S[key][ax[j - 1]] < 0 ? -S[key][ax[j - 1]] : S[key][ax[j - 1]];
            if (sb >= sa) break;
            ax[j] = ax[j - 1];
            j--;
        }
        ax[j] = a;
    }
    /* merge from the innermost axis outwards; dims are built innermost first */
    int64_t ext[4], st[EW_MAXOP][4];
    int isch[4]; /* dim holds the channel axis (as innermost component) */
    int nd = 0;
    for (int i = na - 1; i >= 0; i--) {
        int a = ax[i];
        int merge = nd > 0;
        if (merge && prelu && (a == 3 || (isch[nd - 1] && nd - 1 != 0))) merge = 0;
        for (int k = 0; merge && k < nops; k++)
            if (S[k][a] != ext[nd - 1] * st[k][nd - 1]) merge = 0;
        if (merge) {
            ext[nd - 1] *= E[a];
        } else {
            ext[nd] = E[a];
            for (int k = 0; k < nops; k++) st[k][nd] = S[k][a];
            isch[nd] = (a == 3);
            nd++;
        }
    }
    g->nd = nd;
    for (int d = 0; d < nd; d++) { /* reverse: dim 0 outermost */
        g->ext[d] = ext[nd - 1 - d];
        for (int k = 0; k < nops; k++) g->st[k][d] = st[k][nd - 1 - d];
        if (isch[nd - 1 - d]) {
            if (d == nd - 1) g->chan_inner = 1;
            else g->chan_dim = d;
        }
    }
    /* Runs of a few channels of padded pixels (3 of 4): one microkernel call per run costs
     * ~20 ns, 10-20x the work, so blocks of whole runs are gathered and scattered instead.
     * PRELU's slopes follow the run only when the channels are its innermost part. */
    if (nd >= 2 && g->total > 0 && g->ext[nd - 1] < EW_SHORT && (!prelu || g->chan_inner))
        g->block = MK_EW_BLOCK / g->ext[nd - 1];
}

/* Walks the runs of [begin, end): calls run(ctx, off[], L, run_off, outer_idx[]) */
typedef struct ew_iter {
    int64_t idx[4];  /* odometer over the outer dims */
    int64_t off[EW_MAXOP];
} ew_iter;

static inline void ew_iter_start(const ew_geom *g, int nops, ew_iter *it, int64_t outer) {
    for (int d = g->nd - 2; d >= 0; d--) {
        it->idx[d] = outer % g->ext[d];
        outer /= g->ext[d];
    }
    for (int k = 0; k < nops; k++) {
        int64_t o = 0;
        for (int d = 0; d < g->nd - 1; d++) o += it->idx[d] * g->st[k][d];
        it->off[k] = o;
    }
}

static inline void ew_iter_next(const ew_geom *g, int nops, ew_iter *it) {
    for (int d = g->nd - 2; d >= 0; d--) {
        for (int k = 0; k < nops; k++) it->off[k] += g->st[k][d];
        if (++it->idx[d] < g->ext[d]) return;
        for (int k = 0; k < nops; k++) it->off[k] -= it->idx[d] * g->st[k][d];
        it->idx[d] = 0;
    }
}

/* At the start of a run: how many whole runs of the next dim (at most `rem` elements) the
 * short-run path takes as one block; 0 for the run alone. */
static inline int64_t ew_block_runs(const ew_geom *g, const ew_iter *it, int64_t rem) {
    if (g->block == 0) return 0;
    const int d = g->nd - 2;
    int64_t P = g->ext[d] - it->idx[d], L = g->ext[d + 1];
    if (P > rem / L) P = rem / L;
    if (P > g->block) P = g->block;
    return P >= 2 ? P : 0;
}

/* Moves the odometer P - 1 runs on along the next dim (no carry: ew_block_runs stays in it). */
static inline void ew_iter_skip(const ew_geom *g, int nops, ew_iter *it, int64_t P) {
    const int d = g->nd - 2;
    it->idx[d] += P - 1;
    for (int k = 0; k < nops; k++) it->off[k] += (P - 1) * g->st[k][d];
}

/* P runs of L elements of es bytes, run starts ds / ss elements apart (ss 0: the same run
 * each time). d and s never overlap: a same-format block copy onto itself is skipped. */
static inline void ew_runs_copy(const mk_ew_kernels *K, char *d, int64_t ds, const char *s,
                                int64_t ss, int64_t L, int64_t P, size_t es) {
    const int64_t e = (int64_t)es;
    K->runs(d, ds * e, s, ss * e, L * e, P);
}

static inline char *ew_ptr(const mk_operand *o, size_t es, int64_t off) {
    return (char *)o->data + off * (int64_t)es;
}

static int ew_valid_operand(const mk_operand *o) {
    return o != NULL && o->data != NULL && mk_format_size(o->format) != 0;
}

static int ew_valid_extent(mk_extent e) { return e.n >= 0 && e.h >= 0 && e.w >= 0 && e.c >= 0; }

/* P runs of L elements of a `fmt` operand at p (element stride si, run stride sr) as P * L
 * contiguous fp32: in place if they already are, else converted into buf (tmp: scratch). */
static const float *ew_block_load(const mk_ew_kernels *K, int fmt, const char *p, int64_t si,
                                  int64_t sr, int64_t L, int64_t P, float *buf, char *tmp) {
    const size_t es = mk_format_size(fmt);
    if (si != 1) {
        for (int64_t q = 0; q < P; q++)
            mk_ew_load_strided(fmt, p + q * sr * (int64_t)es, si, buf + q * L, L);
        return buf;
    }
    if (sr == L && fmt == MK_FMT_F32) return (const float *)p;
    if (sr != L) {
        ew_runs_copy(K, fmt == MK_FMT_F32 ? (char *)buf : tmp, L, p, sr, L, P, es);
        if (fmt == MK_FMT_F32) return buf;
        p = tmp;
    }
    K->load[fmt](p, buf, P * L);
    return buf;
}

/* The inverse: P * L contiguous fp32 y into the P runs at p (y may be p when contiguous). */
static void ew_block_store(const mk_ew_kernels *K, int fmt, char *p, int64_t si, int64_t sr,
                           int64_t L, int64_t P, const float *y, char *tmp) {
    const size_t es = mk_format_size(fmt);
    if (si != 1) {
        for (int64_t q = 0; q < P; q++)
            mk_ew_store_strided(fmt, y + q * L, p + q * sr * (int64_t)es, si, L);
    } else if (sr == L) {
        K->store[fmt](y, p, P * L);
    } else if (fmt == MK_FMT_F32) {
        ew_runs_copy(K, p, sr, (const char *)y, L, L, P, es);
    } else {
        K->store[fmt](y, tmp, P * L);
        ew_runs_copy(K, p, sr, tmp, L, L, P, es);
    }
}

/* grain in elements: ~64 KiB of fp32 output for cheap work, a quarter for transcendentals */
#define EW_GRAIN_CHEAP 16384
#define EW_GRAIN_HEAVY 4096

/* ---- copy / neuron -------------------------------------------------------------------- */

typedef struct ew_unary_ctx {
    const mk_ew_kernels *K;
    ew_geom g;
    const mk_operand *src, *dst;
    size_t ses, des;
    int sfmt, dfmt;
    mk_ew_neuron_fn fn;  /* NULL: plain copy (with conversion) */
    mk_ew_neuron p;
    const float *prelu;  /* PRELU slopes (e.c) */
    const float *pat;    /* PRELU, channel innermost: slopes repeated, patlen = k * nch */
    int64_t patlen, nch;
} ew_unary_ctx;

static void ew_copy_same(void *d, int64_t ds, const void *s, int64_t ss, int64_t n, size_t es) {
    if (ds == 1 && ss == 1) {
        if (d != s) memmove(d, s, (size_t)n * es);
        return;
    }
    if (es == 4) {
        uint32_t *D = (uint32_t *)d; const uint32_t *S = (const uint32_t *)s;
        for (int64_t i = 0; i < n; i++) D[i * ds] = S[i * ss];
    } else if (es == 2) {
        uint16_t *D = (uint16_t *)d; const uint16_t *S = (const uint16_t *)s;
        for (int64_t i = 0; i < n; i++) D[i * ds] = S[i * ss];
    } else {
        uint8_t *D = (uint8_t *)d; const uint8_t *S = (const uint8_t *)s;
        for (int64_t i = 0; i < n; i++) D[i * ds] = S[i * ss];
    }
}

static void ew_unary_run(const ew_unary_ctx *c, const char *sp, int64_t ss, char *dp, int64_t ds,
                         int64_t len, int64_t ch, const float *cslope, float *xb, float *yb) {
    const mk_ew_kernels *K = c->K;
    const int in_direct = c->sfmt == MK_FMT_F32 && ss == 1;
    const int out_direct = c->dfmt == MK_FMT_F32 && ds == 1;
    if (c->fn == NULL) { /* copy */
        if (c->sfmt == c->dfmt) {
            ew_copy_same(dp, ds, sp, ss, len, c->des);
            return;
        }
        if (in_direct && ds == 1) { K->store[c->dfmt]((const float *)sp, dp, len); return; }
        if (out_direct && ss == 1) { K->load[c->sfmt](sp, (float *)dp, len); return; }
    }
    while (len > 0) {
        int64_t m = len;
        if (!(in_direct && out_direct) && m > MK_EW_BLOCK) m = MK_EW_BLOCK;
        const float *slope = NULL;
        if (c->pat) {
            if (m > c->patlen - ch) m = c->patlen - ch;
            slope = c->pat + ch;
        } else if (cslope) {
            if (m > MK_EW_BLOCK) m = MK_EW_BLOCK;
            slope = cslope;
        }
        const float *x;
        if (in_direct) x = (const float *)sp;
        else if (ss == 1) { K->load[c->sfmt](sp, xb, m); x = xb; }
        else { mk_ew_load_strided(c->sfmt, sp, ss, xb, m); x = xb; }
        float *y = out_direct ? (float *)dp : yb;
        if (c->fn) c->fn(&c->p, x, y, m, slope);
        else if (x != y) memcpy(y, x, (size_t)m * sizeof(float));
        if (!out_direct) {
            if (ds == 1) K->store[c->dfmt](y, dp, m);
            else mk_ew_store_strided(c->dfmt, y, dp, ds, m);
        }
        sp += m * ss * (int64_t)c->ses;
        dp += m * ds * (int64_t)c->des;
        len -= m;
        if (c->pat) { ch += m; if (ch >= c->nch) ch %= c->nch; }
    }
}

/* P whole runs from the odometer's position (ew_geom.block). */
static void ew_unary_block(const ew_unary_ctx *c, const ew_iter *it, int64_t P, float *xb,
                           float *yb, char *tmp) {
    const ew_geom *g = &c->g;
    const int r = g->nd - 1;
    const int64_t L = g->ext[r], n = P * L;
    const int64_t si = g->st[1][r], sr = g->st[1][r - 1], di = g->st[0][r], dr = g->st[0][r - 1];
    const char *sp = ew_ptr(c->src, c->ses, it->off[1]);
    char *dp = ew_ptr(c->dst, c->des, it->off[0]);
    if (c->fn == NULL && c->sfmt == c->dfmt) { /* a plain copy moves the bits */
        if (sp == dp && si == di && sr == dr) return;
        if (si == 1 && di == 1) ew_runs_copy(c->K, dp, dr, sp, sr, L, P, c->des);
        else
            for (int64_t q = 0; q < P; q++)
                ew_copy_same(dp + q * dr * (int64_t)c->des, di, sp + q * sr * (int64_t)c->ses, si,
                             L, c->des);
        return;
    }
    const float *x = ew_block_load(c->K, c->sfmt, sp, si, sr, L, P, xb, tmp);
    const int out_direct = c->dfmt == MK_FMT_F32 && di == 1 && dr == L;
    float *y = out_direct ? (float *)dp : yb;
    if (c->fn) c->fn(&c->p, x, y, n, c->pat); /* PRELU: runs start at channel 0 */
    else y = (float *)x;
    if (y != (float *)dp) ew_block_store(c->K, c->dfmt, dp, di, dr, L, P, y, tmp);
}

static void ew_unary_task(void *vctx, int64_t begin, int64_t end) {
    const ew_unary_ctx *c = (const ew_unary_ctx *)vctx;
    const ew_geom *g = &c->g;
    _Alignas(64) float xb[MK_EW_BLOCK];
    _Alignas(64) float yb[MK_EW_BLOCK];
    _Alignas(64) float cb[MK_EW_BLOCK];
    _Alignas(64) char tmp[MK_EW_BLOCK * sizeof(float)];
    const float *cslope = NULL;
    int64_t cslope_ch = -1;
    const int64_t L = g->ext[g->nd - 1];
    ew_iter it;
    int64_t off = begin % L;
    ew_iter_start(g, 2, &it, begin / L);
    int64_t i = begin;
    while (i < end) {
        const int64_t P = off == 0 ? ew_block_runs(g, &it, end - i) : 0;
        if (P) {
            ew_unary_block(c, &it, P, xb, yb, tmp);
            i += P * L;
            ew_iter_skip(g, 2, &it, P);
            if (i < end) ew_iter_next(g, 2, &it);
            continue;
        }
        int64_t len = L - off;
        if (len > end - i) len = end - i;
        const int64_t s_in = g->st[1][g->nd - 1], s_out = g->st[0][g->nd - 1];
        int64_t ch = 0;
        if (c->p.type == MK_NEURON_PRELU && c->fn) {
            if (g->chan_inner) {
                ch = off % c->nch;
            } else {
                int64_t cidx = g->chan_dim >= 0 ? it.idx[g->chan_dim] : 0;
                if (cidx != cslope_ch) {
                    for (int k = 0; k < MK_EW_BLOCK; k++) cb[k] = c->prelu[cidx];
                    cslope_ch = cidx;
                }
                cslope = cb;
            }
        }
        ew_unary_run(c, ew_ptr(c->src, c->ses, it.off[1] + off * s_in), s_in,
                     ew_ptr(c->dst, c->des, it.off[0] + off * s_out), s_out, len, ch, cslope,
                     xb, yb);
        i += len;
        off = 0;
        if (i < end) ew_iter_next(g, 2, &it);
    }
}

static mk_status ew_unary(const mk_ew_neuron *p, mk_ew_neuron_fn fn, const float *prelu,
                          const mk_operand *src, const mk_operand *dst, mk_extent e,
                          mk_pool *pool, int heavy) {
    if (!ew_valid_operand(src) || !ew_valid_operand(dst) || !ew_valid_extent(e))
        return MK_EINVAL;
    ew_unary_ctx c;
    memset(&c, 0, sizeof c);
    c.K = ew_kernels();
    const mk_operand *ops[2] = {dst, src};
    const int is_prelu = fn != NULL && p->type == MK_NEURON_PRELU;
    ew_geom_build(&c.g, e, ops, 2, is_prelu);
    if (c.g.total == 0) return MK_OK;
    c.src = src; c.dst = dst;
    c.sfmt = src->format; c.dfmt = dst->format;
    c.ses = mk_format_size(src->format); c.des = mk_format_size(dst->format);
    c.fn = fn;
    if (p) c.p = *p;
    if (fn && p->type == MK_NEURON_NONE) c.fn = NULL;
    float pat[MK_EW_PRELU_PATTERN];
    if (is_prelu) {
        c.prelu = prelu;
        c.nch = e.c;
        if (c.g.chan_inner) {
            if (e.c <= MK_EW_PRELU_PATTERN) {
                int64_t reps = MK_EW_PRELU_PATTERN / e.c;
                for (int64_t r = 0; r < reps; r++) memcpy(pat + r * e.c, prelu, (size_t)e.c * sizeof(float));
                c.pat = pat;
                c.patlen = reps * e.c;
            } else {
                c.pat = prelu;
                c.patlen = e.c;
            }
        }
    }
    mk_parallel_for(pool, c.g.total, heavy ? EW_GRAIN_HEAVY : EW_GRAIN_CHEAP, ew_unary_task, &c);
    return MK_OK;
}

/* A same-format copy that interleaves a few planes (NCHW -> NHWC of an RGB input): its runs
 * are source rows written `planes` apart, so the plain walk stores one element at a time and
 * writes every destination line once per plane, each time from far away. Tiles of EW_TILE
 * pixels write all planes of a pixel block at once (three 4-byte planes: the ISA's vector
 * interleave, ~8x the element-wise stores). */
#define EW_TILE 1024
#define EW_MAX_PLANES 16

typedef struct ew_interleave_ctx {
    const mk_ew_kernels *K;
    const char *src;
    char *dst;
    int64_t planes, pixels, blocks, plane_stride, src_outer, dst_outer;  /* strides in elements */
    size_t es;
} ew_interleave_ctx;

#define EW_INTERLEAVE(T)                                                                        \
    for (int64_t c = 0; c < x->planes; c++) {                                                  \
        const T *s = (const T *)sp + c * x->plane_stride;                                      \
        T *d = (T *)dp + c;                                                                     \
        for (int64_t p = 0; p < n; p++) d[p * x->planes] = s[p];                                \
    }

static void ew_interleave_task(void *vctx, int64_t begin, int64_t end) {
    const ew_interleave_ctx *x = (const ew_interleave_ctx *)vctx;
    for (int64_t i = begin; i < end; i++) {
        const int64_t outer = i / x->blocks, p0 = i % x->blocks * EW_TILE;
        const int64_t n = x->pixels - p0 < EW_TILE ? x->pixels - p0 : EW_TILE;
        const char *sp = x->src + (outer * x->src_outer + p0) * (int64_t)x->es;
        char *dp = x->dst + (outer * x->dst_outer + p0 * x->planes) * (int64_t)x->es;
        if (x->es == 4 && x->planes == 3) {
            const uint32_t *s = (const uint32_t *)sp;
            x->K->interleave3(s, s + x->plane_stride, s + 2 * x->plane_stride, (uint32_t *)dp, n);
        } else if (x->es == 4) { EW_INTERLEAVE(uint32_t) }
        else if (x->es == 2) { EW_INTERLEAVE(uint16_t) }
        else { EW_INTERLEAVE(uint8_t) }
    }
}

/* Whether g (operand 0 the destination) is [outer,] planes, pixels with unit-stride source
 * pixels written `planes` apart, planes adjacent: then run it tiled. */
static int ew_interleave(const ew_geom *g, const mk_operand *src, const mk_operand *dst,
                         mk_pool *pool) {
    const int r = g->nd - 1, c = g->nd - 2;
    if (g->nd < 2 || g->nd > 3 || src->format != dst->format || g->st[1][r] != 1 ||
        g->st[0][c] != 1 || g->ext[c] > EW_MAX_PLANES || g->st[0][r] != g->ext[c] ||
        g->ext[r] < EW_TILE)
        return 0;
    ew_interleave_ctx x;
    x.K = ew_kernels();
    x.es = mk_format_size(src->format);
    x.src = (const char *)src->data;
    x.dst = (char *)dst->data;
    x.planes = g->ext[c];
    x.pixels = g->ext[r];
    x.blocks = (x.pixels + EW_TILE - 1) / EW_TILE;
    x.plane_stride = g->st[1][c];
    x.src_outer = g->nd == 3 ? g->st[1][0] : 0;
    x.dst_outer = g->nd == 3 ? g->st[0][0] : 0;
    mk_parallel_for(pool, (g->nd == 3 ? g->ext[0] : 1) * x.blocks, 1, ew_interleave_task, &x);
    return 1;
}

mk_status mk_copy(const mk_operand *src, const mk_operand *dst, mk_extent e, mk_pool *pool) {
    if (ew_valid_operand(src) && ew_valid_operand(dst) && ew_valid_extent(e)) {
        ew_geom g;
        const mk_operand *ops[2] = {dst, src};
        ew_geom_build(&g, e, ops, 2, 0);
        if (g.total > 0 && ew_interleave(&g, src, dst, pool)) return MK_OK;
    }
    return ew_unary(NULL, NULL, NULL, src, dst, e, pool, 0);
}

static int is_int_f(float v) { return isfinite(v) && floorf(v) == v; }

mk_status mk_neuron(const mk_neuron_params *p, const mk_operand *src, const mk_operand *dst,
                    mk_extent e, mk_pool *pool) {
    if (p == NULL || p->type < 0 || p->type >= MK_EW_NUM_NEURONS) return MK_EINVAL;
    if (p->type == MK_NEURON_PRELU && p->prelu == NULL && e.c > 0) return MK_EINVAL;
    const mk_ew_kernels *K = ew_kernels();
    mk_ew_neuron q;
    memset(&q, 0, sizeof q);
    q.type = p->type; q.a = p->a; q.b = p->b; q.c = p->c;
    mk_ew_neuron_fn fn = K->neuron[p->type];
    const double c = p->c;
    switch (p->type) {
    case MK_NEURON_EXPONENTIAL:
        if (p->c == -1.0f) q.log2c = 1.4426950408889634074;
        else if (c > 0.0 && c != 1.0 && isfinite(c)) q.log2c = log2(c);
        else fn = mk_ew_kernels__generic.neuron[p->type]; /* degenerate base: libm pow */
        break;
    case MK_NEURON_LOGARITHM:
        if (p->c == -1.0f) q.inv_log2c = 0.69314718055994530942;
        else if (c > 0.0 && c != 1.0 && isfinite(c)) q.inv_log2c = 1.0 / log2(c);
        else fn = mk_ew_kernels__generic.neuron[p->type];
        break;
    case MK_NEURON_POWER:
        if (!isfinite(c) || c == 0.0) fn = mk_ew_kernels__generic.neuron[p->type];
        q.c_int = is_int_f(p->c);
        q.c_odd = q.c_int && fabs(c) < 0x1p24 && fmod(c, 2.0) != 0.0;
        break;
    default: break;
    }
    int heavy = !(p->type == MK_NEURON_NONE || p->type == MK_NEURON_RELU ||
                  p->type == MK_NEURON_LINEAR || p->type == MK_NEURON_HARD_SIGMOID ||
                  p->type == MK_NEURON_ABSOLUTE || p->type == MK_NEURON_PRELU ||
                  p->type == MK_NEURON_RELUN || p->type == MK_NEURON_SOFT_SIGN);
    return ew_unary(&q, fn, p->prelu, src, dst, e, pool, heavy);
}

/* ---- fill ---------------------------------------------------------------------------- */

typedef struct ew_fill_ctx {
    const mk_ew_kernels *K;
    ew_geom g;
    const mk_operand *dst;
    size_t es;
    uint32_t bits;
} ew_fill_ctx;

static void ew_fill_task(void *vctx, int64_t begin, int64_t end) {
    const ew_fill_ctx *c = (const ew_fill_ctx *)vctx;
    const ew_geom *g = &c->g;
    const int64_t L = g->ext[g->nd - 1], s = g->st[0][g->nd - 1];
    ew_iter it;
    int64_t off = begin % L;
    ew_iter_start(g, 1, &it, begin / L);
    uint32_t run[EW_SHORT]; /* a short run of the value, copied to every run of a block */
    c->K->fill(run, EW_SHORT, c->bits, (int)c->es);
    for (int64_t i = begin; i < end;) {
        const int64_t P = off == 0 ? ew_block_runs(g, &it, end - i) : 0;
        if (P && s == 1) {
            ew_runs_copy(c->K, ew_ptr(c->dst, c->es, it.off[0]), g->st[0][g->nd - 2],
                         (const char *)run, 0, L, P, c->es);
            i += P * L;
            ew_iter_skip(g, 1, &it, P);
            if (i < end) ew_iter_next(g, 1, &it);
            continue;
        }
        int64_t len = L - off;
        if (len > end - i) len = end - i;
        char *dp = ew_ptr(c->dst, c->es, it.off[0] + off * s);
        if (s == 1) {
            c->K->fill(dp, len, c->bits, (int)c->es);
        } else if (c->es == 4) {
            for (int64_t k = 0; k < len; k++) ((uint32_t *)dp)[k * s] = c->bits;
        } else if (c->es == 2) {
            for (int64_t k = 0; k < len; k++) ((uint16_t *)dp)[k * s] = (uint16_t)c->bits;
        } else {
            for (int64_t k = 0; k < len; k++) ((uint8_t *)dp)[k * s] = (uint8_t)c->bits;
        }
        i += len;
        off = 0;
        if (i < end) ew_iter_next(g, 1, &it);
    }
}

mk_status mk_fill(const mk_operand *dst, mk_extent e, float value, mk_pool *pool) {
    if (!ew_valid_operand(dst) || !ew_valid_extent(e)) return MK_EINVAL;
    ew_fill_ctx c;
    c.K = ew_kernels();
    const mk_operand *ops[1] = {dst};
    ew_geom_build(&c.g, e, ops, 1, 0);
    if (c.g.total == 0) return MK_OK;
    c.dst = dst;
    c.es = mk_format_size(dst->format);
    c.bits = mk_ew_encode_bits(dst->format, value);
    mk_parallel_for(pool, c.g.total, 4 * EW_GRAIN_CHEAP, ew_fill_task, &c);
    return MK_OK;
}

/* ---- arithmetic ---------------------------------------------------------------------- */

typedef struct ew_arith_ctx {
    const mk_ew_kernels *K;
    ew_geom g;
    const mk_operand *op[3]; /* dst, a, b */
    size_t es[3];
    int fmt[3];
    mk_ew_arith p;
    mk_ew_arith_fn fn;
} ew_arith_ctx;

/* m elements of a `fmt` operand at p, s apart: in place when fp32 with unit stride, else
 * decoded into buf (s 0: the one value repeated). */
static inline const float *ew_load_run(const mk_ew_kernels *K, int fmt, const char *p, int64_t s,
                                       int64_t m, float *buf) {
    if (fmt == MK_FMT_F32 && s == 1) return (const float *)p;
    if (s == 1) K->load[fmt](p, buf, m);
    else mk_ew_load_strided(fmt, p, s, buf, m);
    return buf;
}

/* An input block: fp32 contiguous in place, a broadcast value, or converted into buf. */
static inline const float *ew_arith_input(const ew_arith_ctx *c, int k, const char *p,
                                          int64_t s, int64_t m, float *buf, int *bc) {
    *bc = s == 0;
    return ew_load_run(c->K, c->fmt[k], p, s, *bc ? 1 : m, buf);
}

/* P whole runs from the odometer's position (ew_geom.block). */
static void ew_arith_block(const ew_arith_ctx *c, const ew_iter *it, int64_t P, float *ab,
                           float *bb, float *yb, char *tmp) {
    const ew_geom *g = &c->g;
    const int r = g->nd - 1;
    const int64_t L = g->ext[r];
    const float *in[3];
    int bc[3];
    float *buf[3] = {yb, ab, bb};
    for (int k = 1; k < 3; k++) {
        const char *p = ew_ptr(c->op[k], c->es[k], it->off[k]);
        bc[k] = g->st[k][r] == 0 && g->st[k][r - 1] == 0;
        if (bc[k]) mk_ew_load_strided(c->fmt[k], p, 0, buf[k], 1);
        in[k] = bc[k] ? buf[k]
                      : ew_block_load(c->K, c->fmt[k], p, g->st[k][r], g->st[k][r - 1], L, P,
                                      buf[k], tmp);
    }
    char *dp = ew_ptr(c->op[0], c->es[0], it->off[0]);
    const int64_t di = g->st[0][r], dr = g->st[0][r - 1];
    float *y = c->fmt[0] == MK_FMT_F32 && di == 1 && dr == L ? (float *)dp : yb;
    c->fn(&c->p, in[1], bc[1], in[2], bc[2], y, P * L);
    if (y != (float *)dp) ew_block_store(c->K, c->fmt[0], dp, di, dr, L, P, y, tmp);
}

static void ew_arith_task(void *vctx, int64_t begin, int64_t end) {
    const ew_arith_ctx *c = (const ew_arith_ctx *)vctx;
    const ew_geom *g = &c->g;
    _Alignas(64) float ab[MK_EW_BLOCK];
    _Alignas(64) float bb[MK_EW_BLOCK];
    _Alignas(64) float yb[MK_EW_BLOCK];
    _Alignas(64) char tmp[MK_EW_BLOCK * sizeof(float)];
    const int r = g->nd - 1;
    const int64_t L = g->ext[r];
    const int64_t sd = g->st[0][r], sa = g->st[1][r], sb = g->st[2][r];
    const int direct = c->fmt[0] == MK_FMT_F32 && sd == 1 &&
                       (sa == 0 || (c->fmt[1] == MK_FMT_F32 && sa == 1)) &&
                       (sb == 0 || (c->fmt[2] == MK_FMT_F32 && sb == 1));
    ew_iter it;
    int64_t off = begin % L;
    ew_iter_start(g, 3, &it, begin / L);
    for (int64_t i = begin; i < end;) {
        const int64_t P = off == 0 ? ew_block_runs(g, &it, end - i) : 0;
        if (P) {
            ew_arith_block(c, &it, P, ab, bb, yb, tmp);
            i += P * L;
            ew_iter_skip(g, 3, &it, P);
            if (i < end) ew_iter_next(g, 3, &it);
            continue;
        }
        int64_t len = L - off;
        if (len > end - i) len = end - i;
        char *dp = ew_ptr(c->op[0], c->es[0], it.off[0] + off * sd);
        const char *ap = ew_ptr(c->op[1], c->es[1], it.off[1] + off * sa);
        const char *bp = ew_ptr(c->op[2], c->es[2], it.off[2] + off * sb);
        while (len > 0) {
            int64_t m = direct ? len : (len < MK_EW_BLOCK ? len : MK_EW_BLOCK);
            int abc, bbc;
            const float *a = ew_arith_input(c, 1, ap, sa, m, ab, &abc);
            const float *b = ew_arith_input(c, 2, bp, sb, m, bb, &bbc);
            const int out_direct = c->fmt[0] == MK_FMT_F32 && sd == 1;
            float *y = out_direct ? (float *)dp : yb;
            c->fn(&c->p, a, abc, b, bbc, y, m);
            if (!out_direct) {
                if (sd == 1) c->K->store[c->fmt[0]](y, dp, m);
                else mk_ew_store_strided(c->fmt[0], y, dp, sd, m);
            }
            dp += m * sd * (int64_t)c->es[0];
            ap += m * sa * (int64_t)c->es[1];
            bp += m * sb * (int64_t)c->es[2];
            len -= m;
            i += m;
        }
        off = 0;
        if (i < end) ew_iter_next(g, 3, &it);
    }
}

mk_status mk_arithmetic(const mk_arith_params *p, const mk_operand *a, const mk_operand *b,
                        const mk_operand *dst, mk_extent e, mk_pool *pool) {
    if (p == NULL || p->op < 0 || p->op > 3) return MK_EINVAL;
    if (!ew_valid_operand(a) || !ew_valid_operand(b) || !ew_valid_operand(dst) ||
        !ew_valid_extent(e))
        return MK_EINVAL;
    ew_arith_ctx c;
    c.K = ew_kernels();
    c.op[0] = dst; c.op[1] = a; c.op[2] = b;
    for (int k = 0; k < 3; k++) {
        c.fmt[k] = c.op[k]->format;
        c.es[k] = mk_format_size(c.fmt[k]);
    }
    ew_geom_build(&c.g, e, c.op, 3, 0);
    if (c.g.total == 0) return MK_OK;
    c.p.op = p->op; c.p.ps = p->primary_scale; c.p.ss = p->secondary_scale;
    c.p.bias = p->bias; c.p.lo = p->min_value; c.p.hi = p->max_value;
    c.fn = c.K->arith[p->op];
    mk_parallel_for(pool, c.g.total, EW_GRAIN_CHEAP, ew_arith_task, &c);
    return MK_OK;
}

/* ---- sum of several operands ---------------------------------------------------------- */

#define EW_SUM_GROUP 4   /* sources read side by side: their streams stay busy together */

typedef struct ew_sum_ctx {
    int count;
    const float *scale;
    const mk_operand *src, *dst;
    float lo, hi;
    mk_extent e;
    const mk_ew_kernels *K;
} ew_sum_ctx;

/* m elements of source k from (n, y, x): in place (fp32, unit stride), else decoded into buf
 * (a broadcast value, stride 0, repeated m times). */
static const float *ew_sum_input(const ew_sum_ctx *c, int k, int64_t n, int64_t y, int64_t x,
                                 int64_t m, float *buf) {
    const mk_operand *o = &c->src[k];
    const char *p = (const char *)o->data +
                    (n * o->stride_n + y * o->stride_y + x * o->stride_x) *
                        (int64_t)mk_format_size(o->format);
    return ew_load_run(c->K, o->format, p, o->stride_x, m, buf);
}

/* acc = clamp(acc + s[0] x[0] + ... + s[n-1] x[n-1]) (first: s[0] x[0] + s[1] x[1] + ...), one
 * rounding per product and per addition, then the + 0.0f of a two-operand pass's bias (it
 * turns -0 into +0), so that the bits are those of one mk_arithmetic ADD per source. Bound by
 * memory: the compiler's vectorisation of this loop reads at the read probe's rate. */
static inline __attribute__((always_inline)) void
ew_sum_terms(int n, int first, const float *const *x, const float *s, float *restrict acc,
             int64_t m, float lo, float hi) {
    const float *restrict x0 = x[0], *restrict x1 = x[n > 1 ? 1 : 0];
    const float *restrict x2 = x[n > 2 ? 2 : 0], *restrict x3 = x[n > 3 ? 3 : 0];
    for (int64_t i = 0; i < m; i++) {
        float v = first ? (s[0] * x0[i] + s[1] * x1[i]) + 0.0f : (acc[i] + s[0] * x0[i]) + 0.0f;
        if (n > 1 && !first) v = (v + s[1] * x1[i]) + 0.0f;
        if (n > 2) v = (v + s[2] * x2[i]) + 0.0f;
        if (n > 3) v = (v + s[3] * x3[i]) + 0.0f;
        v = lo > v ? lo : v;   /* as the microkernels' max(lo, v), min(hi, v): NaN kept */
        acc[i] = hi < v ? hi : v;
    }
}

static void ew_sum_group(int n, int first, const float *const *x, const float *s, float *acc,
                         int64_t m, float lo, float hi) {
    switch (n * 2 + first) {
    case 2: ew_sum_terms(1, 0, x, s, acc, m, lo, hi); break;
    case 4: ew_sum_terms(2, 0, x, s, acc, m, lo, hi); break;
    case 5: ew_sum_terms(2, 1, x, s, acc, m, lo, hi); break;
    case 6: ew_sum_terms(3, 0, x, s, acc, m, lo, hi); break;
    case 7: ew_sum_terms(3, 1, x, s, acc, m, lo, hi); break;
    case 8: ew_sum_terms(4, 0, x, s, acc, m, lo, hi); break;
    default: ew_sum_terms(4, 1, x, s, acc, m, lo, hi); break;
    }
}

/* Rows [begin, end) of the n x h rows, in blocks of MK_EW_BLOCK elements; a block takes its
 * sources EW_SUM_GROUP at a time, its partial sum in L1 (in the destination itself when that is
 * fp32 with unit stride). Every source is read once. */
static void ew_sum_task(void *vctx, int64_t begin, int64_t end) {
    const ew_sum_ctx *c = (const ew_sum_ctx *)vctx;
    const mk_operand *d = c->dst;
    const size_t des = mk_format_size(d->format);
    const int direct = d->format == MK_FMT_F32 && d->stride_x == 1;
    _Alignas(64) float buf[EW_SUM_GROUP][MK_EW_BLOCK], yb[MK_EW_BLOCK];
    for (int64_t r = begin; r < end; r++) {
        const int64_t n = r / c->e.h, y = r % c->e.h;
        for (int64_t x = 0; x < c->e.w; x += MK_EW_BLOCK) {
            const int64_t m = c->e.w - x < MK_EW_BLOCK ? c->e.w - x : MK_EW_BLOCK;
            char *dp = (char *)d->data + (n * d->stride_n + y * d->stride_y + x * d->stride_x) *
                                             (int64_t)des;
            float *acc = direct ? (float *)dp : yb;
            for (int k0 = 0; k0 < c->count; k0 += EW_SUM_GROUP) {
                const int g = c->count - k0 < EW_SUM_GROUP ? c->count - k0 : EW_SUM_GROUP;
                const float *in[EW_SUM_GROUP];
                for (int k = 0; k < g; k++) in[k] = ew_sum_input(c, k0 + k, n, y, x, m, buf[k]);
                const int last = k0 + g == c->count;
                ew_sum_group(g, k0 == 0, in, c->scale + k0, acc, m, last ? c->lo : -INFINITY,
                             last ? c->hi : INFINITY);
            }
            if (!direct) {
                if (d->stride_x == 1) c->K->store[d->format](acc, dp, m);
                else mk_ew_store_strided(d->format, acc, dp, d->stride_x, m);
            }
        }
    }
}

mk_status mk_sum(int count, const float *scale, const mk_operand *src, const mk_operand *dst,
                 float min_value, float max_value, mk_extent e, mk_pool *pool) {
    if (count < 2 || scale == NULL || src == NULL || !ew_valid_operand(dst) ||
        !ew_valid_extent(e) || e.c != 1)
        return MK_EINVAL;
    for (int k = 0; k < count; k++)
        if (!ew_valid_operand(&src[k])) return MK_EINVAL;
    const int64_t rows = (int64_t)e.n * e.h;
    if (rows == 0 || e.w == 0) return MK_OK;
    ew_sum_ctx c = {count, scale, src, dst, min_value, max_value, e, ew_kernels()};
    const int64_t grain = EW_GRAIN_CHEAP / e.w > 1 ? EW_GRAIN_CHEAP / e.w : 1;
    mk_parallel_for(pool, rows, grain, ew_sum_task, &c);
    return MK_OK;
}
