/* Portable reduction microkernels (no ISA flags; any architecture): the 16 logical lanes are
 * an array, the strided kernel works one float at a time. Same operation order as the SIMD
 * paths (reduce_simd.h), so the results are bitwise identical to them. */
#include <math.h>

#include "reduce.h"

#define RDN(name) name##__generic
#define VL 1

typedef struct { float v[16]; } L;
typedef float V;

static inline float rd_min1(float a, float b) { return a != a ? a : (a < b ? a : b); }
static inline float rd_max1(float a, float b) { return a != a ? a : (a > b ? a : b); }

#define L_LANEWISE(NAME, EXPR)                                                           \
    static inline L NAME(L a, L b) {                                                     \
        L r;                                                                             \
        for (int k = 0; k < 16; k++) r.v[k] = EXPR;                                      \
        return r;                                                                        \
    }
L_LANEWISE(l_add, a.v[k] + b.v[k])
L_LANEWISE(l_mul, a.v[k] * b.v[k])
L_LANEWISE(l_min, rd_min1(a.v[k], b.v[k]))
L_LANEWISE(l_max, rd_max1(a.v[k], b.v[k]))

static inline L l_load(const float *p) {
    L r;
    for (int k = 0; k < 16; k++) r.v[k] = p[k];
    return r;
}
static inline L l_load_n(const float *p, int n, float fill) {
    L r;
    for (int k = 0; k < 16; k++) r.v[k] = k < n ? p[k] : fill;
    return r;
}
static inline L l_ne0(L a) {
    L r;
    for (int k = 0; k < 16; k++) r.v[k] = a.v[k] != 0.0f ? 1.0f : 0.0f;
    return r;
}
static inline L l_set1(float x) {
    L r;
    for (int k = 0; k < 16; k++) r.v[k] = x;
    return r;
}
static inline unsigned l_eqmask(L v, L m) {
    unsigned k = 0;
    for (int i = 0; i < 16; i++) k |= (unsigned)(v.v[i] == m.v[i]) << i;
    return k;
}
static inline unsigned l_nanmask(L v) {
    unsigned k = 0;
    for (int i = 0; i < 16; i++) k |= (unsigned)(v.v[i] != v.v[i]) << i;
    return k;
}
/* argmin / argmax (NaNs are looked for apart) */
static inline L l_pick(int op, L a, L b) {
    for (int k = 0; k < 16; k++)
        a.v[k] = op == MK_REDUCE_MAX ? (a.v[k] > b.v[k] ? a.v[k] : b.v[k])
                                     : (a.v[k] < b.v[k] ? a.v[k] : b.v[k]);
    return a;
}
static inline unsigned l_better(int op, L a, L b) {
    unsigned k = 0;
    for (int i = 0; i < 16; i++)
        k |= (unsigned)(op == MK_REDUCE_MAX ? a.v[i] > b.v[i] : a.v[i] < b.v[i]) << i;
    return k;
}
typedef unsigned LM;
static inline LM lm_or(LM a, LM b) { return a | b; }
static inline LM l_unord(L a, L b) {
    unsigned k = 0;
    for (int i = 0; i < 16; i++) k |= (unsigned)(a.v[i] != a.v[i] || b.v[i] != b.v[i]) << i;
    return k;
}

/* every lane = the least / greatest lane of v (no NaNs) */
static inline L l_all(int op, L v) {
    float m = v.v[0];
    for (int k = 1; k < 16; k++) m = op == MK_REDUCE_MAX ? (v.v[k] > m ? v.v[k] : m) : (v.v[k] < m ? v.v[k] : m);
    return l_set1(m);
}

typedef struct { int32_t v[16]; } LI;
static inline LI li_set1(int n) {
    LI r;
    for (int k = 0; k < 16; k++) r.v[k] = n;
    return r;
}
static inline LI li_where(LI a, unsigned k, int n) {
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) a.v[i] = n;
    return a;
}
static inline int32_t li_min(LI a, unsigned k) {
    int32_t best = INT32_MAX;
    for (; k; k &= k - 1) best = a.v[__builtin_ctz(k)] < best ? a.v[__builtin_ctz(k)] : best;
    return best;
}
static inline float rd_op1(int op, float a, float b) {
    return op == MK_REDUCE_SUM ? a + b : op == MK_REDUCE_MIN ? rd_min1(a, b) : rd_max1(a, b);
}
static inline float l_fold(int op, L a) {
    for (int half = 8; half >= 1; half /= 2)
        for (int k = 0; k < half; k++) a.v[k] = rd_op1(op, a.v[k], a.v[k + half]);
    return a.v[0];
}

#define v_load(p) (*(p))
#define v_load_n(p, r) ((void)(r), *(p))
#define v_store(p, v) (*(p) = (v))
#define v_store_n(p, v, r) ((void)(r), *(p) = (v))
#define v_add(a, b) ((a) + (b))
#define v_min rd_min1
#define v_max rd_max1

static uint64_t read_or__generic(const uint64_t *x, int64_t n) {
    uint64_t r = 0;
    for (int64_t i = 0; i < n; i++) r |= x[i];
    return r;
}

#include "reduce_simd.h"

const mk_rd_kernels mk_rd_kernels__generic = RD_TABLE("generic");
