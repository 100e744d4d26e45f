/* Portable elementwise microkernels (no ISA flags; any architecture).
 *
 * Conversions are pure integer / exactly-rounded float code and bit-identical to the SIMD
 * paths. Neurons are computed in double with libm and rounded once to float, so this path
 * is also the accuracy reference of the vector paths.
 */
#include <math.h>
#include <string.h>

#include "elementwise.h"

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- scalar conversions --------------------------------------------------------- */

float mk_ew_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* exact, and a normal float */
        return u2f(sign | f2u(v));
    }
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t mk_ew_f32_to_f16(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (ax >= 0x38800000u) {                                   /* normal half */
        uint32_t r = ax - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    uint32_t e = ax >> 23;
    if (e < 102) return (uint16_t)sign; /* below 2^-25 (or exactly: ties to even 0) */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u, sh = 126u - e; /* 14..24 */
    uint32_t q = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

float mk_ew_bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

uint16_t mk_ew_f32_to_bf16(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* Same operation order as the SIMD paths: max(x, 0) (NaN -> 0), min(., 1), * scale, then
 * round half to even (the 2^23 trick rounds in the current, i.e. nearest-even, mode). */
static inline uint32_t unorm_encode(float x, float scale) {
    float v = x > 0.0f ? x : 0.0f;
    v = v < 1.0f ? v : 1.0f;
    v = v * scale;
    volatile float t = v + 0x1p23f; /* volatile: keep the rounding step */
    return (uint32_t)(t - 0x1p23f);
}
uint8_t mk_ew_f32_to_unorm8(float f) { return (uint8_t)unorm_encode(f, 255.0f); }
uint16_t mk_ew_f32_to_unorm16(float f) { return (uint16_t)unorm_encode(f, 65535.0f); }

uint32_t mk_ew_encode_bits(int fmt, float v) {
    switch (fmt) {
    case MK_FMT_UNORM8: return mk_ew_f32_to_unorm8(v);
    case MK_FMT_UNORM16: return mk_ew_f32_to_unorm16(v);
    case MK_FMT_F16: return mk_ew_f32_to_f16(v);
    case MK_FMT_BF16: return mk_ew_f32_to_bf16(v);
    default: return f2u(v);
    }
}

void mk_ew_load_strided(int fmt, const void *src, int64_t stride, float *dst, int64_t n) {
    switch (fmt) {
    case MK_FMT_UNORM8: {
        const uint8_t *s = (const uint8_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i * stride] / 255.0f;
        break;
    }
    case MK_FMT_UNORM16: {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i * stride] / 65535.0f;
        break;
    }
    case MK_FMT_F16: {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = mk_ew_f16_to_f32(s[i * stride]);
        break;
    }
    case MK_FMT_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = mk_ew_bf16_to_f32(s[i * stride]);
        break;
    }
    default: {
        const float *s = (const float *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = s[i * stride];
        break;
    }
    }
}

void mk_ew_store_strided(int fmt, const float *src, void *dst, int64_t stride, int64_t n) {
    switch (fmt) {
    case MK_FMT_UNORM8: {
        uint8_t *d = (uint8_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i * stride] = mk_ew_f32_to_unorm8(src[i]);
        break;
    }
    case MK_FMT_UNORM16: {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i * stride] = mk_ew_f32_to_unorm16(src[i]);
        break;
    }
    case MK_FMT_F16: {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i * stride] = mk_ew_f32_to_f16(src[i]);
        break;
    }
    case MK_FMT_BF16: {
        uint16_t *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i * stride] = mk_ew_f32_to_bf16(src[i]);
        break;
    }
    default: {
        float *d = (float *)dst;
        for (int64_t i = 0; i < n; i++) d[i * stride] = src[i];
        break;
    }
    }
}

/* ---- contiguous load / store ---------------------------------------------------- */

#define GEN_LOAD(NAME, FMT)                                                              \
    static void NAME(const void *src, float *dst, int64_t n) {                          \
        mk_ew_load_strided(FMT, src, 1, dst, n);                                         \
    }
#define GEN_STORE(NAME, FMT)                                                             \
    static void NAME(const float *src, void *dst, int64_t n) {                          \
        mk_ew_store_strided(FMT, src, dst, 1, n);                                        \
    }
GEN_LOAD(load_u8__generic, MK_FMT_UNORM8)
GEN_LOAD(load_u16__generic, MK_FMT_UNORM16)
GEN_LOAD(load_f16__generic, MK_FMT_F16)
GEN_LOAD(load_f32__generic, MK_FMT_F32)
GEN_LOAD(load_bf16__generic, MK_FMT_BF16)
GEN_STORE(store_u8__generic, MK_FMT_UNORM8)
GEN_STORE(store_u16__generic, MK_FMT_UNORM16)
GEN_STORE(store_f16__generic, MK_FMT_F16)
GEN_STORE(store_f32__generic, MK_FMT_F32)
GEN_STORE(store_bf16__generic, MK_FMT_BF16)

/* ---- neurons ------------------------------------------------------------------------ */

static inline float nr_relu(const mk_ew_neuron *p, float x) { return x >= 0.0f ? x : p->a * x; }
static inline float nr_linear(const mk_ew_neuron *p, float x) {
    return (float)((double)p->a * x + p->b);
}
static inline float nr_sigmoid(const mk_ew_neuron *p, float x) {
    (void)p;
    double t = exp(-fabs((double)x));
    return (float)((x >= 0.0f ? 1.0 : t) / (1.0 + t));
}
static inline float nr_hard_sigmoid(const mk_ew_neuron *p, float x) {
    float t = (float)((double)p->a * x + p->b);
    t = 0.0f > t ? 0.0f : t; /* NaN stays NaN */
    return 1.0f < t ? 1.0f : t;
}
static inline float nr_tanh(const mk_ew_neuron *p, float x) {
    return (float)((double)p->a * tanh((double)p->b * x));
}
static inline float nr_absolute(const mk_ew_neuron *p, float x) { (void)p; return fabsf(x); }
static inline float nr_soft_plus(const mk_ew_neuron *p, float x) {
    double t = (double)p->b * x;
    double r = (t > 0.0 ? t : 0.0) + log1p(exp(-fabs(t)));
    if (isnan(t)) r = t;
    return (float)(p->a * r);
}
static inline float nr_soft_sign(const mk_ew_neuron *p, float x) {
    (void)p;
    if (isinf(x)) return copysignf(1.0f, x);
    return (float)((double)x / (1.0 + fabs((double)x)));
}
static inline float nr_elu(const mk_ew_neuron *p, float x) {
    return x >= 0.0f ? x : (float)(p->a * expm1((double)x));
}
static inline float nr_relun(const mk_ew_neuron *p, float x) {
    float r = x >= 0.0f ? x : p->a * x;
    return p->b < r ? p->b : r; /* NaN stays NaN */
}
static inline float nr_power(const mk_ew_neuron *p, float x) {
    return (float)pow((double)p->a * x + p->b, (double)p->c);
}
static inline float nr_exponential(const mk_ew_neuron *p, float x) {
    double t = (double)p->a * x + p->b;
    return (float)(p->c == -1.0f ? exp(t) : pow((double)p->c, t));
}
static inline float nr_logarithm(const mk_ew_neuron *p, float x) {
    double t = (double)p->a * x + p->b;
    return (float)(p->c == -1.0f ? log(t) : log(t) / log((double)p->c));
}
static inline float nr_gelu(const mk_ew_neuron *p, float x) {
    (void)p;
    if (isinf(x)) return x > 0.0f ? x : -0.0f; /* the limits, not inf*0 */
    double z = (double)x * 0.70710678118654752440;
    return (float)(0.5 * x * erfc(-z));
}

#define GEN_NEURON(NAME, F)                                                              \
    static void neuron_##NAME##__generic(const mk_ew_neuron *p, const float *x, float *y, \
                                         int64_t n, const float *slope) {                \
        (void)slope;                                                                     \
        for (int64_t i = 0; i < n; i++) y[i] = F(p, x[i]);                               \
    }
GEN_NEURON(relu, nr_relu)
GEN_NEURON(linear, nr_linear)
GEN_NEURON(sigmoid, nr_sigmoid)
GEN_NEURON(hard_sigmoid, nr_hard_sigmoid)
GEN_NEURON(tanh, nr_tanh)
GEN_NEURON(absolute, nr_absolute)
GEN_NEURON(soft_plus, nr_soft_plus)
GEN_NEURON(soft_sign, nr_soft_sign)
GEN_NEURON(elu, nr_elu)
GEN_NEURON(relun, nr_relun)
GEN_NEURON(power, nr_power)
GEN_NEURON(exponential, nr_exponential)
GEN_NEURON(logarithm, nr_logarithm)
GEN_NEURON(gelu, nr_gelu)

static void neuron_none__generic(const mk_ew_neuron *p, const float *x, float *y, int64_t n,
                                 const float *slope) {
    (void)p; (void)slope;
    if (x != y) memmove(y, x, (size_t)n * sizeof(float));
}

static void neuron_prelu__generic(const mk_ew_neuron *p, const float *x, float *y, int64_t n,
                                  const float *slope) {
    (void)p;
    for (int64_t i = 0; i < n; i++) y[i] = x[i] >= 0.0f ? x[i] : slope[i] * x[i];
}

/* ---- arithmetic --------------------------------------------------------------------- */

static inline float clampf(float r, float lo, float hi) {
    r = lo > r ? lo : r; /* same operand order as maxps / minps: NaN stays NaN */
    return hi < r ? hi : r;
}

#define GEN_ARITH(NAME, OP)                                                              \
    static void arith_##NAME##__generic(const mk_ew_arith *p, const float *a, int a_bc,  \
                                        const float *b, int b_bc, float *y, int64_t n) { \
        const float ps = p->ps, ss = p->ss, bias = p->bias, lo = p->lo, hi = p->hi;      \
        const int64_t ia = a_bc ? 0 : 1, ib = b_bc ? 0 : 1;                              \
        for (int64_t i = 0; i < n; i++) {                                                \
            float u = ps * a[i * ia], v = ss * b[i * ib];                                \
            y[i] = clampf((u OP v) + bias, lo, hi);                                      \
        }                                                                                \
    }
GEN_ARITH(add, +)
GEN_ARITH(sub, -)
GEN_ARITH(mul, *)
GEN_ARITH(div, /)

static void fill__generic(void *dst, int64_t n, uint32_t bits, int esize) {
    if (esize == 1) {
        memset(dst, (int)(bits & 0xffu), (size_t)n);
    } else if (esize == 2) {
        uint16_t v = (uint16_t)bits, *d = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = v;
    } else {
        uint32_t *d = (uint32_t *)dst;
        for (int64_t i = 0; i < n; i++) d[i] = bits;
    }
}

/* The run sizes of 1-4 channel pixels as fixed-size moves, which the compiler inlines. */
void mk_ew_runs__generic(char *d, int64_t db, const char *s, int64_t sb, int64_t rb, int64_t P) {
#define EW_RUNS(RB)                                                                       \
    for (int64_t p = 0; p < P; p++) memcpy(d + p * db, s + p * sb, RB);                   \
    return;
    switch (rb) {
    case 1: EW_RUNS(1)
    case 2: EW_RUNS(2)
    case 3: EW_RUNS(3)
    case 4: EW_RUNS(4)
    case 6: EW_RUNS(6)
    case 8: EW_RUNS(8)
    case 12: EW_RUNS(12)
    case 16: EW_RUNS(16)
    default: EW_RUNS((size_t)rb)
    }
#undef EW_RUNS
}

static void interleave3__generic(const uint32_t *a, const uint32_t *b, const uint32_t *c,
                              uint32_t *d, int64_t n) {
    mk_ew_interleave3_loop(a, b, c, d, n);
}

const mk_ew_kernels mk_ew_kernels__generic = {
    .name = "generic",
    .load = {NULL, load_u8__generic, load_u16__generic, load_f16__generic, load_f32__generic,
             load_bf16__generic},
    .store = {NULL, store_u8__generic, store_u16__generic, store_f16__generic,
              store_f32__generic, store_bf16__generic},
    .neuron = {neuron_none__generic, neuron_relu__generic, neuron_linear__generic,
               neuron_sigmoid__generic, neuron_hard_sigmoid__generic, neuron_tanh__generic,
               neuron_absolute__generic, neuron_soft_plus__generic, neuron_soft_sign__generic,
               neuron_elu__generic, neuron_prelu__generic, neuron_relun__generic,
               neuron_power__generic, neuron_exponential__generic, neuron_logarithm__generic,
               neuron_gelu__generic},
    .arith = {arith_add__generic, arith_sub__generic, arith_mul__generic, arith_div__generic},
    .fill = fill__generic,
    .runs = mk_ew_runs__generic,
    .interleave3 = interleave3__generic,
};
