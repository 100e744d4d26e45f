/* The convolution family (src/conv/): MPSCNNConvolution, its depthwise, sub-pixel, transpose
 * and fully-connected forms, all through one parameter struct and one selection point.
 *
 * Life cycle (driven by mpskernels/_conv.pxi):
 *   creation / reload  mk_conv_weights_create: mk_conv_select picks the kernel for the shape,
 *                      which packs the weights once (never per encode);
 *   encode             mk_conv_plan_create: per geometry (sizes, strides, window placement),
 *                      whatever the kernel precomputes (igemm: the indirection buffer), built
 *                      relative to the source base so it serves any address; cached by the
 *                      Python object per geometry;
 *   commit / run       mk_conv_run with the addresses bound.
 * Adding a kernel (Winograd, depthwise, direct): a new file defining an mk_conv_kernel, one
 * line in the table of conv.c (order = preference), see docs/convolution.md. */
#ifndef MK_CONV_H
#define MK_CONV_H

#include "mpskernels.h"

/* Everything every convolution kernel takes. Shape fields are fixed at creation; placement
 * fields describe one encode. Coordinates follow MPS_REFERENCE.md §4.5: output pixel (i, j)
 * (0-based inside the region computed) reads, for tap (p, q), the up-sampled source at
 *     x = left + i*sx + p*dx,   y = top + j*sy + q*dy
 * where the up-sampled source has up_x - 1 zeros between real pixels (ConvolutionTranspose:
 * up = its stride, sx = 1) and real pixel u sits at x = u*up_x. Out-of-range taps read zero
 * (edge_mode 0) or the nearest real edge pixel (edge_mode 1). */
typedef struct mk_conv_params {
    /* ---- shape (creation) ---- */
    int32_t groups;          /* depthwise: the input channel count (cin_g = 1) */
    int32_t cin_g, cout_g;   /* input and output channels per group */
    int32_t kh, kw;          /* window */
    int32_t sy, sx;          /* stride in up-sampled source pixels per output pixel */
    int32_t dy, dx;          /* dilation */
    int32_t up_y, up_x;      /* source up-sampling (transpose stride); 1 for a convolution */
    int32_t sub_pixel;       /* r > 1: depth-to-space on store (cout = groups*cout_g = r*r*m) */
    /* ---- placement (encode) ---- */
    int32_t n;               /* images (batch entries) */
    int32_t src_h, src_w;    /* real source size */
    int32_t out_h, out_w;    /* outputs computed per image (sub-pixel: before depth-to-space) */
    int32_t dst_h, dst_w;    /* destination pixels written (sub_pixel: <= r*out) */
    int32_t top, left;       /* up-sampled coordinate of output (0, 0)'s first tap */
    int32_t edge_mode;       /* 0 ZERO, 1 CLAMP */
    mk_operand src;          /* channel 0 of the group 0, pixel (0, 0) of the first image */
    mk_operand dst;          /* the first channel written at the region's first pixel */
    mk_neuron_params neuron; /* applied last; PRELU: one slope per output channel */
    int32_t accumulate;      /* dst = neuron(conv + bias + dst): the destination holds a
                              * residual to add (a fused residual Add); every kernel */
} mk_conv_params;

typedef struct mk_conv_kernel mk_conv_kernel;

/* Weights and bias packed for the kernel chosen at creation. */
typedef struct mk_conv_weights {
    const mk_conv_kernel *kernel;
    mk_conv_params shape;    /* the shape fields it was packed for */
    float *packed;           /* kernel-specific layout */
    float *bias;             /* groups*cout_g floats (zeros when there is none) */
} mk_conv_weights;

/* One geometry's precomputed state (e.g. the igemm indirection buffer). */
typedef struct mk_conv_plan {
    const mk_conv_weights *weights;
    mk_conv_params params;   /* placement it was built for; data pointers ignored */
    void *state;             /* kernel-specific */
} mk_conv_plan;

/* A kernel: create/reload call supports() then pack(); each encode geometry calls plan()
 * once; run() is called at commit with p's addresses bound and p's placement equal to the
 * plan's. Each function returns MK_OK, MK_ENOMEM or MK_EINVAL. */
struct mk_conv_kernel {
    const char *name;                                     /* family, e.g. "igemm" */
    int (*supports)(const mk_conv_params *shape);
    /* weights [groups*cout_g][kh][kw][cin_g] in format (MK_FMT_F32 / MK_FMT_F16) */
    mk_status (*pack)(mk_conv_weights *w, const void *weights, int format);
    /* the packed weights back as float32 [groups*cout_g][kh][kw][cin_g] */
    void (*unpack)(const mk_conv_weights *w, float *weights);
    mk_status (*plan)(mk_conv_plan *plan);
    void (*free_plan)(mk_conv_plan *plan);
    mk_status (*run)(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool);
    /* the implementation actually used with the ISA active now, e.g. "igemm_12x32__avx512" */
    const char *(*implementation)(const mk_conv_weights *w, char *buffer, size_t size);
};

/* The selection point: the first kernel of conv.c's table whose supports() accepts shape. */
const mk_conv_kernel *mk_conv_select(const mk_conv_params *shape);

/* bias: groups*cout_g floats, or NULL. On failure returns NULL with *status set. */
mk_conv_weights *mk_conv_weights_create(const mk_conv_params *shape, const void *weights,
                                        int format, const float *bias, mk_status *status);
void mk_conv_weights_free(mk_conv_weights *w);
/* Copy out the weights (float32, [out][kh][kw][cin_g]) and bias as they are now. */
void mk_conv_weights_export(const mk_conv_weights *w, float *weights, float *bias);
const char *mk_conv_implementation(const mk_conv_weights *w, char *buffer, size_t size);

mk_conv_plan *mk_conv_plan_create(const mk_conv_weights *w, const mk_conv_params *p,
                                  mk_status *status);
void mk_conv_plan_free(mk_conv_plan *plan);
mk_status mk_conv_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool);

/* ---- helpers shared by the kernel files (conv.c) ------------------------------------- */

/* Whether the neuron is a clamp the GEMM epilogue applies ([lo, hi]); else lo/hi = -inf/inf
 * and the caller applies it to the tile right after it is written. */
int mk_conv_clamp(const mk_neuron_params *n, float *lo, float *hi);
/* Store rows x nc fp32 results (row r at tile + r*ld) to the destination: accumulate (the
 * destination's values added into the tile first), neuron, format conversion and sub-pixel
 * depth-to-space. m0: flattened index (image, y, x) of the first row; o0: first output
 * channel (over all groups). */
mk_status mk_conv_store(const mk_conv_params *p, float *tile, int64_t ld, int64_t m0,
                        int rows, int64_t o0, int nc);
/* Whether the output channels [o0, o0 + nc) of rows m0.. can be written straight into the
 * destination: float32, no sub-pixel, rows evenly spaced. Sets *c and *ldc if so. */
int mk_conv_direct(const mk_conv_params *p, int64_t m0, int rows, int64_t o0, float **c,
                   int64_t *ldc);
/* The float32 source a kernel reads: p->src itself when it is float32, else a tight copy
 * (*copy, to be freed by the caller) converted now. Sets the element strides of the result. */
mk_status mk_conv_source_f32(const mk_conv_params *p, mk_pool *pool, const float **a, float **copy,
                             int64_t *a_n, int64_t *a_y, int64_t *a_x);
/* The element strides mk_conv_source_f32 will give (known at plan time). */
void mk_conv_source_strides(const mk_conv_params *p, int64_t *a_n, int64_t *a_y, int64_t *a_x);
/* The same with tight != 0: always a tight float32 copy (pixels groups*cin_g floats apart). */
mk_status mk_conv_source_f32_tight(const mk_conv_params *p, int tight, mk_pool *pool,
                                   const float **a, float **copy, int64_t *a_n, int64_t *a_y,
                                   int64_t *a_x);
void mk_conv_source_strides_tight(const mk_conv_params *p, int tight, int64_t *a_n, int64_t *a_y,
                                  int64_t *a_x);
/* The up-sampled coordinate u (axis of size `size` real pixels, up-sampling `up`): the real
 * pixel it reads, or -1 for zero (outside with edge mode ZERO, or a stuffed zero). */
static inline int64_t mk_conv_source_index(int64_t u, int64_t size, int64_t up, int edge_mode) {
    int64_t last = (size - 1) * up;
    if (u < 0 || u > last) {
        if (edge_mode != 1) return -1;
        u = u < 0 ? 0 : last;
    }
    return u % up ? -1 : u / up;
}

extern const mk_conv_kernel mk_conv_kernel_winograd;
extern const mk_conv_kernel mk_conv_kernel_direct;
extern const mk_conv_kernel mk_conv_kernel_dwconv;
extern const mk_conv_kernel mk_conv_kernel_igemm;

#endif
