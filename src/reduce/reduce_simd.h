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

/* The neutral value of SUM, MIN or MAX: what pads a partial group of 16 channels. */
static inline float rd_fill(int op) {
    return op == MK_REDUCE_SUM ? 0.0f : op == MK_REDUCE_MIN ? INFINITY : -INFINITY;
}

/* ---- across channels ---------------------------------------------------------------- */

/* The lanes of one pixel's C channels, folded: SUM, MIN or MAX. */
RD_ALWAYS_INLINE float rd_pixel(const int op, const float *r, int64_t C) {
    const float fill = rd_fill(op);
    L acc = C >= 16 ? l_load(r) : l_load_n(r, (int)C, fill);
    int64_t c = 16;
    for (; c + 16 <= C; c += 16) acc = l_op(op, acc, l_load(r + c));
    if (c < C) acc = l_op(op, acc, l_load_n(r + c, (int)(C - c), fill));
    return l_fold(op, acc);
}

RD_ALWAYS_INLINE void rd_channels(const int op, const float *x, int64_t sx, int64_t C,
                                  int64_t P, float *out) {
    for (int64_t p = 0; p < P; p++) out[p] = rd_pixel(op, x + p * sx, C);
}

static void RDN(channels)(int op, const float *x, int64_t sx, int64_t C, int64_t P,
                          float *out) {
    if (op == MK_REDUCE_MIN) rd_channels(MK_REDUCE_MIN, x, sx, C, P, out);
    else if (op == MK_REDUCE_MAX) rd_channels(MK_REDUCE_MAX, x, sx, C, P, out);
    else rd_channels(MK_REDUCE_SUM, x, sx, C, P, out);
}

static void RDN(channels_weighted)(const float *x, int64_t sx, const float *w, int64_t sw,
                                   int64_t C, int64_t P, float *out, float *count) {
    for (int64_t p = 0; p < P; p++) {
        const float *r = x + p * sx, *q = w + p * sw;
        L wv = C >= 16 ? l_load(q) : l_load_n(q, (int)C, 0.0f);
        L acc = l_mul(C >= 16 ? l_load(r) : l_load_n(r, (int)C, 0.0f), wv);
        L cnt = l_ne0(wv);
        int64_t c = 16;
        for (; c + 16 <= C; c += 16) {
            wv = l_load(q + c);
            acc = l_add(acc, l_mul(l_load(r + c), wv));
            if (count) cnt = l_add(cnt, l_ne0(wv));
        }
        if (c < C) {
            wv = l_load_n(q + c, (int)(C - c), 0.0f);
            acc = l_add(acc, l_mul(l_load_n(r + c, (int)(C - c), 0.0f), wv));
            cnt = l_add(cnt, l_ne0(wv));
        }
        out[p] = l_fold(MK_REDUCE_SUM, acc);
        if (count) count[p] = l_fold(MK_REDUCE_SUM, cnt);
    }
}

/* The extremum of one pixel's channels for argmin / argmax: only its value matters (the
 * index comes from rd_find), so four independent accumulators shorten the dependency chain. */
RD_ALWAYS_INLINE float rd_extremum(const int op, const float *r, int64_t C) {
    if (C < 64) return rd_pixel(op, r, C);
    L a0 = l_load(r), a1 = l_load(r + 16), a2 = l_load(r + 32), a3 = l_load(r + 48);
    int64_t c = 64;
    for (; c + 64 <= C; c += 64) {
        a0 = l_op(op, a0, l_load(r + c));
        a1 = l_op(op, a1, l_load(r + c + 16));
        a2 = l_op(op, a2, l_load(r + c + 32));
        a3 = l_op(op, a3, l_load(r + c + 48));
    }
    for (; c + 16 <= C; c += 16) a0 = l_op(op, a0, l_load(r + c));
    if (c < C) a0 = l_op(op, a0, l_load_n(r + c, (int)(C - c), rd_fill(op)));
    return l_fold(op, l_op(op, l_op(op, a0, a1), l_op(op, a2, a3)));
}

/* The first c < C with r[c] == m (m NaN: the first NaN). Scans every vector from the last to
 * the first, keeping the lowest hit, without a data-dependent branch. */
#define RD_FIND(MASK)                                                                    \
    if (full < C) {                                                                      \
        L v = l_load_n(r + full, (int)(C - full), 0.0f);                                 \
        unsigned k = (MASK) & ((1u << (C - full)) - 1u);                                 \
        if (k) best = full + __builtin_ctz(k);                                           \
    }                                                                                    \
    for (int64_t c = full - 16; c >= 0; c -= 16) {                                       \
        L v = l_load(r + c);                                                             \
        unsigned k = MASK;                                                               \
        best = k ? c + __builtin_ctz(k) : best;                                          \
    }
RD_ALWAYS_INLINE int64_t rd_find(const float *r, int64_t C, float m) {
    const int64_t full = C & ~(int64_t)15;
    const L vm = l_set1(m);
    int64_t best = 0;
    if (m != m) {
        RD_FIND(l_nanmask(v))
    } else {
        RD_FIND(l_eqmask(v, vm))
    }
    return best;
}

/* Two passes over the pixel (the second from L1): the extremum m (NaN if any channel is NaN,
 * since min / max keep NaNs), then the first channel equal to m (or the first NaN). The
 * pixel 4 ahead is prefetched: the two passes fill the out-of-order window with work that
 * waits on this pixel, so without it too few loads are in flight (2x slower from DRAM). */
RD_ALWAYS_INLINE void rd_channels_arg(const int op, const float *x, int64_t sx, int64_t C,
                                      int64_t P, float *out) {
    for (int64_t p = 0; p < P; p++) {
        const float *r = x + p * sx;
        for (int64_t c = 0; c < C; c += 16) __builtin_prefetch(r + 4 * sx + c);
        out[p] = (float)rd_find(r, C, rd_extremum(op, r, C));
    }
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
