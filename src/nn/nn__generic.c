/* Portable nn loops (no ISA flags; any architecture): sums and transcendental functions in
 * double with libm, rounded once to float, so this path is also the accuracy reference of
 * the vector paths. */
#include <math.h>

#include "nn.h"

static void softmax__generic(const float *x, float *y, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += exp((double)x[i] - m);
    for (int64_t i = 0; i < n; i++) y[i] = (float)(exp((double)x[i] - m) / s);
}

static void layer_norm__generic(const float *x, float *y, int64_t n, float epsilon,
                                const float *scale, const float *bias, float *mean_out,
                                float *inv_std_out) {
    double s = 0.0, q = 0.0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    const double mean = s / (double)n;
    for (int64_t i = 0; i < n; i++) q += (x[i] - mean) * (x[i] - mean);
    const double inv_std = 1.0 / sqrt(q / (double)n + epsilon);
    *mean_out = (float)mean;
    *inv_std_out = (float)inv_std;
    if (y == NULL) return;
    for (int64_t i = 0; i < n; i++)
        y[i] = (float)((x[i] - mean) * inv_std * (scale ? scale[i] : 1.0f) + (bias ? bias[i] : 0.0f));
}

static void unary__generic(int op, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const double v = x[i];
        if (op == MK_NN_ERF) {
            y[i] = (float)erf(v);
        } else if (op == MK_NN_HARD_SWISH) {
            const double t = (v + 3.0) / 6.0;
            y[i] = (float)(v * (t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t));
        } else {
            /* x/2 (1 + tanh u) = x / (1 + e^(-2u)): no cancellation for negative x */
            y[i] = (float)(v / (1.0 + exp(-1.5957691216057308 * (v + 0.044715 * v * v * v))));
        }
    }
}

static void resize_row__generic(const mk_nn_resize_row *a) {
    for (int32_t x = 0; x < a->out_w; x++) {
        const float *p00 = a->r0 + a->x0[x] * a->sx, *p01 = a->r0 + a->x1[x] * a->sx;
        const float *p10 = a->r1 + a->x0[x] * a->sx, *p11 = a->r1 + a->x1[x] * a->sx;
        const float wx = a->wx[x], wy = a->wy;
        float *o = a->dst + x * a->dx;
        for (int32_t k = 0; k < a->c; k++) {
            const float top = p00[k] + wx * (p01[k] - p00[k]);
            const float bottom = p10[k] + wx * (p11[k] - p10[k]);
            o[k] = top + wy * (bottom - top);
        }
    }
}

const mk_nn_kernels mk_nn_kernels__generic = {
    "nn__generic", softmax__generic, layer_norm__generic, unary__generic, resize_row__generic,
};
