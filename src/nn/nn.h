/* The nn family (src/nn/): fp32 kernels the machine-learning pipeline needs beyond MPS's
 * kernel families (mpskernels/ml.py runs them as network nodes):
 *  - row kernels along the innermost, contiguous axis: softmax, layer normalisation (and its
 *    per-row mean and inverse standard deviation), erf, hard-swish, GELU's tanh form;
 *  - a gather by per-axis index tables: ONNX Pad (every mode), Slice (any step), Split,
 *    Gather along one axis, nearest-neighbour Resize;
 *  - bilinear resize of NHWC images (ONNX Resize, mode linear, on H and W).
 *
 * nn.c is the driver (checks, the split over the pool, the gather); the row and resize loops
 * are compiled once per ISA (nn__generic.c, nn__avx2.c, nn__avx512.c, chosen by
 * mk_nn_select_isa). The vector paths use the elementwise family's vector math (ew_exp,
 * ew_erf; elementwise_simd.h). Work is split over rows / output pixels with chunk bounds
 * that depend on the shape only, and every output is computed by one task in a fixed order,
 * so results are bitwise identical for any thread count. */
#ifndef MK_NN_H
#define MK_NN_H

#include "mpskernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mk_nn_row_op {
    MK_NN_SOFTMAX = 0,          /* y = e^(x - max) / sum e^(x - max) */
    MK_NN_LAYER_NORM = 1,       /* y = (x - mean) / sqrt(var + epsilon) * scale + bias */
    MK_NN_LAYER_NORM_MEAN = 2,  /* one value per row: the mean */
    MK_NN_LAYER_NORM_INV_STD = 3, /* one value per row: 1 / sqrt(var + epsilon) */
    MK_NN_ERF = 4,
    MK_NN_HARD_SWISH = 5,       /* x * clamp((x + 3) / 6, 0, 1) */
    MK_NN_GELU_TANH = 6,        /* x / 2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    MK_NN_NUM_ROW_OPS = 7,
} mk_nn_row_op;

typedef struct mk_nn_rows_params {
    int32_t op;                 /* mk_nn_row_op */
    float epsilon;              /* LAYER_NORM* */
    const float *scale, *bias;  /* LAYER_NORM: e.c floats each, NULL for 1 / 0 */
} mk_nn_rows_params;

/* Each row (n, y, x) of the source: e.c elements, channel stride 1 (if e.c > 1). The destination has the
 * same extent (channel stride 1), or e.c = 1 for the per-row LAYER_NORM_MEAN / _INV_STD.
 * Source and destination may be the same memory only with identical views. */
mk_status mk_nn_rows(const mk_nn_rows_params *p, const mk_operand *src, const mk_operand *dst,
                     mk_extent e, mk_pool *pool);

/* dst[n][y][x][c] = src[index[0][n]][index[1][y]][index[2][x]][index[3][c]], or `value` where
 * any of the four indices is -1. index[k] has one entry per destination element along axis
 * k, each -1 or inside the source extent `src_e` (checked: MK_EINVAL otherwise). */
typedef struct mk_nn_gather_params {
    const int32_t *index[4];
    float value;
} mk_nn_gather_params;

mk_status mk_nn_gather(const mk_nn_gather_params *p, const mk_operand *src, mk_extent src_e,
                       const mk_operand *dst, mk_extent e, mk_pool *pool);

/* Bilinear resize of NHWC images: output row y blends source rows y0[y] and y1[y] with
 * weight wy[y] on y1, column x likewise (x0, x1, wx):
 *   top = a + wx (b - a), bottom = c + wx (d - c), out = top + wy (bottom - top)
 * Tables: e.h entries (y*) and e.w entries (x*), indices inside src_h / src_w (checked).
 * Channel stride 1 on both sides; image n of the destination reads image n. */
typedef struct mk_nn_resize_params {
    const int32_t *y0, *y1, *x0, *x1;
    const float *wy, *wx;
} mk_nn_resize_params;

mk_status mk_nn_resize_linear(const mk_nn_resize_params *p, const mk_operand *src, int32_t src_h,
                              int32_t src_w, const mk_operand *dst, mk_extent e, mk_pool *pool);

/* Fill the nn dispatch table for `isa` (called by mk_select_isa). */
void mk_nn_select_isa(mk_isa isa);

/* ---- private: the per-ISA loops (fp32, contiguous) ------------------------------------ */

/* One bilinear output row: source rows r0, r1 (pixel 0; pixel stride sx elements). */
typedef struct mk_nn_resize_row {
    const float *r0, *r1;
    int64_t sx;
    float wy;
    const int32_t *x0, *x1;
    const float *wx;
    float *dst;
    int64_t dx;
    int32_t out_w, c;
} mk_nn_resize_row;

typedef struct mk_nn_kernels {
    const char *name;
    void (*softmax)(const float *x, float *y, int64_t n);
    /* mean and inverse standard deviation of x[0..n); y (if not NULL) the normalised row */
    void (*layer_norm)(const float *x, float *y, int64_t n, float epsilon, const float *scale,
                       const float *bias, float *mean, float *inv_std);
    /* ERF, HARD_SWISH, GELU_TANH; x == y allowed */
    void (*unary)(int op, const float *x, float *y, int64_t n);
    void (*resize_row)(const mk_nn_resize_row *a);
} mk_nn_kernels;

extern const mk_nn_kernels mk_nn_kernels__generic;
#if MK_X86
extern const mk_nn_kernels mk_nn_kernels__avx2;
extern const mk_nn_kernels mk_nn_kernels__avx512;
#endif

#ifdef __cplusplus
}
#endif
#endif
