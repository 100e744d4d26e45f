/* Winograd F(4,3) input and output transforms, vectorised across channels. Compiled once per
 * ISA (conv_kernels.h). Points 0, +-1, +-2, infinity:
 *   B^T rows: [4 0 -5 0 1 0] [0 -4 -4 1 1 0] [0 4 -4 -1 1 0] [0 -2 -1 2 1 0] [0 2 -1 -2 1 0]
 *             [0 4 0 -5 0 1]
 *   A^T rows: [1 1 1 1 1 0] [0 1 -1 2 -2 0] [0 1 1 4 4 0] [0 1 -1 8 -8 1] */
#include "conv/conv_kernels.h"

/* the 6 B^T combinations of d[0], d[s], ..., d[5s] */
static inline __attribute__((always_inline)) void bt6(const ck_v *d, int s, ck_v *r, int rs) {
    const ck_v four = ck_set1(4.0f), m5 = ck_set1(-5.0f), two = ck_set1(2.0f), m4 = ck_set1(-4.0f);
    const ck_v a = ck_fma(m4, d[2 * s], d[4 * s]), b = ck_fma(m4, d[1 * s], d[3 * s]);
    const ck_v c = d[4 * s] - d[2 * s], e = two * (d[3 * s] - d[1 * s]);
    r[0] = ck_fma(four, d[0], ck_fma(m5, d[2 * s], d[4 * s]));
    r[1 * rs] = a + b;
    r[2 * rs] = a - b;
    r[3 * rs] = c + e;
    r[4 * rs] = c - e;
    r[5 * rs] = ck_fma(four, d[1 * s], ck_fma(m5, d[3 * s], d[5 * s]));
}

static inline __attribute__((always_inline)) void in_vec(const float *const *px, int64_t c,
                                                         int n, float *v, int64_t v_xi) {
    ck_v d[36], t[36];
    for (int k = 0; k < 36; k++)
        d[k] = px[k] == NULL ? ck_set1(0.0f) : n ? ck_loadn(px[k] + c, n) : ck_load(px[k] + c);
    for (int j = 0; j < 6; j++) bt6(d + j, 6, t + j, 6);    /* columns: t = B^T d */
    for (int i = 0; i < 6; i++) bt6(t + 6 * i, 1, d + 6 * i, 1);   /* rows: (B^T d) B */
    for (int k = 0; k < 36; k++) {
        if (n) ck_storen(v + k * v_xi + c, d[k], n);
        else ck_store(v + k * v_xi + c, d[k]);
    }
}

void CK_NAME(ck_wino_in)(const float *const *px, int64_t cin, float *v, int64_t v_xi) {
    int64_t c = 0;
    for (; c + CK_VL <= cin; c += CK_VL) in_vec(px, c, 0, v, v_xi);
    if (c < cin) in_vec(px, c, (int)(cin - c), v, v_xi);
}

/* the 4 A^T combinations of m[0], m[s], ..., m[5s] */
static inline __attribute__((always_inline)) void at4(const ck_v *m, int s, ck_v *o, int os) {
    const ck_v s12 = m[1 * s] + m[2 * s], d12 = m[1 * s] - m[2 * s];
    const ck_v s34 = m[3 * s] + m[4 * s], d34 = m[3 * s] - m[4 * s];
    o[0] = m[0] + s12 + s34;
    o[1 * os] = ck_fma(ck_set1(2.0f), d34, d12);
    o[2 * os] = ck_fma(ck_set1(4.0f), s34, s12);
    o[3 * os] = ck_fma(ck_set1(8.0f), d34, d12 + m[5 * s]);
}

static inline __attribute__((always_inline)) void out_vec(const float *m, int64_t m_xi, int64_t c,
                                                          int n, const float *bias,
                                                          float *const *out, int acc, ck_v lo,
                                                          ck_v hi) {
    ck_v d[36], t[24];
    for (int k = 0; k < 36; k++) d[k] = n ? ck_loadn(m + k * m_xi + c, n) : ck_load(m + k * m_xi + c);
    for (int j = 0; j < 6; j++) at4(d + j, 6, t + j, 6);        /* t (4x6) = A^T M */
    const ck_v b = n ? ck_loadn(bias + c, n) : ck_load(bias + c);
    for (int i = 0; i < 4; i++) {
        ck_v o[4];
        at4(t + 6 * i, 1, o, 1);                                  /* (A^T M) A */
        for (int j = 0; j < 4; j++) {
            float *dst = out[i * 4 + j];
            if (dst == NULL) continue;
            ck_v y = o[j] + b;
            if (acc) y += n ? ck_loadn(dst + c, n) : ck_load(dst + c);
            y = ck_clamp(y, lo, hi);
            if (n) ck_storen(dst + c, y, n);
            else ck_store(dst + c, y);
        }
    }
}

void CK_NAME(ck_wino_out)(const float *m, int64_t m_xi, int64_t cout, const float *bias,
                          float *const *out, int acc, float lo, float hi) {
    const ck_v vlo = ck_set1(lo), vhi = ck_set1(hi);
    int64_t c = 0;
    for (; c + CK_VL <= cout; c += CK_VL) out_vec(m, m_xi, c, 0, bias, out, acc, vlo, vhi);
    if (c < cout) out_vec(m, m_xi, c, (int)(cout - c), bias, out, acc, vlo, vhi);
}
