/* Private declarations of the elementwise family (src/elementwise/).
 *
 * elementwise.c walks the 4-D strided operands, merges axes into long runs and calls the
 * microkernels of one mk_ew_kernels table per run. A table is one ISA: *__generic.c (plain
 * C, any architecture), *__avx2.c and *__avx512.c (x86 only, built with the ISA flags).
 * Microkernels see contiguous fp32 buffers (or contiguous storage for load / store / fill);
 * strided and broadcast operands are gathered by the driver with the scalar conversions
 * below, which give bit-identical results to the SIMD conversions.
 */
#ifndef MK_ELEMENTWISE_H
#define MK_ELEMENTWISE_H

#include "mpskernels.h"

#define MK_EW_BLOCK 512          /* fp32 elements per stack scratch block */
#define MK_EW_PRELU_PATTERN 1024 /* PRELU: slopes repeated into a pattern of at most this */

/* Neuron parameters plus what the driver derives from them once per call. */
typedef struct mk_ew_neuron {
    int32_t type;
    float a, b, c;
    double log2c;     /* EXPONENTIAL: log2(base), base e when c == -1 */
    double inv_log2c; /* LOGARITHM: 1 / log2(base), base e when c == -1 */
    int c_int;        /* POWER: c is an integer */
    int c_odd;        /* POWER: c is an odd integer */
} mk_ew_neuron;

typedef struct mk_ew_arith {
    int32_t op;
    float ps, ss, bias, lo, hi;
} mk_ew_arith;

/* Decode n contiguous elements of one storage format into fp32. */
typedef void (*mk_ew_load_fn)(const void *src, float *dst, int64_t n);
/* Encode n fp32 values into n contiguous elements of one storage format. */
typedef void (*mk_ew_store_fn)(const float *src, void *dst, int64_t n);
/* y[i] = neuron(x[i]) for i < n; x == y allowed. slope: PRELU only, slope[i] for x[i]. */
typedef void (*mk_ew_neuron_fn)(const mk_ew_neuron *p, const float *x, float *y, int64_t n,
                                const float *slope);
/* y[i] = clamp((ps*a[i]) OP (ss*b[i]) + bias, lo, hi); a_bc / b_bc: that operand is the
 * single value a[0] / b[0] for every i. y may equal a or b. */
typedef void (*mk_ew_arith_fn)(const mk_ew_arith *p, const float *a, int a_bc, const float *b,
                               int b_bc, float *y, int64_t n);
/* Store the element `bits` (esize = 1, 2 or 4 bytes) n times contiguously. */
typedef void (*mk_ew_fill_fn)(void *dst, int64_t n, uint32_t bits, int esize);

/* Copy P runs of rb bytes from s to d, their starts sb / db bytes apart (sb 0: the same
 * run each time); d and s do not overlap. Gathers and scatters pixels of a few channels. */
typedef void (*mk_ew_runs_fn)(char *d, int64_t db, const char *s, int64_t sb, int64_t rb,
                              int64_t P);

/* d[3i + k] = plane k's element i (4-byte elements) for i < n: three planes interleaved
 * (NCHW -> NHWC of an RGB image). */
typedef void (*mk_ew_interleave3_fn)(const uint32_t *a, const uint32_t *b, const uint32_t *c,
                                     uint32_t *d, int64_t n);

/* The loop every ISA file compiles as its interleave3: the compiler vectorises it with that
 * ISA's permutes. */
static inline void mk_ew_interleave3_loop(const uint32_t *restrict a, const uint32_t *restrict b,
                                          const uint32_t *restrict c, uint32_t *restrict d,
                                          int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        d[3 * i] = a[i];
        d[3 * i + 1] = b[i];
        d[3 * i + 2] = c[i];
    }
}

#define MK_EW_NUM_FORMATS 6  /* indexed by mk_format (1..5) */
#define MK_EW_NUM_NEURONS 16 /* indexed by mk_neuron_type */

typedef struct mk_ew_kernels {
    const char *name;
    mk_ew_load_fn load[MK_EW_NUM_FORMATS];
    mk_ew_store_fn store[MK_EW_NUM_FORMATS];
    mk_ew_neuron_fn neuron[MK_EW_NUM_NEURONS];
    mk_ew_arith_fn arith[4];
    mk_ew_fill_fn fill;
    mk_ew_runs_fn runs;
    mk_ew_interleave3_fn interleave3;
} mk_ew_kernels;

extern const mk_ew_kernels mk_ew_kernels__generic;
#if MK_X86
extern const mk_ew_kernels mk_ew_kernels__avx2;
extern const mk_ew_kernels mk_ew_kernels__avx512;
#endif

/* Scalar conversions (elementwise__generic.c), bit-identical to the SIMD ones
 * (f16: vcvtps2ph with imm 0 / vcvtph2ps). */
float mk_ew_f16_to_f32(uint16_t h);
uint16_t mk_ew_f32_to_f16(float f);
float mk_ew_bf16_to_f32(uint16_t h);
uint16_t mk_ew_f32_to_bf16(float f);
uint8_t mk_ew_f32_to_unorm8(float f);
uint16_t mk_ew_f32_to_unorm16(float f);
/* Element `bits` (in the low esize bytes) that encodes v in format fmt. */
uint32_t mk_ew_encode_bits(int fmt, float v);

/* The portable runs copy (AVX2's too: per pixel, the compiler's moves are as good). */
void mk_ew_runs__generic(char *d, int64_t db, const char *s, int64_t sb, int64_t rb, int64_t P);

/* Strided (any stride, 0 = broadcast) decode / encode of n elements. */
void mk_ew_load_strided(int fmt, const void *src, int64_t stride, float *dst, int64_t n);
void mk_ew_store_strided(int fmt, const float *src, void *dst, int64_t stride, int64_t n);

#endif
