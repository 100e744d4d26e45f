/* Convolution driver: the kernel table (the selection point), weights and plans, and the
 * store helpers every kernel shares (neuron, format conversion, depth-to-space). */
#include "conv/conv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Preference order: the first kernel whose supports() accepts the shape packs the weights.
 * Specialised kernels (Winograd F(4,3), depthwise, direct for few input channels) go before
 * the general indirect GEMM, which accepts every shape. */
static const mk_conv_kernel *const kernels[] = {
    &mk_conv_kernel_winograd,
    &mk_conv_kernel_direct,
    &mk_conv_kernel_dwconv,
    &mk_conv_kernel_igemm,
};

const mk_conv_kernel *mk_conv_select(const mk_conv_params *shape) {
    for (size_t i = 0; i < sizeof kernels / sizeof kernels[0]; i++)
        if (kernels[i]->supports(shape)) return kernels[i];
    return NULL;
}

static int shape_valid(const mk_conv_params *s) {
    const int32_t v[] = {s->groups, s->cin_g, s->cout_g, s->kh, s->kw, s->sy, s->sx,
                         s->dy, s->dx, s->up_y, s->up_x, s->sub_pixel};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (v[i] < 1) return 0;
    int64_t cout = (int64_t)s->groups * s->cout_g;
    int64_t k = (int64_t)s->kh * s->kw * s->cin_g;
    return cout <= INT32_MAX && k <= INT32_MAX && (int64_t)s->groups * s->cin_g <= INT32_MAX &&
           cout % ((int64_t)s->sub_pixel * s->sub_pixel) == 0;
}

mk_conv_weights *mk_conv_weights_create(const mk_conv_params *shape, const void *weights,
                                        int format, const float *bias, mk_status *status) {
    *status = MK_EINVAL;
    if (!shape_valid(shape) || (format != MK_FMT_F32 && format != MK_FMT_F16)) return NULL;
    const mk_conv_kernel *kernel = mk_conv_select(shape);
    if (kernel == NULL) return NULL;
    *status = MK_ENOMEM;
    mk_conv_weights *w = calloc(1, sizeof *w);
    if (w == NULL) return NULL;
    w->kernel = kernel;
    w->shape = *shape;
    int64_t cout = (int64_t)shape->groups * shape->cout_g;
    /* padded: a kernel may load a whole vector of bias at the last columns */
    w->bias = calloc((size_t)cout + 64, sizeof(float));
    if (w->bias == NULL) {
        free(w);
        return NULL;
    }
    if (bias) memcpy(w->bias, bias, (size_t)cout * sizeof(float));
    *status = kernel->pack(w, weights, format);
    if (*status != MK_OK) {
        mk_conv_weights_free(w);
        return NULL;
    }
    return w;
}

void mk_conv_weights_free(mk_conv_weights *w) {
    if (w == NULL) return;
    free(w->packed);
    free(w->bias);
    free(w);
}

void mk_conv_weights_export(const mk_conv_weights *w, float *weights, float *bias) {
    w->kernel->unpack(w, weights);
    memcpy(bias, w->bias, (size_t)w->shape.groups * w->shape.cout_g * sizeof(float));
}

const char *mk_conv_implementation(const mk_conv_weights *w, char *buffer, size_t size) {
    return w->kernel->implementation(w, buffer, size);
}

static int placement_valid(const mk_conv_params *p) {
    return p->n >= 1 && p->src_h >= 1 && p->src_w >= 1 && p->out_h >= 1 && p->out_w >= 1 &&
           p->dst_h >= 1 && p->dst_w >= 1 && (p->edge_mode == 0 || p->edge_mode == 1) &&
           (int64_t)p->n * p->out_h * p->out_w <= INT32_MAX &&
           mk_format_size(p->src.format) != 0 && mk_format_size(p->dst.format) != 0;
}

mk_conv_plan *mk_conv_plan_create(const mk_conv_weights *w, const mk_conv_params *p,
                                  mk_status *status) {
    *status = MK_EINVAL;
    mk_conv_params q = *p;
    /* the shape is the weights' */
    memcpy(&q, &w->shape, offsetof(mk_conv_params, n));
    if (!placement_valid(&q)) return NULL;
    *status = MK_ENOMEM;
    mk_conv_plan *plan = calloc(1, sizeof *plan);
    if (plan == NULL) return NULL;
    plan->weights = w;
    plan->params = q;
    *status = w->kernel->plan(plan);
    if (*status != MK_OK) {
        free(plan);
        return NULL;
    }
    return plan;
}

void mk_conv_plan_free(mk_conv_plan *plan) {
    if (plan == NULL) return;
    plan->weights->kernel->free_plan(plan);
    free(plan);
}

mk_status mk_conv_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool) {
    if (p->src.data == NULL || p->dst.data == NULL ||
        (p->neuron.type == MK_NEURON_PRELU && p->neuron.prelu == NULL))
        return MK_EINVAL;
    mk_conv_params q = plan->params;    /* placement from the plan, addresses from p */
    q.src = p->src;
    q.dst = p->dst;
    q.neuron = p->neuron;
    q.accumulate = p->accumulate;
    return plan->weights->kernel->run(plan, &q, pool);
}

/* ---- helpers for the kernels -------------------------------------------------------------- */

int mk_conv_clamp(const mk_neuron_params *n, float *lo, float *hi) {
    *lo = -INFINITY;
    *hi = INFINITY;
    switch (n->type) {
    case MK_NEURON_NONE:
        return 1;
    case MK_NEURON_RELU:
        if (n->a != 0.0f) return 0;
        *lo = 0.0f;
        return 1;
    case MK_NEURON_RELUN:   /* min(max(x, 0), b), NaN-free when b >= 0 */
        if (n->a != 0.0f || !(n->b >= 0.0f)) return 0;
        *lo = 0.0f;
        *hi = n->b;
        return 1;
    default:
        return 0;
    }
}

static void row_position(const mk_conv_params *p, int64_t m, int64_t *img, int64_t *y, int64_t *x) {
    int64_t plane = (int64_t)p->out_h * p->out_w;
    *img = m / plane;
    m -= *img * plane;
    *y = m / p->out_w;
    *x = m - *y * p->out_w;
}

static mk_status store_run(const mk_conv_params *p, float *src, int64_t src_stride,
                           char *dst, int64_t dst_stride, int64_t count, int64_t o0, int64_t nc) {
    mk_neuron_params n = p->neuron;
    if (n.type == MK_NEURON_PRELU) n.prelu += o0;
    mk_operand s = {src, MK_FMT_F32, 0, 0, src_stride, 1};
    mk_operand d = {dst, p->dst.format, 0, 0, dst_stride, 1};
    mk_extent e = {1, 1, (int32_t)count, (int32_t)nc};
    if (p->accumulate) {   /* in fp32, before the neuron */
        const mk_arith_params add = {MK_ARITH_ADD, 1.0f, 1.0f, 0.0f, -INFINITY, INFINITY};
        mk_status st = mk_arithmetic(&add, &s, &d, &s, e, NULL);
        if (st != MK_OK) return st;
    }
    return mk_neuron(&n, &s, &d, e, NULL);
}

mk_status mk_conv_store(const mk_conv_params *p, float *tile, int64_t ld, int64_t m0,
                        int rows, int64_t o0, int nc) {
    const size_t es = mk_format_size(p->dst.format);
    char *base = p->dst.data;
    const mk_operand *d = &p->dst;
    int r = 0;
    while (r < rows) {
        int64_t img, y, x;
        row_position(p, m0 + r, &img, &y, &x);
        if (p->sub_pixel == 1) {
            /* a run of rows along one output row */
            int64_t len = p->out_w - x;
            if (len > rows - r) len = rows - r;
            char *dst = base + (img * d->stride_n + y * d->stride_y + x * d->stride_x + o0) * (int64_t)es;
            mk_status s = store_run(p, tile + r * ld, ld, dst, d->stride_x, len, o0, nc);
            if (s != MK_OK) return s;
            r += (int)len;
            continue;
        }
        /* depth-to-space: channel o = M*(r*dy + dx) + c goes to pixel (x*r + dx, y*r + dy) */
        const int64_t sp = p->sub_pixel;
        const int64_t M = (int64_t)p->groups * p->cout_g / (sp * sp);
        int64_t j = 0;
        while (j < nc) {
            int64_t o = o0 + j, blk = o / M, c = o - blk * M;
            int64_t len = M - c;
            if (len > nc - j) len = nc - j;
            int64_t X = x * sp + blk % sp, Y = y * sp + blk / sp;
            if (X < p->dst_w && Y < p->dst_h) {
                char *dst = base + (img * d->stride_n + Y * d->stride_y + X * d->stride_x + c) * (int64_t)es;
                mk_status s = store_run(p, tile + r * ld + j, ld, dst, d->stride_x, 1, o, len);
                if (s != MK_OK) return s;
            }
            j += len;
        }
        r++;
    }
    return MK_OK;
}

int mk_conv_direct(const mk_conv_params *p, int64_t m0, int rows, int64_t o0, float **c,
                   int64_t *ldc) {
    if (p->dst.format != MK_FMT_F32 || p->sub_pixel != 1) return 0;
    const mk_operand *d = &p->dst;
    int64_t img, y, x;
    row_position(p, m0, &img, &y, &x);
    /* rows are evenly spaced if they stay on one output row, or if output rows (and images)
     * follow each other in the destination with no gap */
    const int64_t last = m0 + rows - 1, plane = (int64_t)p->out_h * p->out_w;
    const int one_row = x + rows <= p->out_w;
    const int rows_packed = (int64_t)p->out_w * d->stride_x == d->stride_y;
    const int one_image = last / plane == img;
    if (!(one_row || (rows_packed && (one_image || p->out_h * d->stride_y == d->stride_n))))
        return 0;
    *c = (float *)p->dst.data + img * d->stride_n + y * d->stride_y + x * d->stride_x + o0;
    *ldc = d->stride_x;
    return 1;
}

void mk_conv_source_strides_tight(const mk_conv_params *p, int tight, int64_t *a_n, int64_t *a_y,
                                  int64_t *a_x) {
    if (p->src.format == MK_FMT_F32 && !tight) {
        *a_n = p->src.stride_n;
        *a_y = p->src.stride_y;
        *a_x = p->src.stride_x;
    } else {
        *a_x = (int64_t)p->groups * p->cin_g;
        *a_y = *a_x * p->src_w;
        *a_n = *a_y * p->src_h;
    }
}

void mk_conv_source_strides(const mk_conv_params *p, int64_t *a_n, int64_t *a_y, int64_t *a_x) {
    mk_conv_source_strides_tight(p, 0, a_n, a_y, a_x);
}

mk_status mk_conv_source_f32_tight(const mk_conv_params *p, int tight, mk_pool *pool,
                                   const float **a, float **copy, int64_t *a_n, int64_t *a_y,
                                   int64_t *a_x) {
    mk_conv_source_strides_tight(p, tight, a_n, a_y, a_x);
    *copy = NULL;
    if (p->src.format == MK_FMT_F32 && !tight) {
        *a = p->src.data;
        return MK_OK;
    }
    *copy = malloc((size_t)(*a_n * p->n) * sizeof(float));
    if (*copy == NULL) return MK_ENOMEM;
    mk_operand dst = {*copy, MK_FMT_F32, *a_n, *a_y, *a_x, 1};
    mk_extent e = {p->n, p->src_h, p->src_w, (int32_t)*a_x};
    mk_status st = mk_copy(&p->src, &dst, e, pool);
    if (st != MK_OK) {
        free(*copy);
        *copy = NULL;
    }
    *a = *copy;
    return st;
}

mk_status mk_conv_source_f32(const mk_conv_params *p, mk_pool *pool, const float **a, float **copy,
                             int64_t *a_n, int64_t *a_y, int64_t *a_x) {
    return mk_conv_source_f32_tight(p, 0, pool, a, copy, a_n, a_y, a_x);
}
