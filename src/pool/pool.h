/* Pooling (src/pool/): max and average pooling over NHWC fp32 operands, the kernels of ONNX
 * MaxPool, AveragePool, GlobalAveragePool and GlobalMaxPool (a window the size of the image).
 *
 * Output pixel (oy, ox) reads the taps iy = oy*sy - pad_top + ky*dy, ix likewise; taps outside
 * the source are skipped. Average divides by the number of taps inside the source, or with
 * count_include_pad by the taps inside the padded source [-pad_top, H + pad_bottom) (ONNX's
 * rule, so a ceil_mode window past the padding is not counted). A window with no tap gives
 * -inf (max) or 0 (average). Each output sums its taps in one fixed order (ky, kx), so
 * results are identical for any thread count. Work is split over output rows. */
#ifndef MK_POOL_H
#define MK_POOL_H

#include "mpskernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mk_pool_mode { MK_POOL_MAX = 0, MK_POOL_AVERAGE = 1 } mk_pool_mode;

typedef struct mk_pool2d_params {
    int32_t mode;                 /* mk_pool_mode */
    int32_t kh, kw, sy, sx, dy, dx;
    int32_t pad_top, pad_left, pad_bottom, pad_right;
    int32_t count_include_pad;
} mk_pool2d_params;

/* src: extent (n, src_h, src_w, c); dst: (n, out_h, out_w, c). Both MK_FMT_F32 with channel
 * stride 1. MK_EINVAL for a bad argument. */
mk_status mk_pool2d(const mk_pool2d_params *p, const mk_operand *src, int32_t src_h,
                    int32_t src_w, const mk_operand *dst, mk_extent out, mk_pool *pool);

/* Fill the pooling dispatch table for `isa` (called by mk_select_isa). */
void mk_pool_select_isa(mk_isa isa);

/* ---- private: one output row of one image, per ISA ----------------------------------- */
typedef struct mk_pool_row_args {
    const mk_pool2d_params *p;
    const float *src;             /* image n, pixel (0, 0) */
    int64_t sy_src, sx_src;       /* element strides of rows and columns */
    int32_t src_h, src_w, c;
    float *dst;                   /* output row start */
    int64_t sx_dst;
    int32_t oy, out_w;
} mk_pool_row_args;

typedef void (*mk_pool_row_fn)(const mk_pool_row_args *a);
extern const mk_pool_row_fn mk_pool_row__generic;
#if MK_X86
extern const mk_pool_row_fn mk_pool_row__avx2;
extern const mk_pool_row_fn mk_pool_row__avx512;
#endif

#ifdef __cplusplus
}
#endif
#endif
