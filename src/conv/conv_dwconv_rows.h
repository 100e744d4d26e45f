/* The depthwise row template, included once per ISA with VT (vector type), VL (lanes),
 * LOAD, STORE, FMA(a, b, c) = a*b + c, MAX, MIN, SET1 and DW_ISA (the name suffix) defined.
 * Accumulators for a block stay in registers across all taps of one output pixel. */
#define DW_CAT2(a, b) a##b
#define DW_CAT(a, b) DW_CAT2(a, b)
#define DW_PX 4   /* interior output pixels per block */
#ifndef DW_IN_REGISTER
#define DW_IN_REGISTER(x) (void)0
#endif
#define DW_RUN_PX 8   /* pixels per block in a regular run (accumulators per lane slice) */

/* Output pixels [ox, ox + px) of a 3x3 row, taps read through xs (interior: no tap is
 * outside, so no per-tap test). px * NV independent sums hide the FMA latency that one
 * pixel's nine dependent FMAs would expose. */
#define DW_3X3_FN(NAME, CB)                                                                    \
    static inline __attribute__((always_inline)) void NAME(const mk_dw_row *r,                 \
                                                           const VT wr[9][(CB) / VL], int32_t ox,\
                                                           int px, int interior, int clamp) {  \
        enum { NV = (CB) / VL };                                                               \
        VT acc[DW_PX][NV];                                                                     \
        for (int i = 0; i < px; i++)                                                           \
            for (int v = 0; v < NV; v++) acc[i][v] = LOAD(r->bias + v * VL);                   \
        const int32_t *xs = r->xs + (int64_t)ox * 3;                                           \
        for (int q = 0; q < 3; q++) {                                                          \
            if (r->ys[q] < 0) continue;                                                        \
            const float *row = r->a + r->ys[q] * r->ay;                                        \
            for (int p = 0; p < 3; p++)                                                        \
                for (int i = 0; i < px; i++) {                                                 \
                    if (!interior && xs[i * 3 + p] < 0) continue;                              \
                    const float *in = row + xs[i * 3 + p] * r->ax;                             \
                    for (int v = 0; v < NV; v++)                                               \
                        acc[i][v] = FMA(wr[q * 3 + p][v], LOAD(in + v * VL), acc[i][v]);       \
                }                                                                              \
        }                                                                                      \
        const VT lo = SET1(r->lo), hi = SET1(r->hi);                                           \
        for (int i = 0; i < px; i++) {                                                         \
            float *out = r->out + (ox + i) * r->ld;                                            \
            for (int v = 0; v < NV; v++) {                                                     \
                if (clamp) acc[i][v] = MIN(MAX(acc[i][v], lo), hi);                            \
                STORE(out + v * VL, acc[i][v]);                                                \
            }                                                                                  \
        }                                                                                      \
    }

/* DW_RUN_PX output pixels [ox, ox + DW_RUN_PX) inside a regular run (mk_dw_row.run_*) of a row
 * whose three source rows are all inside, one VL-lane slice of the block at a time: each source
 * column of a kernel row is loaded once and used by every pixel that reads it (3 at step 1, up
 * to 2 at step 2), instead of once per tap and pixel through the column table. A pixel's sum
 * still runs over q, then p, in order, so the bits are those of the paths above. */
#define DW_RUN_FN(NAME, CB, STEP)                                                              \
    static inline __attribute__((always_inline)) void NAME(const mk_dw_row *r,                 \
                                                           const VT wr[9][(CB) / VL], int32_t ox,\
                                                           int clamp) {                        \
        enum { NV = (CB) / VL, NCOL = (DW_RUN_PX - 1) * (STEP) + 3 };                          \
        const float *col0 = r->a + (int64_t)r->xs[ox * 3] * r->ax;                             \
        float *out = r->out + ox * r->ld;                                                      \
        const VT lo = SET1(r->lo), hi = SET1(r->hi);                                           \
        for (int v = 0; v < NV; v++) {                                                         \
            VT acc[DW_RUN_PX];                                                                 \
            for (int i = 0; i < DW_RUN_PX; i++) acc[i] = LOAD(r->bias + v * VL);               \
            _Pragma("GCC unroll 3") for (int q = 0; q < 3; q++) {                              \
                const float *in = col0 + r->ys[q] * r->ay + v * VL;                            \
                _Pragma("GCC unroll 40") for (int c = 0; c < NCOL; c++) {                      \
                    VT x = LOAD(in + c * r->ax);                                               \
                    DW_IN_REGISTER(x);                                                         \
                    for (int p = 0; p < 3; p++)   /* pixel (c - p) / STEP reads it at tap p */ \
                        if (c >= p && (c - p) % (STEP) == 0 && (c - p) / (STEP) < DW_RUN_PX)   \
                            acc[(c - p) / (STEP)] =                                            \
                                FMA(wr[q * 3 + p][v], x, acc[(c - p) / (STEP)]);               \
                }                                                                              \
            }                                                                                  \
            for (int i = 0; i < DW_RUN_PX; i++) {                                              \
                if (clamp) acc[i] = MIN(MAX(acc[i], lo), hi);                                  \
                STORE(out + i * r->ld + v * VL, acc[i]);                                       \
            }                                                                                  \
        }                                                                                      \
    }

#define DW_ROW_FN(NAME, PIXELS, RUN1, RUN2, CB)                                                \
    static void NAME(const mk_dw_row *r) {                                                     \
        enum { NV = (CB) / VL };                                                               \
        const VT lo = SET1(r->lo), hi = SET1(r->hi);                                           \
        const int clamp = r->lo > -INFINITY || r->hi < INFINITY;                               \
        if (r->kh == 3 && r->kw == 3) { /* 3x3: the block's 9 weight vectors in registers */   \
            VT wr[9][NV];                                                                      \
            for (int t = 0; t < 9; t++)                                                        \
                for (int v = 0; v < NV; v++) wr[t][v] = LOAD(r->w + t * r->cpad + v * VL);     \
            const int rows_inside = r->run_step && r->ys[0] >= 0 && r->ys[1] >= 0 &&          \
                                    r->ys[2] >= 0;                                             \
            for (int32_t ox = 0; ox < r->out_w;) {                                             \
                if (rows_inside && ox >= r->run_begin && ox + DW_RUN_PX <= r->run_end) {       \
                    if (r->run_step == 1) RUN1(r, wr, ox, clamp);                              \
                    else RUN2(r, wr, ox, clamp);                                               \
                    ox += DW_RUN_PX;                                                           \
                    continue;                                                                  \
                }                                                                              \
                int inside = ox + DW_PX <= r->out_w;                                           \
                for (int t = 0; inside && t < 3 * DW_PX; t++) inside = r->xs[ox * 3 + t] >= 0; \
                if (inside) {                                                                  \
                    PIXELS(r, wr, ox, DW_PX, 1, clamp);                                        \
                    ox += DW_PX;                                                               \
                } else {                                                                       \
                    PIXELS(r, wr, ox, 1, 0, clamp);                                            \
                    ox++;                                                                      \
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

DW_3X3_FN(DW_CAT(dw_pixels32_, DW_ISA), 32)
DW_3X3_FN(DW_CAT(dw_pixels16_, DW_ISA), 16)
DW_RUN_FN(DW_CAT(dw_run32s1_, DW_ISA), 32, 1)
DW_RUN_FN(DW_CAT(dw_run32s2_, DW_ISA), 32, 2)
DW_RUN_FN(DW_CAT(dw_run16s1_, DW_ISA), 16, 1)
DW_RUN_FN(DW_CAT(dw_run16s2_, DW_ISA), 16, 2)
DW_ROW_FN(DW_CAT(dw_block32_, DW_ISA), DW_CAT(dw_pixels32_, DW_ISA), DW_CAT(dw_run32s1_, DW_ISA),
          DW_CAT(dw_run32s2_, DW_ISA), 32)
DW_ROW_FN(DW_CAT(dw_block16_, DW_ISA), DW_CAT(dw_pixels16_, DW_ISA), DW_CAT(dw_run16s1_, DW_ISA),
          DW_CAT(dw_run16s2_, DW_ISA), 16)

const mk_dw_rows DW_CAT(mk_dw_rows_, DW_ISA) = {
    DW_CAT(dw_block32_, DW_ISA), DW_CAT(dw_block16_, DW_ISA), "dwconv_" DW_NAME,
};
