/* Vector math, neuron and arithmetic microkernels shared by elementwise__avx2.c and
 * elementwise__avx512.c. Not a public header: the including file first defines the vector
 * layer (elementwise_vec__<isa>.h: V / VI / M float vectors, VD / MD double vectors, v_* /
 * m_* / vi_* / vd_* / md_* / vl_* operations, VL lanes; EWN(name) -> name##__isa) and then
 * includes this once. With EW_MATH_ONLY defined only the math is compiled (src/nn uses it).
 *
 * Everything is vectorised; a tail (n % VL elements) runs the same code on a masked load /
 * store, so an element's result never depends on where it falls in a block or chunk.
 *
 * Accuracy (measured against float64 / mpmath references, same on AVX2 and AVX-512):
 *   ew_exp <= 1.02 ulp, ew_log <= 0.93 ulp, ew_expm1 <= 1.5 ulp, tanh <= 2.5 ulp, exhaustive
 *   over all 2^32 inputs (denormal results exact when FTZ is off; the pool runs with
 *   FTZ/DAZ on, which flushes them to 0).
 *   Neurons, max relative error over random bits + dense ranges: SIGMOID 1.7e-7, TANH
 *   2.5e-7, SOFT_PLUS 1.7e-7, SOFT_SIGN 1.2e-7, ELU 1.4e-7, GELU 3.5e-7 (incl. x down to
 *   -13 where the result underflows); LINEAR / HARD_SIGMOID (one fma) and POWER /
 *   EXPONENTIAL / LOGARITHM <= 0.5 ulp: the latter evaluate t = a*x+b, log2 and exp2 in
 *   double and round once, so they have no argument-rounding error at all.
 *   TANH computes b*x in fp32 (tanh's condition number is <= 1: at most 0.5 ulp more);
 *   SOFT_PLUS and GELU carry the rounding error of b*x and x/sqrt(2) into exp, so they keep
 *   their relative accuracy for large |b*x| and down to GELU's underflow.
 */
#ifndef MK_EW_SIMD_TEMPLATE
#define MK_EW_SIMD_TEMPLATE

#define AI static inline __attribute__((always_inline))

/* ---- float math ---------------------------------------------------------------------- */

#define EW_LOG2E 0x1.715476p+0f
#define EW_LN2HI 0x1.63p-1f            /* 0.693359375: n * LN2HI is exact for |n| < 2^15 */
#define EW_LN2LO -0x1.bd0106p-13f      /* ln2 - LN2HI */
#define EW_SIGN -0.0f

AI V v_abs(V x) { return v_andnot(v_set1(EW_SIGN), x); }
AI V v_sign(V x) { return v_and(v_set1(EW_SIGN), x); }

/* e^r - 1 - r = r^2 * P(r) on |r| <= 0.354 (relative error 3.7e-9 of e^r) */
AI V ew_expm1_poly(V r) {
    V r2 = v_mul(r, r);
    V q = v_fma(v_set1(0x1.6a52b2p-10f), r, v_set1(0x1.124486p-7f));
    q = v_fma(q, r, v_set1(0x1.5558bep-5f));
    q = v_fma(q, r, v_set1(0x1.555484p-3f));
    q = v_fma(q, r, v_set1(0x1.fffffcp-2f));
    return v_fma(q, r2, r); /* e^r - 1 */
}

/* 2^n for integer-valued n in [-126, 127] */
AI V ew_pow2i(VI n) { return v_castf(vi_slli(vi_add(n, vi_set1(127)), 23)); }

/* e^(x + lo) with |lo| a rounding error of x (lo is ignored once x over/underflows).
 * Full range: x > 88.72 -> inf, x < -103.97 -> 0, NaN -> NaN. */
AI V ew_exp_lo(V x, V lo) {
    M ok = m_and(m_gt(x, v_set1(-104.0f)), m_lt(x, v_set1(89.0f)));
    lo = v_sel(ok, lo, v_zero());
    x = v_min(v_set1(89.0f), v_max(v_set1(-104.0f), x)); /* this operand order keeps NaN */
    V n = v_round(v_mul(x, v_set1(EW_LOG2E)));
    V r = v_fnma(n, v_set1(EW_LN2HI), x); /* exact */
    r = v_fnma(n, v_set1(EW_LN2LO), r);
    r = v_add(r, lo);
    V e = v_add(ew_expm1_poly(r), v_set1(1.0f));
    VI ni = v_cvt_i(n);                   /* -150 .. 128: scale in two exact steps */
    VI n1 = vi_srai(ni, 1);
    return v_mul(v_mul(e, ew_pow2i(n1)), ew_pow2i(vi_sub(ni, n1)));
}

AI V ew_exp(V x) {
    x = v_min(v_set1(89.0f), v_max(v_set1(-104.0f), x));
    V n = v_round(v_mul(x, v_set1(EW_LOG2E)));
    V r = v_fnma(n, v_set1(EW_LN2HI), x);
    r = v_fnma(n, v_set1(EW_LN2LO), r);
    V e = v_add(ew_expm1_poly(r), v_set1(1.0f));
    VI ni = v_cvt_i(n);
    VI n1 = vi_srai(ni, 1);
    return v_mul(v_mul(e, ew_pow2i(n1)), ew_pow2i(vi_sub(ni, n1)));
}

/* e^x - 1 for x <= 88 (larger x is treated as 88); relative accuracy near 0. */
AI V ew_expm1(V x) {
    x = v_min(v_set1(88.0f), v_max(v_set1(-20.0f), x));
    V n = v_round(v_mul(x, v_set1(EW_LOG2E)));
    V r = v_fnma(n, v_set1(EW_LN2HI), x);
    r = v_fnma(n, v_set1(EW_LN2LO), r);
    V q = ew_expm1_poly(r);
    V s = ew_pow2i(v_cvt_i(n));
    return v_fma(s, q, v_sub(s, v_set1(1.0f))); /* 2^n (e^r - 1) + (2^n - 1) */
}

/* ln(x) for positive normal finite x (no special cases). */
AI V ew_log_core(V x, V ebias) {
    VI t = vi_add(v_casti(x), vi_set1(0x3f800000 - 0x3f3504f3));
    V e = v_add(v_cvti_f(vi_sub(vi_srli(t, 23), vi_set1(127))), ebias);
    V m = v_castf(vi_add(vi_and(t, vi_set1(0x007fffff)), vi_set1(0x3f3504f3))); /* [.707, 1.414) */
    V f = v_sub(m, v_set1(1.0f)); /* exact */
    /* ln(1+f) = f - f^2/2 + f^3 Q(f), relative error 5.8e-9 */
    V q = v_fma(v_set1(-0x1.38ceb4p-4f), f, v_set1(0x1.056016p-3f));
    q = v_fma(q, f, v_set1(-0x1.0d81f6p-3f));
    q = v_fma(q, f, v_set1(0x1.22d8fap-3f));
    q = v_fma(q, f, v_set1(-0x1.54728cp-3f));
    q = v_fma(q, f, v_set1(0x1.99a01ep-3f));
    q = v_fma(q, f, v_set1(-0x1.000226p-2f));
    q = v_fma(q, f, v_set1(0x1.555554p-2f));
    V f2 = v_mul(f, f);
    V y = v_fma(f2, v_fma(f, q, v_set1(-0.5f)), f);
    return v_fma(e, v_set1(EW_LN2HI), v_fma(e, v_set1(EW_LN2LO), y));
}

/* ln(x), full range: denormals, 0 -> -inf, x < 0 -> NaN, inf -> inf, NaN -> NaN. */
AI V ew_log(V x) {
    M den = m_lt(x, v_set1(0x1p-126f));
    V xs = v_sel(den, v_mul(x, v_set1(0x1p23f)), x);
    V r = ew_log_core(xs, v_sel(den, v_set1(-23.0f), v_zero()));
    M ok = m_and(m_gt(x, v_zero()), m_lt(x, v_set1(INFINITY)));
    V sp = v_sel(m_eq(x, v_zero()), v_set1(-INFINITY),
                 v_sel(m_eq(x, v_set1(INFINITY)), x, v_set1(NAN)));
    return v_sel(ok, r, sp);
}

/* ln(1 + e) for 0 <= e <= 1 */
AI V ew_log1p01(V e) {
    V u = v_add(v_set1(1.0f), e);
    V c = v_div(v_sub(e, v_sub(u, v_set1(1.0f))), u); /* rounding error of 1 + e */
    return v_add(ew_log_core(u, v_zero()), c);
}

/* erf(z) = z P(z^2) for |z| < 0.65 (an erf series fit, relative error 5e-8): returns P. */
AI V ew_erf_poly(V z2) {
    V pe = v_fma(v_set1(-0x1.690d1p-9f), z2, v_set1(0x1.e06074p-8f));
    pe = v_fma(pe, z2, v_set1(-0x1.c539acp-6f));
    pe = v_fma(pe, z2, v_set1(0x1.ceafb4p-4f));
    pe = v_fma(pe, z2, v_set1(-0x1.812904p-2f));
    return v_fma(pe, z2, v_set1(0x1.20dd76p+0f));
}

/* erfc(y) e^(y^2) / 2 for 0.65 <= y <= 12: t Q(t) / 2, t = 2/(2+y) (fit, rel. error 1.3e-10) */
AI V ew_erfc_scaled(V y) {
    V t = v_div(v_set1(2.0f), v_add(v_set1(2.0f), y));
    V q = v_fma(v_set1(0x1.fe850ep-5f), t, v_set1(-0x1.4eeab4p-2f));
    q = v_fma(q, t, v_set1(0x1.5fad5ep-1f));
    q = v_fma(q, t, v_set1(-0x1.5e7b34p-1f));
    q = v_fma(q, t, v_set1(0x1.362d14p-2f));
    q = v_fma(q, t, v_set1(-0x1.22689cp-3f));
    q = v_fma(q, t, v_set1(0x1.ea0d8cp-4f));
    q = v_fma(q, t, v_set1(0x1.5c1902p-3f));
    q = v_fma(q, t, v_set1(0x1.fafefcp-3f));
    q = v_fma(q, t, v_set1(0x1.20d0d6p-2f));
    q = v_fma(q, t, v_set1(0x1.20ddd4p-2f));
    return v_mul(v_mul(v_set1(0.5f), t), q);
}

/* erf(z): z P(z^2) below 0.65, else sign(z) (1 - erfc(|z|)) with e^(-z^2) from z^2 in
 * double-float; +-inf -> +-1, NaN -> NaN. */
AI V ew_erf(V z) {
    V small = v_mul(z, ew_erf_poly(v_mul(z, z)));
    V y = v_min(v_set1(12.0f), v_abs(z));
    V sh = v_mul(y, y);
    V E = ew_exp_lo(v_xor(sh, v_set1(EW_SIGN)), v_xor(v_fms(y, y, sh), v_set1(EW_SIGN)));
    V h = ew_erfc_scaled(y);
    V large = v_fnma(v_add(h, h), E, v_set1(1.0f));
    return v_sel(m_lt(v_abs(z), v_set1(0.65f)), small, v_or(large, v_sign(z)));
}

/* ---- double math (POWER / EXPONENTIAL / LOGARITHM) ------------------------------------ */

/* log2(t) for positive normal finite double t; relative error ~1e-14. */
AI VD ewd_log2_core(VD t) {
    VI u = vl_add(vd_casti(t), vl_set1(0x3ff0000000000000LL - 0x3fe6a09e667f3bcdLL));
    VI eb = vl_srli(u, 52); /* biased exponent of the reduced argument */
    VD m = vd_castf(vl_add(vl_and(u, vl_set1(0x000fffffffffffffLL)), vl_set1(0x3fe6a09e667f3bcdLL)));
    VD e = vd_sub(vd_castf(vl_or(eb, vl_set1(0x4330000000000000LL))), vd_set1(0x1p52 + 1023.0));
    VD f = vd_sub(m, vd_set1(1.0));
    VD s = vd_div(f, vd_add(vd_set1(2.0), f)); /* |s| <= 0.1716, ln(m) = 2 atanh(s) */
    VD s2 = vd_mul(s, s);
    VD p = vd_set1(1.0 / 17);
    p = vd_fma(p, s2, vd_set1(1.0 / 15));
    p = vd_fma(p, s2, vd_set1(1.0 / 13));
    p = vd_fma(p, s2, vd_set1(1.0 / 11));
    p = vd_fma(p, s2, vd_set1(1.0 / 9));
    p = vd_fma(p, s2, vd_set1(1.0 / 7));
    p = vd_fma(p, s2, vd_set1(1.0 / 5));
    p = vd_fma(p, s2, vd_set1(1.0 / 3));
    VD s_2 = vd_add(s, s);
    VD ln = vd_fma(vd_mul(s_2, s2), p, s_2);
    return vd_fma(ln, vd_set1(1.4426950408889634074), e);
}

/* log2(t) with the special cases: 0 -> -inf, t < 0 -> NaN, inf -> inf, NaN -> NaN */
AI VD ewd_log2(VD t) {
    MD ok = md_and(md_gt(t, vd_set1(0.0)), md_lt(t, vd_set1(INFINITY)));
    VD r = ewd_log2_core(vd_sel(ok, t, vd_set1(1.0)));
    VD sp = vd_sel(md_eq(t, vd_set1(0.0)), vd_set1(-INFINITY),
                   vd_sel(md_eq(t, vd_set1(INFINITY)), t, vd_set1(NAN)));
    return vd_sel(ok, r, sp);
}

/* 2^y in double, |y| clamped to 200 (enough for a float result); relative error ~1e-15. */
AI VD ewd_exp2(VD y) {
    y = vd_min(vd_set1(200.0), vd_max(vd_set1(-200.0), y));
    VD n = vd_round(y);
    VD u = vd_mul(vd_sub(y, n), vd_set1(0.69314718055994530942));
    VD p = vd_set1(1.0 / 479001600.0); /* e^u, Taylor to u^12 on |u| <= 0.347 */
    p = vd_fma(p, u, vd_set1(1.0 / 39916800.0));
    p = vd_fma(p, u, vd_set1(1.0 / 3628800.0));
    p = vd_fma(p, u, vd_set1(1.0 / 362880.0));
    p = vd_fma(p, u, vd_set1(1.0 / 40320.0));
    p = vd_fma(p, u, vd_set1(1.0 / 5040.0));
    p = vd_fma(p, u, vd_set1(1.0 / 720.0));
    p = vd_fma(p, u, vd_set1(1.0 / 120.0));
    p = vd_fma(p, u, vd_set1(1.0 / 24.0));
    p = vd_fma(p, u, vd_set1(1.0 / 6.0));
    p = vd_fma(p, u, vd_set1(0.5));
    p = vd_fma(p, u, vd_set1(1.0));
    p = vd_fma(p, u, vd_set1(1.0));
    VI k = vd_casti(vd_add(n, vd_set1(0x1.8p52))); /* n in the low bits */
    VD sc = vd_castf(vl_slli(vl_add(k, vl_set1(1023)), 52));
    return vd_mul(p, sc);
}

#ifndef EW_MATH_ONLY /* the loops, neurons and arithmetic (elementwise only) */

/* ---- the loops ---------------------------------------------------------------------- */

/* y[i] = EXPR(v) where v is the vector of x; `s` is the matching slope vector if SL. */
/* The single-vector loop and the masked tail, continuing from index i_. */
#define EW_UNARY_REST(EXPR)                                                              \
    for (; i_ + VL <= n; i_ += VL) {                                                     \
        V v = v_load(x + i_);                                                            \
        v_store(y + i_, (EXPR));                                                         \
    }                                                                                    \
    if (i_ < n) {                                                                        \
        int r_ = (int)(n - i_);                                                          \
        V v = v_load_n(x + i_, r_);                                                      \
        v_store_n(y + i_, (EXPR), r_);                                                   \
    }

#define EW_UNARY_LOOP(EXPR)                                                              \
    do {                                                                                 \
        int64_t i_ = 0;                                                                  \
        EW_UNARY_REST(EXPR)                                                              \
    } while (0)

/* Two vectors per iteration (cheap neurons: more loads in flight), then the same rest. */
#define EW_UNARY_LOOP2(EXPR)                                                             \
    do {                                                                                 \
        int64_t i_ = 0;                                                                  \
        for (; i_ + 2 * VL <= n; i_ += 2 * VL) {                                         \
            V v = v_load(x + i_);                                                        \
            V w_ = v_load(x + i_ + VL);                                                  \
            v_store(y + i_, (EXPR));                                                     \
            v = w_;                                                                      \
            v_store(y + i_ + VL, (EXPR));                                                \
        }                                                                                \
        EW_UNARY_REST(EXPR)                                                              \
    } while (0)

#define EW_NEURON(NAME) \
    static void EWN(neuron_##NAME)(const mk_ew_neuron *p, const float *x, float *y, int64_t n, \
                                   const float *slope)

EW_NEURON(none) {
    (void)p; (void)slope;
    if (x != y) memmove(y, x, (size_t)n * sizeof(float));
}

EW_NEURON(relu) {
    (void)slope;
    const V a = v_set1(p->a), z = v_zero();
    EW_UNARY_LOOP2(v_sel(m_ge(v, z), v, v_mul(a, v)));
}

EW_NEURON(linear) {
    (void)slope;
    const V a = v_set1(p->a), b = v_set1(p->b);
    EW_UNARY_LOOP2(v_fma(a, v, b));
}

AI V ew_sigmoid(V x) {
    V e = ew_exp(v_xor(v_abs(x), v_set1(EW_SIGN))); /* e^-|x| */
    V num = v_sel(m_ge(x, v_zero()), v_set1(1.0f), e);
    return v_div(num, v_add(v_set1(1.0f), e));
}
EW_NEURON(sigmoid) {
    (void)p; (void)slope;
    EW_UNARY_LOOP(ew_sigmoid(v));
}

EW_NEURON(hard_sigmoid) {
    (void)slope;
    const V a = v_set1(p->a), b = v_set1(p->b), z = v_zero(), one = v_set1(1.0f);
    EW_UNARY_LOOP2(v_min(one, v_max(z, v_fma(a, v, b))));
}

/* tanh(t) = -u / (u + 2), u = e^(-2|t|) - 1, sign of t: no cancellation anywhere; for
 * |t| < 0.17 u is the polynomial itself. */
AI V ew_tanh(V t) {
    V at = v_abs(t);
    V u = ew_expm1(v_mul(v_set1(-2.0f), at));
    V r = v_div(v_xor(u, v_set1(EW_SIGN)), v_add(u, v_set1(2.0f)));
    return v_or(r, v_sign(t));
}
EW_NEURON(tanh) {
    (void)slope;
    const V a = v_set1(p->a), b = v_set1(p->b);
    EW_UNARY_LOOP(v_mul(a, ew_tanh(v_mul(b, v))));
}

EW_NEURON(absolute) {
    (void)p; (void)slope;
    EW_UNARY_LOOP2(v_abs(v));
}

/* a * (max(t,0) + log1p(e^-|t|)), t = b*x carried as t + tl (tl: rounding error of b*x). */
AI V ew_soft_plus(V a, V b, V x) {
    V t = v_mul(b, x);
    V tl = v_fms(b, x, t);
    V at = v_abs(t);
    tl = v_sel(m_lt(at, v_set1(INFINITY)), tl, v_zero());
    V stl = v_xor(tl, v_sign(t));                              /* sign(t) * tl */
    V e = ew_exp_lo(v_xor(at, v_set1(EW_SIGN)), v_xor(stl, v_set1(EW_SIGN))); /* e^-|t+tl| */
    V l = ew_log1p01(e);
    V m = v_max(v_zero(), t);                                  /* NaN stays */
    V tp = v_sel(m_gt(t, v_zero()), tl, v_zero());
    V r = v_mul(a, v_add(m, v_add(l, tp)));
    /* b*x overflowed but a*b*x may not: softplus(t) = t there */
    M big = m_and(m_eq(t, v_set1(INFINITY)), m_lt(v_abs(x), v_set1(INFINITY)));
    return v_sel(big, v_mul(v_mul(a, b), x), r);
}
EW_NEURON(soft_plus) {
    (void)slope;
    const V a = v_set1(p->a), b = v_set1(p->b);
    EW_UNARY_LOOP(ew_soft_plus(a, b, v));
}

/* x / (1 + |x|); +-inf -> +-1 (the limit rather than inf/inf) */
AI V ew_soft_sign(V x) {
    V ax = v_abs(x);
    V r = v_div(x, v_add(v_set1(1.0f), ax));
    return v_sel(m_eq(ax, v_set1(INFINITY)), v_or(v_set1(1.0f), v_sign(x)), r);
}
EW_NEURON(soft_sign) {
    (void)p; (void)slope;
    EW_UNARY_LOOP2(ew_soft_sign(v));
}

EW_NEURON(elu) {
    (void)slope;
    const V a = v_set1(p->a), z = v_zero();
    EW_UNARY_LOOP(v_sel(m_ge(v, z), v, v_mul(a, ew_expm1(v))));
}

EW_NEURON(prelu) {
    (void)p;
    const V z = v_zero();
    int64_t i_ = 0;
    for (; i_ + VL <= n; i_ += VL) {
        V v = v_load(x + i_), s = v_load(slope + i_);
        v_store(y + i_, v_sel(m_ge(v, z), v, v_mul(s, v)));
    }
    if (i_ < n) {
        int r_ = (int)(n - i_);
        V v = v_load_n(x + i_, r_), s = v_load_n(slope + i_, r_);
        v_store_n(y + i_, v_sel(m_ge(v, z), v, v_mul(s, v)), r_);
    }
}

EW_NEURON(relun) {
    (void)slope;
    const V a = v_set1(p->a), b = v_set1(p->b), z = v_zero();
    EW_UNARY_LOOP2(v_min(b, v_sel(m_ge(v, z), v, v_mul(a, v))));
}

/* Double-precision neurons: each half of the float vector goes through a VD. */
AI VD ewd_power(VD x, VD a, VD b, VD c, int c_int, int c_odd) {
    VD t = vd_fma(a, x, b); /* a*x is exact in double: one rounding */
    VD r = ewd_exp2(vd_mul(c, ewd_log2(vd_andnot(vd_set1(-0.0), t))));
    if (c_odd) r = vd_xor(r, vd_and(t, vd_set1(-0.0))); /* negative base, odd c */
    if (!c_int) /* finite negative base, non-integer c: NaN (-inf^c is +inf or +0) */
        r = vd_sel(md_and(md_lt(t, vd_set1(0.0)), md_gt(t, vd_set1(-INFINITY))), vd_set1(NAN), r);
    return r;
}
AI V ew_power(V x, VD a, VD b, VD c, int c_int, int c_odd) {
    VD lo, hi;
    v_split_d(x, &lo, &hi);
    return v_join_d(ewd_power(lo, a, b, c, c_int, c_odd), ewd_power(hi, a, b, c, c_int, c_odd));
}
EW_NEURON(power) {
    (void)slope;
    const VD a = vd_set1(p->a), b = vd_set1(p->b), c = vd_set1(p->c);
    const int c_int = p->c_int, c_odd = p->c_odd;
    EW_UNARY_LOOP(ew_power(v, a, b, c, c_int, c_odd));
}

AI V ew_exponential(V x, VD a, VD b, VD l2c) {
    VD lo, hi;
    v_split_d(x, &lo, &hi);
    return v_join_d(ewd_exp2(vd_mul(vd_fma(a, lo, b), l2c)),
                    ewd_exp2(vd_mul(vd_fma(a, hi, b), l2c)));
}
EW_NEURON(exponential) {
    (void)slope;
    const VD a = vd_set1(p->a), b = vd_set1(p->b), l2c = vd_set1(p->log2c);
    EW_UNARY_LOOP(ew_exponential(v, a, b, l2c));
}

AI V ew_logarithm(V x, VD a, VD b, VD il) {
    VD lo, hi;
    v_split_d(x, &lo, &hi);
    return v_join_d(vd_mul(ewd_log2(vd_fma(a, lo, b)), il),
                    vd_mul(ewd_log2(vd_fma(a, hi, b)), il));
}
EW_NEURON(logarithm) {
    (void)slope;
    const VD a = vd_set1(p->a), b = vd_set1(p->b), il = vd_set1(p->inv_log2c);
    EW_UNARY_LOOP(ew_logarithm(v, a, b, il));
}

/* GELU(x) = x * Phi(x), Phi = erfc(-z)/2, z = x/sqrt2 carried as zh + zl.
 * |z| < 0.65: Phi = 1/2 + z P(z^2)/2 (ew_erf_poly). |z| >= 0.65: erfc(|z|) through
 * ew_erfc_scaled, with z^2 in double-float so that the relative error stays ~1e-7 down to
 * the underflow of the result (x ~ -13); x < 0: x * erfc/2, x > 0: x - x * erfc/2.
 * -inf -> -0, inf -> inf. */
AI V ew_gelu(V x) {
    V zh = v_mul(x, v_set1(0x1.6a09e6p-1f));
    V zl = v_fma(x, v_set1(0x1.9fcef4p-27f), v_fms(x, v_set1(0x1.6a09e6p-1f), zh));
    V pe = ew_erf_poly(v_mul(zh, zh));
    V small = v_mul(x, v_fma(v_mul(v_set1(0.5f), zh), pe, v_set1(0.5f)));

    V y = v_min(v_set1(12.0f), v_abs(zh));
    V yl = v_xor(zl, v_sign(zh));
    V h = ew_erfc_scaled(y); /* erfc(y) e^(y^2) / 2 */
    V sh = v_mul(y, y);
    V sl = v_fma(v_add(y, y), yl, v_fms(y, y, sh));
    V E = ew_exp_lo(v_xor(sh, v_set1(EW_SIGN)), v_xor(sl, v_set1(EW_SIGN)));
    V w = v_mul(v_mul(x, h), E);
    V large = v_sel(m_lt(x, v_zero()), w, v_sub(x, w));
    V r = v_sel(m_lt(v_abs(zh), v_set1(0.65f)), small, large);
    return v_sel(m_eq(v_abs(x), v_set1(INFINITY)), v_max(x, v_set1(-0.0f)), r);
}
EW_NEURON(gelu) {
    (void)p; (void)slope;
    EW_UNARY_LOOP(ew_gelu(v));
}

/* ---- arithmetic ---------------------------------------------------------------------- */

/* r = clamp((ps*a) OP (ss*b) + bias, lo, hi): max(lo, r) then min(hi, r), NaN stays NaN;
 * no FMA contraction, so the result is bit-identical to the generic path. */
#define EW_ARITH(NAME, VOP)                                                              \
    static void EWN(arith_##NAME)(const mk_ew_arith *p, const float *a, int a_bc,        \
                                  const float *b, int b_bc, float *y, int64_t n) {       \
        const V ps = v_set1(p->ps), ss = v_set1(p->ss), bias = v_set1(p->bias);          \
        const V lo = v_set1(p->lo), hi = v_set1(p->hi);                                  \
        const V ca = v_set1(a[0]), cb = v_set1(b[0]);                                    \
        int64_t i = 0;                                                                   \
        if (!a_bc && !b_bc) {                                                            \
            for (; i + VL <= n; i += VL) {                                               \
                V r = VOP(v_mul(ps, v_load(a + i)), v_mul(ss, v_load(b + i)));           \
                v_store(y + i, v_min(hi, v_max(lo, v_add(r, bias))));                    \
            }                                                                            \
            if (i < n) {                                                                 \
                int k = (int)(n - i);                                                    \
                V r = VOP(v_mul(ps, v_load_n(a + i, k)), v_mul(ss, v_load_n(b + i, k))); \
                v_store_n(y + i, v_min(hi, v_max(lo, v_add(r, bias))), k);               \
            }                                                                            \
        } else if (b_bc && !a_bc) {                                                      \
            const V sb = v_mul(ss, cb);                                                  \
            for (; i + VL <= n; i += VL) {                                               \
                V r = VOP(v_mul(ps, v_load(a + i)), sb);                                 \
                v_store(y + i, v_min(hi, v_max(lo, v_add(r, bias))));                    \
            }                                                                            \
            if (i < n) {                                                                 \
                int k = (int)(n - i);                                                    \
                V r = VOP(v_mul(ps, v_load_n(a + i, k)), sb);                            \
                v_store_n(y + i, v_min(hi, v_max(lo, v_add(r, bias))), k);               \
            }                                                                            \
        } else {                                                                         \
            const V sa = v_mul(ps, ca);                                                  \
            for (; i + VL <= n; i += VL) {                                               \
                V vb = b_bc ? cb : v_load(b + i);                                        \
                V r = VOP(sa, v_mul(ss, vb));                                            \
                v_store(y + i, v_min(hi, v_max(lo, v_add(r, bias))));                    \
            }                                                                            \
            if (i < n) {                                                                 \
                int k = (int)(n - i);                                                    \
                V vb = b_bc ? cb : v_load_n(b + i, k);                                   \
                V r = VOP(sa, v_mul(ss, vb));                                            \
                v_store_n(y + i, v_min(hi, v_max(lo, v_add(r, bias))), k);               \
            }                                                                            \
        }                                                                                \
    }
EW_ARITH(add, v_add)
EW_ARITH(sub, v_sub)
EW_ARITH(mul, v_mul)
EW_ARITH(div, v_div)

#define EW_TABLE_NEURONS                                                                 \
    {EWN(neuron_none), EWN(neuron_relu), EWN(neuron_linear), EWN(neuron_sigmoid),        \
     EWN(neuron_hard_sigmoid), EWN(neuron_tanh), EWN(neuron_absolute),                   \
     EWN(neuron_soft_plus), EWN(neuron_soft_sign), EWN(neuron_elu), EWN(neuron_prelu),   \
     EWN(neuron_relun), EWN(neuron_power), EWN(neuron_exponential), EWN(neuron_logarithm), \
     EWN(neuron_gelu)}
#define EW_TABLE_ARITH {EWN(arith_add), EWN(arith_sub), EWN(arith_mul), EWN(arith_div)}

#endif /* EW_MATH_ONLY */
#endif
