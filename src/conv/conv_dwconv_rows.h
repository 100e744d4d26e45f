/* The depthwise row template, included once per ISA with VT (vector type), VL (lanes),
 * LOAD, STORE, FMA(a, b, c) = a*b + c, MAX, MIN, SET1 and DW_ISA (the name suffix) defined.
 * Accumulators for a block stay in registers across all taps of one output pixel. */
#define DW_CAT2(a, b) a##b
#define DW_CAT(a, b) DW_CAT2(a, b)

#define DW_ROW_FN(NAME, CB)                                                                    \
    static void NAME(const mk_dw_row *r) {                                                     \
        enum { NV = (CB) / VL };                                                               \
        const VT lo = SET1(r->lo), hi = SET1(r->hi);                                           \
        const int clamp = r->lo > -INFINITY || r->hi < INFINITY;                               \
        if (r->kh == 3 && r->kw == 3) { /* 3x3: the block's 9 weight vectors in registers */ \
            VT wr[9][NV];                                                                      \
            for (int t = 0; t < 9; t++)                                                        \
                for (int v = 0; v < NV; v++) wr[t][v] = LOAD(r->w + t * r->cpad + v * VL);     \
            for (int32_t ox = 0; ox < r->out_w; ox++) {                                        \
                VT acc[NV];                                                                    \
                for (int v = 0; v < NV; v++) acc[v] = LOAD(r->bias + v * VL);                  \
                const int32_t *xs = r->xs + (int64_t)ox * 3;                                   \
                for (int q = 0; q < 3; q++) {                                                  \
                    if (r->ys[q] < 0) continue;                                                \
                    const float *row = r->a + r->ys[q] * r->ay;                                \
                    for (int p = 0; p < 3; p++) {                                              \
                        if (xs[p] < 0) continue;                                               \
                        const float *in = row + xs[p] * r->ax;                                 \
                        for (int v = 0; v < NV; v++)                                           \
                            acc[v] = FMA(wr[q * 3 + p][v], LOAD(in + v * VL), acc[v]);         \
                    }                                                                          \
                }                                                                              \
                float *out = r->out + ox * r->ld;                                              \
                for (int v = 0; v < NV; v++) {                                                 \
                    if (clamp) acc[v] = MIN(MAX(acc[v], lo), hi);                              \
                    STORE(out + v * VL, acc[v]);                                               \
                }                                                                              \
            }                                                                                  \
            return;                                                                            \
        }                                                                                      \
        for (int32_t ox = 0; ox < r->out_w; ox++) {                                            \
            VT acc[NV];                                                                        \
            for (int v = 0; v < NV; v++) acc[v] = LOAD(r->bias + v * VL);                      \
            for (int32_t q = 0; q < r->kh; q++) {                                              \
                if (r->ys[q] < 0) continue;                                                    \
                const float *row = r->a + r->ys[q] * r->ay;                                    \
                const float *wq = r->w + (int64_t)q * r->kw * r->cpad;                         \
                const int32_t *xs = r->xs + (int64_t)ox * r->kw;                               \
                for (int32_t p = 0; p < r->kw; p++) {                                          \
                    if (xs[p] < 0) continue;                                                   \
                    const float *in = row + xs[p] * r->ax, *wt = wq + p * r->cpad;             \
                    for (int v = 0; v < NV; v++)                                               \
                        acc[v] = FMA(LOAD(wt + v * VL), LOAD(in + v * VL), acc[v]);            \
                }                                                                              \
            }                                                                                  \
            float *out = r->out + ox * r->ld;                                                  \
            for (int v = 0; v < NV; v++) {                                                     \
                if (clamp) acc[v] = MIN(MAX(acc[v], lo), hi);                                  \
                STORE(out + v * VL, acc[v]);                                                   \
            }                                                                                  \
        }                                                                                      \
    }

DW_ROW_FN(DW_CAT(dw_block32_, DW_ISA), 32)
DW_ROW_FN(DW_CAT(dw_block16_, DW_ISA), 16)

const mk_dw_rows DW_CAT(mk_dw_rows_, DW_ISA) = {
    DW_CAT(dw_block32_, DW_ISA), DW_CAT(dw_block16_, DW_ISA), "dwconv_" DW_NAME,
};
