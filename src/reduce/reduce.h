/* Reductions (src/reduce/): the C API of the NNReduce kernels and the private microkernel
 * table.
 *
 * reduce.c (the driver) splits the outputs into chunks whose bounds depend on the shape only,
 * converts non-fp32 sources into fp32 blocks and calls the microkernels of one
 * mk_rd_kernels table: *__generic.c (plain C), *__avx2.c and *__avx512.c (x86 only). Every
 * output is accumulated in fp32 in one fixed order (below), so results are bitwise identical
 * for any thread count, and for sums, means and argument reductions also for any ISA.
 *
 * Accumulation order (see docs/reduction.md):
 *  - across feature channels: 64 lanes; lane k accumulates channels k, k+64, k+128, ... in
 *    increasing order; then lanes combine as a tree: k with k+32, then k with k+16, k+8, k+4,
 *    k+2, k+1.
 *  - along a row or a column: sequentially, in increasing x or y.
 * Mean = sum / count (one correctly rounded division). Sum with weight = sum * weight.
 * NaN: min, max, sum and mean return NaN if any input is NaN; argmin / argmax return the index
 * of the first NaN (NumPy's rule). Ties in argmin / argmax: the first (lowest) index.
 */
#ifndef MK_REDUCE_H
#define MK_REDUCE_H

#include "mpskernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mk_reduce_op {
    MK_REDUCE_SUM = 0, MK_REDUCE_MEAN = 1, MK_REDUCE_MIN = 2, MK_REDUCE_MAX = 3,
    MK_REDUCE_ARGMIN = 4, MK_REDUCE_ARGMAX = 5,
} mk_reduce_op;

/* The axis reduced: across channels (one value per pixel), along x (one value per row and
 * channel) or along y (one value per column and channel). */
typedef enum mk_reduce_axis {
    MK_REDUCE_FEATURE_CHANNELS = 0, MK_REDUCE_ROW = 1, MK_REDUCE_COLUMN = 2,
} mk_reduce_axis;

typedef struct mk_reduce_params {
    int32_t op;                  /* mk_reduce_op */
    int32_t axis;                /* mk_reduce_axis */
    float weight;                /* FEATURE_CHANNELS SUM: the result is multiplied by it */
    int32_t by_nonzero_weights;  /* weighted SUM: divide by the number of non-zero weights */
} mk_reduce_params;

/* Reduce the source region of extent e (images, rows, columns, channels). The destination
 * operand points at the first result; its extent is e with the reduced axis set to 1.
 * weights (NULL unless weighted; FEATURE_CHANNELS SUM / MEAN only): one weight per source
 * element, same extent as the source; strides may be 0 to repeat a pixel or an image.
 * Source and weights need channel stride 1. MK_EINVAL for a bad argument, MK_ENOMEM if
 * scratch memory (only for > 8192 channels in a non-fp32 format) cannot be had. */
mk_status mk_reduce(const mk_reduce_params *p, const mk_operand *src, const mk_operand *weights,
                    const mk_operand *dst, mk_extent e, mk_pool *pool);

/* Reads every byte of [data, data + nbytes), split over the pool, and returns the OR of
 * all its 64-bit words: bench/ times this as the machine's read bandwidth. */
uint64_t mk_reduce_read_probe(const void *data, int64_t nbytes, mk_pool *pool);

/* Fill the reduction dispatch table for `isa` (called by mk_select_isa). */
void mk_reduce_select_isa(mk_isa isa);

/* ---- private: the microkernels (fp32 in, fp32 out) ------------------------------------ */

#define MK_RD_LANES 16  /* logical lanes of the channel reductions, whatever the ISA */

typedef struct mk_rd_kernels {
    const char *name;
    /* out[p] = SUM / MIN / MAX over c < C of x[p*sx + c], for p < P (C >= 1). */
    void (*channels)(int op, const float *x, int64_t sx, int64_t C, int64_t P, float *out);
    /* out[p] = sum over c of x[p*sx + c] * w[p*sw + c]; count (if not NULL): count[p] =
     * the number of c with w[p*sw + c] != 0. */
    void (*channels_weighted)(const float *x, int64_t sx, const float *w, int64_t sw,
                              int64_t C, int64_t P, float *out, float *count);
    /* out[p] = ARGMIN / ARGMAX index (as a float) over c < C of x[p*sx + c]. */
    void (*channels_arg)(int op, const float *x, int64_t sx, int64_t C, int64_t P, float *out);
    /* acc[j] = acc[j] OP x[i*S + j] for i < L in increasing order, j < M (SUM / MIN / MAX);
     * first: acc[j] starts as x[j] (i = 0) instead of being read. */
    void (*strided)(int op, const float *x, int64_t S, int64_t L, int64_t M, float *acc,
                    int first);
    /* OR of the n 64-bit words at x. */
    uint64_t (*read_or)(const uint64_t *x, int64_t n);
} mk_rd_kernels;

extern const mk_rd_kernels mk_rd_kernels__generic;
#if MK_X86
extern const mk_rd_kernels mk_rd_kernels__avx2;
extern const mk_rd_kernels mk_rd_kernels__avx512;
#endif

#ifdef __cplusplus
}
#endif
#endif
