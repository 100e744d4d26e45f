/* The reduction microkernels, written once over a few primitives that each ISA file defines
 * before including this header (reduce__generic.c, reduce__avx2.c, reduce__avx512.c):
 *
 *   RDN(name)      the ISA-suffixed name
 *   L              16 logical lanes of fp32 (one zmm, two ymm, or an array of 16 floats)
 *   l_load(p)      16 floats; l_load_n(p, r, fill): r < 16 floats, the other lanes = fill
 *   l_add l_mul l_min l_max    lane-wise; min / max keep a NaN (below)
 *   l_ne0(x)       1.0f where x != 0, else 0
 *   l_fold(op, v)  the lane tree: k with k+8, k+4, k+2, k+1; returns lane 0
 *   l_set1(x)      broadcast
 *   l_eqmask(v, m), l_nanmask(v)  bit k set where lane k equals m / is NaN
 *   l_pick(op, a, b)  lane-wise min / max, NaNs as the instruction has it (argmin / argmax
 *                  look for NaNs apart); l_better(op, a, b): bit k set where a[k] is strictly
 *                  less / greater than b[k]; l_unord(a, b): bit k set where a[k] or b[k] is NaN,
 *                  as an LM (a mask; lm_or ORs two: AVX-512 keeps them in mask registers);
 *                  l_all(op, v): the least / greatest lane of v (no NaNs) in every lane
 *   LI             16 int32 lanes; li_set1(n); li_where(a, k, n): lanes set in k become n;
 *                  li_min(a, k): the least lane set in k (k != 0)
 *   V, VL          the native vector for the strided kernel; v_load, v_load_n(p, r),
 *                  v_store, v_store_n(p, v, r), v_add, v_min, v_max
 *
 * Scalar meaning of min / max (identical in every ISA): min(a, b) = isnan(a) ? a :
 * (a < b ? a : b), so a NaN on either side wins and stays. Every loop is written out per
 * operation (RD_ALWAYS_INLINE with a constant op) so the inner loops carry no branch.
 */
#ifndef MK_REDUCE_SIMD_H
#define MK_REDUCE_SIMD_H

#define RD_ALWAYS_INLINE static inline __attribute__((always_inline))

RD_ALWAYS_INLINE L l_op(const int op, L a, L b) {
    return op == MK_REDUCE_SUM ? l_add(a, b) : op == MK_REDUCE_MIN ? l_min(a, b) : l_max(a, b);
}

RD_ALWAYS_INLINE V v_op(const int op, V a, V b) {
    return op == MK_REDUCE_SUM ? v_add(a, b) : op == MK_REDUCE_MIN ? v_min(a, b) : v_max(a, b);
}

/* The neutral value of SUM, MIN or MAX: what pads a partial group of channels. -0 (not +0)
 * for SUM: x + -0 is x for every x, so a lane of padding changes nothing. */
static inline float rd_fill(int op) {
    return op == MK_REDUCE_SUM ? -0.0f : op == MK_REDUCE_MIN ? INFINITY : -INFINITY;
}

/* ---- across channels ---------------------------------------------------------------- */

/* 16 channels from c on, the lanes past C (if any) = fill. */
RD_ALWAYS_INLINE L rd_block_vector(const float *r, int64_t C, int64_t c, float fill) {
    const int64_t left = C - c;
    return left >= 16 ? l_load(r + c) : l_load_n(r + c, left > 0 ? (int)left : 0, fill);
}

/* 16 channels from c on of one pixel, or (weighted) their products with the weights at q;
 * lanes past C hold the neutral value (-0 for the products: -0 * 0). */
RD_ALWAYS_INLINE L rd_vector(const int op, const int weighted, const float *r, const float *q,
                             int64_t C, int64_t c) {
    if (weighted) return l_mul(rd_block_vector(r, C, c, -0.0f), rd_block_vector(q, C, c, 0.0f));
    return rd_block_vector(r, C, c, rd_fill(op));
}

/* One pixel's C channels (SUM, MIN or MAX; weighted: the sum of x[c] * w[c]) in 4 chains of
 * 16 lanes, 64 logical lanes: lane k holds channels k, k+64, k+128, ... in increasing order;
 * then the tree, lane k with k+32, k+16, k+8, k+4, k+2, k+1. (One chain per pixel held a
 * 1.6 MB source in L2 to 44-48% of the read probe's rate: 16 dependent adds, or compares and
 * max, per 256 channels, which the out-of-order window could not overlap with enough pixels.) */
RD_ALWAYS_INLINE float rd_pixel(const int op, const int weighted, const float *r,
                                const float *q, int64_t C) {
    /* with C <= 16 the other chains hold the neutral value only, which changes nothing */
    if (C <= 16) return l_fold(op, rd_vector(op, weighted, r, q, C, 0));
    L a0 = rd_vector(op, weighted, r, q, C, 0), a1 = rd_vector(op, weighted, r, q, C, 16);
    L a2 = rd_vector(op, weighted, r, q, C, 32), a3 = rd_vector(op, weighted, r, q, C, 48);
    int64_t c = 64;
    for (; c + 64 <= C; c += 64) {
        if (weighted) {
            a0 = l_add(a0, l_mul(l_load(r + c), l_load(q + c)));
            a1 = l_add(a1, l_mul(l_load(r + c + 16), l_load(q + c + 16)));
            a2 = l_add(a2, l_mul(l_load(r + c + 32), l_load(q + c + 32)));
            a3 = l_add(a3, l_mul(l_load(r + c + 48), l_load(q + c + 48)));
        } else {
            a0 = l_op(op, a0, l_load(r + c));
            a1 = l_op(op, a1, l_load(r + c + 16));
            a2 = l_op(op, a2, l_load(r + c + 32));
            a3 = l_op(op, a3, l_load(r + c + 48));
        }
    }
    if (c < C) {
        a0 = l_op(op, a0, rd_vector(op, weighted, r, q, C, c));
        a1 = l_op(op, a1, rd_vector(op, weighted, r, q, C, c + 16));
        a2 = l_op(op, a2, rd_vector(op, weighted, r, q, C, c + 32));
        a3 = l_op(op, a3, rd_vector(op, weighted, r, q, C, c + 48));
    }
    return l_fold(op, l_op(op, l_op(op, a0, a2), l_op(op, a1, a3)));
}

/* No software prefetch: with the 4 chains, a 64 MiB image (256 channels, from L3) reads at
 * 92-94% of the probe's rate with or without the prefetch of the pixel 8 ahead (which one
 * chain needed: 68% -> 78%), and the prefetch cost 5-10 points on an L2-resident source. */
RD_ALWAYS_INLINE void rd_channels(const int op, const float *x, int64_t sx, int64_t C,
                                  int64_t P, float *out) {
    for (int64_t p = 0; p < P; p++) out[p] = rd_pixel(op, 0, x + p * sx, NULL, C);
}

static void RDN(channels)(int op, const float *x, int64_t sx, int64_t C, int64_t P,
                          float *out) {
    if (op == MK_REDUCE_MIN) rd_channels(MK_REDUCE_MIN, x, sx, C, P, out);
    else if (op == MK_REDUCE_MAX) rd_channels(MK_REDUCE_MAX, x, sx, C, P, out);
    else rd_channels(MK_REDUCE_SUM, x, sx, C, P, out);
}

/* count: the number of non-zero weights (exact in any order) */
static void RDN(channels_weighted)(const float *x, int64_t sx, const float *w, int64_t sw,
                                   int64_t C, int64_t P, float *out, float *count) {
    for (int64_t p = 0; p < P; p++) {
        const float *r = x + p * sx, *q = w + p * sw;
        out[p] = rd_pixel(MK_REDUCE_SUM, 1, r, q, C);
        if (count) {
            L cnt = l_ne0(rd_block_vector(q, C, 0, 0.0f));
            for (int64_t c = 16; c < C; c += 16)
                cnt = l_add(cnt, l_ne0(rd_block_vector(q, C, c, 0.0f)));
            count[p] = l_fold(MK_REDUCE_SUM, cnt);
        }
    }
}

/* Argmin / argmax, in blocks of 64 channels (4 vectors of 16). Lane k keeps v[k], the best
 * (least / greatest) of channels k, k+16, k+32, ... read so far, and blk[k], the first block
 * in which v[k] was reached (a later block must be strictly better to replace it). The
 * extremum m is the best of the 16 lanes; the first block that holds m is the least blk[k]
 * among the lanes with v[k] == m, and the answer is the first channel equal to m in that
 * block (-0 and +0 are equal). Lanes past C hold the padding (+inf for min, -inf for max),
 * which no channel beats unless it is better, and which comes after every real channel of
 * its block. Comparisons ignore NaNs, so NaNs are looked for on the side: any NaN makes the
 * answer the first NaN. */
static int64_t rd_first_nan(const float *r, int64_t C) {
    for (int64_t c = 0;; c += 16) {
        const unsigned k = l_nanmask(rd_block_vector(r, C, c, 0.0f));
        if (k) return c + __builtin_ctz(k);
    }
}

/* pf: the pixel whose lines are prefetched (see rd_channels_arg) */
RD_ALWAYS_INLINE float rd_arg_pixel(const int op, const float *r, int64_t C, const float *pf) {
    const float fill = rd_fill(op);
    L v = l_set1(fill);
    LI blk = li_set1(0);
    LM nan = 0;
    int t = 0;
    int64_t c = 0;
    for (; c + 64 <= C; c += 64, t++) {
        for (int j = 0; j < 64; j += 16) __builtin_prefetch(pf + c + j);
        const L x0 = l_load(r + c), x1 = l_load(r + c + 16);
        const L x2 = l_load(r + c + 32), x3 = l_load(r + c + 48);
        nan = lm_or(nan, lm_or(l_unord(x0, x1), l_unord(x2, x3)));
        const L b = l_pick(op, l_pick(op, x0, x1), l_pick(op, x2, x3));
        blk = li_where(blk, l_better(op, b, v), t);
        v = l_pick(op, v, b);
    }
    if (c < C) {   /* the last, partial block */
        L b = l_set1(fill);
        for (int64_t j = c; j < C; j += 16) {
            __builtin_prefetch(pf + j);
            const L x = rd_block_vector(r, C, j, fill);
            nan = lm_or(nan, l_unord(x, x));
            b = l_pick(op, b, x);
        }
        blk = li_where(blk, l_better(op, b, v), t);
        v = l_pick(op, v, b);
    }
    if (nan) return (float)rd_first_nan(r, C);
    const L vm = l_all(op, v);   /* m in every lane */
    const int64_t first = 64 * (int64_t)li_min(blk, l_eqmask(v, vm));
    /* the 64 channels of that block as one 64-bit mask: no branch on where m is */
    uint64_t hits = 0;
    if (first + 64 <= C)   /* plain loads, no tail logic: 41-42% -> 43-46% of the probe (L2) */
        for (int j = 0; j < 4; j++)
            hits |= (uint64_t)l_eqmask(l_load(r + first + 16 * j), vm) << (16 * j);
    else
        for (int j = 0; j < 4; j++)
            hits |= (uint64_t)l_eqmask(rd_block_vector(r, C, first + 16 * j, fill), vm) << (16 * j);
    return (float)(first + __builtin_ctzll(hits));
}

/* The pixel 4 ahead is prefetched, a line with each line read: the epilogue of each pixel
 * (horizontal min / max, the scan of one block) holds up the loads of the next ones. From L3 /
 * DRAM (3.2 MB / 64 MiB, 256 channels) a prefetch brought argmax from 84% / 65% to 92% /
 * 84-92% of the read probe's rate; done in a loop of its own before each pixel it cost 80
 * instructions a pixel (25% in L2); in the block loop: 44-47% -> 48-56% (L2), 85-86% ->
 * 90% (3.2 MB) and 73-83% -> 88-89% (64 MiB). */
RD_ALWAYS_INLINE void rd_channels_arg(const int op, const float *x, int64_t sx, int64_t C,
                                      int64_t P, float *out) {
    for (int64_t p = 0; p < P; p++) out[p] = rd_arg_pixel(op, x + p * sx, C, x + (p + 4) * sx);
}

static void RDN(channels_arg)(int op, const float *x, int64_t sx, int64_t C, int64_t P,
                              float *out) {
    if (op == MK_REDUCE_ARGMAX) rd_channels_arg(MK_REDUCE_MAX, x, sx, C, P, out);
    else rd_channels_arg(MK_REDUCE_MIN, x, sx, C, P, out);
}

/* ---- along a strided axis ------------------------------------------------------------- */

/* K accumulators of VL lanes stay in registers over all L steps. */
#define RD_STRIDED_GROUP(K)                                                              \
    for (; j + (K) * VL <= M; j += (K) * VL) {                                           \
        V a[K];                                                                          \
        const float *s = first ? x + j : acc + j;                                        \
        for (int k = 0; k < (K); k++) a[k] = v_load(s + k * VL);                         \
        for (int64_t i = first; i < L; i++) {                                            \
            const float *r = x + i * S + j;                                              \
            for (int k = 0; k < (K); k++) a[k] = v_op(op, a[k], v_load(r + k * VL));     \
        }                                                                                \
        for (int k = 0; k < (K); k++) v_store(acc + j + k * VL, a[k]);                   \
    }

RD_ALWAYS_INLINE void rd_strided(const int op, const float *x, int64_t S, int64_t L,
                                 int64_t M, float *acc, int first) {
    int64_t j = 0;
    RD_STRIDED_GROUP(8)
    RD_STRIDED_GROUP(1)
    if (j < M) {
        const int r = (int)(M - j);
        V a = first ? v_load_n(x + j, r) : v_load_n(acc + j, r);
        for (int64_t i = first; i < L; i++) a = v_op(op, a, v_load_n(x + i * S + j, r));
        v_store_n(acc + j, a, r);
    }
}

static void RDN(strided)(int op, const float *x, int64_t S, int64_t L, int64_t M, float *acc,
                         int first) {
    if (op == MK_REDUCE_MIN) rd_strided(MK_REDUCE_MIN, x, S, L, M, acc, first);
    else if (op == MK_REDUCE_MAX) rd_strided(MK_REDUCE_MAX, x, S, L, M, acc, first);
    else rd_strided(MK_REDUCE_SUM, x, S, L, M, acc, first);
}

#define RD_TABLE(NAME)                                                                   \
    {.name = NAME, .channels = RDN(channels), .channels_weighted = RDN(channels_weighted), \
     .channels_arg = RDN(channels_arg), .strided = RDN(strided), .read_or = RDN(read_or)}

#endif
