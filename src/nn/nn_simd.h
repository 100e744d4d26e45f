/* The nn family's row and resize loops for the vector ISAs. Not a public header: nn__avx2.c
 * and nn__avx512.c first define the vector layer (elementwise_vec__<isa>.h), include the
 * elementwise math (elementwise_simd.h with EW_MATH_ONLY: ew_exp, ew_erf), define v_hsum /
 * v_hmax (horizontal sum / max) and NNN(name) -> name##__isa, then include this once.
 *
 * A row's partial last vector is loaded from a VL-element copy padded with a neutral value
 * (-inf for max and exp, the mean for squared deviations, 0 for sums) and stored masked, so
 * the same vector code covers it. Sums run in VL lanes, then one horizontal sum. */
#ifndef MK_NN_SIMD_TEMPLATE
#define MK_NN_SIMD_TEMPLATE

static inline V nn_load_tail(const float *x, int r, float fill) {
    float buf[VL];
    for (int i = 0; i < VL; i++) buf[i] = i < r ? x[i] : fill;
    return v_load(buf);
}

static void NNN(softmax)(const float *x, float *y, int64_t n) {
    const int r = (int)(n % VL);
    const int64_t full = n - r;
    V m = v_set1(-INFINITY);
    for (int64_t i = 0; i < full; i += VL) m = v_max(m, v_load(x + i));
    if (r) m = v_max(m, nn_load_tail(x + full, r, -INFINITY));
    const V mx = v_set1(v_hmax(m));
    V s = v_zero();
    for (int64_t i = 0; i < full; i += VL) {
        V e = ew_exp(v_sub(v_load(x + i), mx));
        v_store(y + i, e);
        s = v_add(s, e);
    }
    if (r) {   /* padded lanes: e^-inf = 0 */
        V e = ew_exp(v_sub(nn_load_tail(x + full, r, -INFINITY), mx));
        v_store_n(y + full, e, r);
        s = v_add(s, e);
    }
    const V inv = v_set1(1.0f / v_hsum(s));
    for (int64_t i = 0; i < full; i += VL) v_store(y + i, v_mul(v_load(y + i), inv));
    if (r) v_store_n(y + full, v_mul(v_load_n(y + full, r), inv), r);
}

static void NNN(layer_norm)(const float *x, float *y, int64_t n, float epsilon, const float *scale,
                            const float *bias, float *mean_out, float *inv_std_out) {
    const int r = (int)(n % VL);
    const int64_t full = n - r;
    V s = v_zero();
    for (int64_t i = 0; i < full; i += VL) s = v_add(s, v_load(x + i));
    if (r) s = v_add(s, nn_load_tail(x + full, r, 0.0f));
    const float mean = v_hsum(s) / (float)n;
    const V mv = v_set1(mean);
    V q = v_zero();
    for (int64_t i = 0; i < full; i += VL) {
        V d = v_sub(v_load(x + i), mv);
        q = v_fma(d, d, q);
    }
    if (r) {
        V d = v_sub(nn_load_tail(x + full, r, mean), mv);
        q = v_fma(d, d, q);
    }
    const float inv_std = 1.0f / sqrtf(v_hsum(q) / (float)n + epsilon);
    *mean_out = mean;
    *inv_std_out = inv_std;
    if (y == NULL) return;
    const V iv = v_set1(inv_std), one = v_set1(1.0f), zero = v_zero();
    for (int64_t i = 0; i < n; i += VL) {
        const int k = n - i < VL ? (int)(n - i) : VL;
        V d = v_mul(v_sub(k == VL ? v_load(x + i) : v_load_n(x + i, k), mv), iv);
        V g = scale == NULL ? one : k == VL ? v_load(scale + i) : v_load_n(scale + i, k);
        V b = bias == NULL ? zero : k == VL ? v_load(bias + i) : v_load_n(bias + i, k);
        d = v_fma(d, g, b);
        if (k == VL) v_store(y + i, d);
        else v_store_n(y + i, d, k);
    }
}

/* x / (1 + e^(-2u)), 2u = 2 sqrt(2/pi) (x + 0.044715 x^3): GELU's tanh form without the
 * cancellation of 1 + tanh(u) for negative x. */
static inline V nn_gelu_tanh(V x) {
    V u2 = v_mul(x, v_fma(v_set1(0x1.2444f2p-4f), v_mul(x, x), v_set1(0x1.988454p+0f)));
    return v_div(x, v_add(v_set1(1.0f), ew_exp(v_xor(u2, v_set1(EW_SIGN)))));
}

#define NN_UNARY_LOOP(EXPR)                                                                \
    do {                                                                                   \
        int64_t i_ = 0;                                                                    \
        for (; i_ + VL <= n; i_ += VL) {                                                   \
            V v = v_load(x + i_);                                                          \
            v_store(y + i_, (EXPR));                                                       \
        }                                                                                  \
        if (i_ < n) {                                                                      \
            V v = v_load_n(x + i_, (int)(n - i_));                                         \
            v_store_n(y + i_, (EXPR), (int)(n - i_));                                      \
        }                                                                                  \
    } while (0)

static void NNN(unary)(int op, const float *x, float *y, int64_t n) {
    if (op == MK_NN_ERF) {
        NN_UNARY_LOOP(ew_erf(v));
    } else if (op == MK_NN_HARD_SWISH) {
        /* (x + 3) / 6 rather than x / 6 + 1/2: no cancellation near x = -3 */
        const V three = v_set1(3.0f), sixth = v_set1(1.0f / 6.0f), one = v_set1(1.0f), z = v_zero();
        NN_UNARY_LOOP(v_mul(v, v_min(one, v_max(z, v_mul(v_add(v, three), sixth)))));
    } else {
        NN_UNARY_LOOP(nn_gelu_tanh(v));
    }
}

static void NNN(resize_row)(const mk_nn_resize_row *a) {
    const int32_t c = a->c;
    const int r = c % VL;
    const V wy = v_set1(a->wy);
    for (int32_t x = 0; x < a->out_w; x++) {
        const float *p00 = a->r0 + a->x0[x] * a->sx, *p01 = a->r0 + a->x1[x] * a->sx;
        const float *p10 = a->r1 + a->x0[x] * a->sx, *p11 = a->r1 + a->x1[x] * a->sx;
        const V wx = v_set1(a->wx[x]);
        float *o = a->dst + x * a->dx;
        int32_t k = 0;
        for (; k + VL <= c; k += VL) {
            V t0 = v_load(p00 + k), b0 = v_load(p10 + k);
            V top = v_fma(wx, v_sub(v_load(p01 + k), t0), t0);
            V bottom = v_fma(wx, v_sub(v_load(p11 + k), b0), b0);
            v_store(o + k, v_fma(wy, v_sub(bottom, top), top));
        }
        if (r) {
            V t0 = v_load_n(p00 + k, r), b0 = v_load_n(p10 + k, r);
            V top = v_fma(wx, v_sub(v_load_n(p01 + k, r), t0), t0);
            V bottom = v_fma(wx, v_sub(v_load_n(p11 + k, r), b0), b0);
            v_store_n(o + k, v_fma(wy, v_sub(bottom, top), top), r);
        }
    }
}

#define NN_TABLE(ISA_NAME) \
    {ISA_NAME, NNN(softmax), NNN(layer_norm), NNN(unary), NNN(resize_row)}

#endif
