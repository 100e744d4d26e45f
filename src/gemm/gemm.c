/* GEMM family: dispatch and B packing (the contract of gemm.h). */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "elementwise/elementwise.h"   /* mk_ew_f16_to_f32 */

static _Atomic(const mk_gemm_ukernel *) g_ukernel;

void mk_gemm_select_isa(mk_isa isa) {
    const mk_gemm_ukernel *k = &mk_gemm_ukernel__generic;
#if MK_X86
    if (isa == MK_ISA_AVX512) k = &mk_gemm_ukernel__avx512;
    else if (isa == MK_ISA_AVX2) k = &mk_gemm_ukernel__avx2;
#else
    (void)isa;
#endif
    atomic_store_explicit(&g_ukernel, k, memory_order_release);
}

const mk_gemm_ukernel *mk_gemm_ukernel_active(void) {
    const mk_gemm_ukernel *k = atomic_load_explicit(&g_ukernel, memory_order_acquire);
    if (k == NULL) { /* nobody called mk_select_isa yet: take the best this CPU supports */
        mk_gemm_select_isa(mk_best_isa());
        k = atomic_load_explicit(&g_ukernel, memory_order_acquire);
    }
    return k;
}

typedef struct burn_ctx { const mk_gemm_ukernel *u; int64_t iters; _Atomic double flops; } burn_ctx;

static void burn_chunks(void *ctx, int64_t begin, int64_t end) {
    burn_ctx *b = ctx;
    for (int64_t t = begin; t < end; t++) {
        double f = b->u->fma_burn(b->iters), old = atomic_load(&b->flops);
        while (!atomic_compare_exchange_weak(&b->flops, &old, old + f)) {}
    }
}

double mk_gemm_fma_burn(mk_pool *pool, int64_t chunks, int64_t iters) {
    burn_ctx b = {mk_gemm_ukernel_active(), iters, 0.0};
    mk_parallel_for(pool, chunks, 1, burn_chunks, &b);
    return atomic_load(&b.flops);
}

mk_status mk_gemm_packed_b_floats(int64_t k, int64_t n, int64_t *floats) {
    if (k < 0 || n < 0) return MK_EINVAL;
    int64_t panels = n / MK_GEMM_NR + (n % MK_GEMM_NR != 0);
    if (k > 0 && panels > INT64_MAX / MK_GEMM_NR / k) return MK_EINVAL;
    *floats = panels * MK_GEMM_NR * k;
    return MK_OK;
}

void mk_gemm_pack_b(int64_t k, int64_t n, const void *b, int format, int64_t rs, int64_t cs,
                    float *packed) {
    for (int64_t j0 = 0; j0 < n; j0 += MK_GEMM_NR) {
        int64_t nc = n - j0 < MK_GEMM_NR ? n - j0 : MK_GEMM_NR;
        for (int64_t r = 0; r < k; r++, packed += MK_GEMM_NR) {
            int64_t at = r * rs + j0 * cs;
            if (format == MK_FMT_F16) {
                const uint16_t *src = (const uint16_t *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = mk_ew_f16_to_f32(src[j * cs]);
            } else if (cs == 1) {   /* a fixed-size copy: no call per 128 bytes */
                const float *src = (const float *)b + at;
                if (nc == MK_GEMM_NR)
                    for (int j = 0; j < MK_GEMM_NR; j++) packed[j] = src[j];
                else
                    memcpy(packed, src, (size_t)nc * sizeof(float));
            } else {
                const float *src = (const float *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = src[j * cs];
            }
            for (int64_t j = nc; j < MK_GEMM_NR; j++) packed[j] = 0.0f;
        }
    }
}

/* ---- SGEMM driver ---------------------------------------------------------------------------
 * The output is cut into tasks (a batch item's block of mb rows x nb columns), by shape only.
 * A task walks K in blocks of kc: it packs its kc x nb block of B (<= 512 KiB, stays in L2),
 * then for each tile of MR rows, packed on the stack (kc contiguous floats per row: 12 KiB,
 * stays in L1), runs the micro-kernel over every 32-column panel of the block. Small or thin
 * products read B in place. */

#define KC_MAX 256          /* K block: the A tile (MR x kc) in L1 */
#define NB_MAX 512          /* columns per task: the packed B block (kc x nb) in L2 */
#define MR_MAX 16
#define TASKS 4             /* cut the output into at least this many tasks when possible */
#define SERIAL_FMAS (1 << 19) /* below this much work, threads cost more than they save */

static const float zeros[KC_MAX];

typedef struct sgemm_plan {
    const mk_sgemm_args *p;
    const mk_gemm_ukernel *u;
    int64_t kc, mb, nb, row_blocks, col_blocks;
    int pack_b, c_buffer;
    _Atomic int failed;
} sgemm_plan;

static inline float load_elem(const void *base, int format, int64_t at) {
    return format == MK_FMT_F16 ? mk_ew_f16_to_f32(((const uint16_t *)base)[at])
                                : ((const float *)base)[at];
}

static void sgemm_task(const sgemm_plan *g, int64_t t, float *pb, float *cbuf) {
    const mk_sgemm_args *p = g->p;
    const mk_gemm_ukernel *u = g->u;
    const int MR = u->mr;
    int64_t bi = t / (g->row_blocks * g->col_blocks);
    int64_t rest = t % (g->row_blocks * g->col_blocks);
    int64_t i0 = rest / g->col_blocks * g->mb, j0 = rest % g->col_blocks * g->nb;
    int64_t i1 = i0 + g->mb < p->m ? i0 + g->mb : p->m;
    int64_t j1 = j0 + g->nb < p->n ? j0 + g->nb : p->n;
    size_t asz = mk_format_size(p->a.format), bsz = mk_format_size(p->b.format);
    size_t csz = mk_format_size(p->c.format);
    const char *A = (const char *)p->a.data + (size_t)(bi * p->a.bs) * asz;
    const char *B = (const char *)p->b.data + (size_t)(bi * p->b.bs) * bsz;
    char *Cm = (char *)p->c.data + (size_t)(bi * p->c.bs + i0 * p->c.rs + j0 * p->c.cs) * csz;
    float *C = (float *)Cm;
    int64_t ldc = p->c.rs;
    if (g->c_buffer) {   /* fp16 or strided C: accumulate the block in fp32, store at the end */
        C = cbuf;
        ldc = j1 - j0;
        if (p->beta != 0.0f)
            for (int64_t i = 0; i < i1 - i0; i++)
                for (int64_t j = 0; j < j1 - j0; j++)
                    C[i * ldc + j] = load_elem(Cm, p->c.format, i * p->c.rs + j * p->c.cs);
    }
    float pa[MR_MAX * KC_MAX];
    const float *rows[MR_MAX];
    for (int64_t pc = 0; pc < p->k; pc += g->kc) {
        int64_t kc = p->k - pc < g->kc ? p->k - pc : g->kc;
        int first = pc == 0, last = pc + kc == p->k;
        mk_gemm_epilogue ep = {p->alpha, first ? p->beta : 1.0f, NULL,
                               last ? p->lo : -INFINITY, last ? p->hi : INFINITY};
        if (g->pack_b)
            mk_gemm_pack_b(kc, j1 - j0, B + (size_t)(pc * p->b.rs + j0 * p->b.cs) * bsz,
                           p->b.format, p->b.rs, p->b.cs, pb);
        for (int64_t i = i0; i < i1; i += MR) {
            int mr = i1 - i < MR ? (int)(i1 - i) : MR;
            for (int r = 0; r < mr; r++) {   /* pack the tile: no 4 KiB aliasing in L1 */
                int64_t at = (i + r) * p->a.rs + pc * p->a.cs;
                rows[r] = pa + r * kc;
                if (p->a.format == MK_FMT_F32 && p->a.cs == 1)
                    memcpy(pa + r * kc, (const float *)A + at, (size_t)kc * sizeof(float));
                else
                    for (int64_t q = 0; q < kc; q++)
                        pa[r * kc + q] = load_elem(A, p->a.format, at + q * p->a.cs);
            }
            if (i + MR < i1 && p->a.cs == 1)   /* the next tile's rows: into L2 meanwhile */
                for (int r = 0; r < MR && i + MR + r < i1; r++) {
                    const char *next = A + (size_t)((i + MR + r) * p->a.rs + pc) * asz;
                    for (int64_t q = 0; q < kc * (int64_t)asz; q += 64)
                        __builtin_prefetch(next + q, 0, 2);
                }
            for (int64_t j = j0; j < j1; j += MK_GEMM_NR) {
                int nc = j1 - j < MK_GEMM_NR ? (int)(j1 - j) : MK_GEMM_NR;
                float *c = C + (i - i0) * ldc + (j - j0);
                ep.bias = first && p->bias ? p->bias + j : NULL;
                if (g->pack_b)
                    u->run(mr, nc, kc, 1, rows, 0, zeros, pb + (j - j0) * kc, c, ldc, &ep);
                else
                    u->run_strided(mr, nc, kc, rows, zeros, (const float *)B + pc * p->b.rs + j,
                                   p->b.rs, c, ldc, &ep);
            }
        }
    }
    if (g->c_buffer) {
        for (int64_t i = 0; i < i1 - i0; i++)
            for (int64_t j = 0; j < j1 - j0; j++) {
                int64_t at = i * p->c.rs + j * p->c.cs;
                if (p->c.format == MK_FMT_F16)
                    ((uint16_t *)Cm)[at] = mk_ew_f32_to_f16(C[i * ldc + j]);
                else
                    ((float *)Cm)[at] = C[i * ldc + j];
            }
    }
}

static void sgemm_tasks(void *ctx, int64_t begin, int64_t end) {
    sgemm_plan *g = ctx;
    int64_t nbw = (g->nb + MK_GEMM_NR - 1) / MK_GEMM_NR * MK_GEMM_NR;
    size_t pb_floats = g->pack_b ? (size_t)(g->kc * nbw) : 0;
    size_t c_floats = g->c_buffer ? (size_t)(g->mb * g->nb) : 0;
    float *scratch = NULL;
    if (pb_floats + c_floats) {
        scratch = aligned_alloc(MK_ALIGNMENT, ((pb_floats + c_floats) * 4 + 63) / 64 * 64);
        if (!scratch) { atomic_store(&g->failed, 1); return; }
    }
    for (int64_t t = begin; t < end; t++) sgemm_task(g, t, scratch, scratch + pb_floats);
    free(scratch);
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---- thin products (one row or one column of output): bound by memory, not FMAs, so plain C
 * that reads each operand once, in address order, at the speed of memory. */

#define THIN_CHUNK 256   /* rows per dot_tasks task */
#define GEMV_MAX 4096    /* columns per gemv_tasks task: B rows read in long runs (few pages) */

static int64_t gemv_chunk(int64_t n) {   /* up to 2 tasks per row, by shape */
    int64_t c = cdiv(cdiv(n, 2), 64) * 64;
    return c < 256 ? 256 : c > GEMV_MAX ? GEMV_MAX : c;
}

static void store_out(const mk_sgemm_args *p, char *c, int64_t at, float acc, float bias) {
    float v = p->alpha * acc;
    if (p->beta != 0.0f) v += p->beta * load_elem(c, p->c.format, at);
    v += bias;
    v = v > p->lo ? v : p->lo;
    v = v < p->hi ? v : p->hi;
    if (p->c.format == MK_FMT_F16) ((uint16_t *)c)[at] = mk_ew_f32_to_f16(v);
    else ((float *)c)[at] = v;
}

/* m == 1, B fp32 with unit column stride: C[0, j] for a chunk of columns, B row by row. */
static void gemv_tasks(void *ctx, int64_t begin, int64_t end) {
    const mk_sgemm_args *p = ctx;
    for (int64_t t = begin; t < end; t++) {
        int64_t chunk = gemv_chunk(p->n);
        int64_t bi = t / cdiv(p->n, chunk), j0 = t % cdiv(p->n, chunk) * chunk;
        int64_t nc = p->n - j0 < chunk ? p->n - j0 : chunk;
        const char *A = (const char *)p->a.data + (size_t)(bi * p->a.bs) * mk_format_size(p->a.format);
        const float *B = (const float *)p->b.data + bi * p->b.bs + j0;
        char *C = (char *)p->c.data + (size_t)(bi * p->c.bs) * mk_format_size(p->c.format);
        float acc[GEMV_MAX] = {0};
        int64_t q = 0;
        for (; q + 4 <= p->k; q += 4) {   /* 4 rows per pass over acc: less L1 traffic */
            float a0 = load_elem(A, p->a.format, q * p->a.cs);
            float a1 = load_elem(A, p->a.format, (q + 1) * p->a.cs);
            float a2 = load_elem(A, p->a.format, (q + 2) * p->a.cs);
            float a3 = load_elem(A, p->a.format, (q + 3) * p->a.cs);
            const float *b0 = B + q * p->b.rs, *b1 = b0 + p->b.rs, *b2 = b1 + p->b.rs;
            const float *b3 = b2 + p->b.rs;
            for (int64_t j = 0; j < nc; j++)
                acc[j] += (a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j]);
        }
        for (; q < p->k; q++) {
            float a = load_elem(A, p->a.format, q * p->a.cs);
            const float *b = B + q * p->b.rs;
            for (int64_t j = 0; j < nc; j++) acc[j] += a * b[j];
        }
        for (int64_t j = 0; j < nc; j++)
            store_out(p, C, (j0 + j) * p->c.cs, acc[j], p->bias ? p->bias[j0 + j] : 0.0f);
    }
}

/* n == 1, A fp32 with unit column stride: C[i, 0] = dot(A row i, B column) for a chunk of
 * rows; 16 partial sums added in a fixed order. */
typedef struct dot_plan { const mk_sgemm_args *p; _Atomic int failed; } dot_plan;

static void dot_tasks(void *ctx, int64_t begin, int64_t end) {
    const mk_sgemm_args *p = ((dot_plan *)ctx)->p;
    float *x = malloc((size_t)p->k * sizeof(float));
    if (!x) { atomic_store(&((dot_plan *)ctx)->failed, 1); return; }
    for (int64_t t = begin; t < end; t++) {
        int64_t bi = t / cdiv(p->m, THIN_CHUNK), i0 = t % cdiv(p->m, THIN_CHUNK) * THIN_CHUNK;
        int64_t mc = p->m - i0 < THIN_CHUNK ? p->m - i0 : THIN_CHUNK;
        const float *A = (const float *)p->a.data + bi * p->a.bs + i0 * p->a.rs;
        const char *B = (const char *)p->b.data + (size_t)(bi * p->b.bs) * mk_format_size(p->b.format);
        char *C = (char *)p->c.data + (size_t)(bi * p->c.bs) * mk_format_size(p->c.format);
        for (int64_t q = 0; q < p->k; q++) x[q] = load_elem(B, p->b.format, q * p->b.rs);
        for (int64_t i = 0; i < mc; i++) {
            const float *a = A + i * p->a.rs;
            float s[16] = {0};
            int64_t q = 0;
            for (; q + 16 <= p->k; q += 16)
                for (int l = 0; l < 16; l++) s[l] += a[q + l] * x[q + l];
            for (int l = 0; q < p->k; q++, l++) s[l] += a[q] * x[q];
            for (int w = 8; w >= 1; w /= 2)
                for (int l = 0; l < w; l++) s[l] += s[l + w];
            store_out(p, C, (i0 + i) * p->c.rs, s[0], p->bias ? p->bias[0] : 0.0f);
        }
    }
    free(x);
}

mk_status mk_sgemm(const mk_sgemm_args *p, mk_pool *pool) {
    if (p->batch < 1 || p->m < 1 || p->n < 1 || p->k < 1) return MK_EINVAL;
    for (int q = 0; q < 3; q++) {
        int f = (&p->a)[q].format;
        if (f != MK_FMT_F32 && f != MK_FMT_F16) return MK_EINVAL;
    }
    double fmas = (double)p->batch * (double)p->m * (double)p->n * (double)p->k;
    int64_t grain_all = fmas < SERIAL_FMAS ? INT64_MAX / 2 : 1;
    if (p->m == 1 && p->b.format == MK_FMT_F32 && p->b.cs == 1) {
        mk_parallel_for(pool, p->batch * cdiv(p->n, gemv_chunk(p->n)), grain_all, gemv_tasks,
                        (void *)p);
        return MK_OK;
    }
    if (p->n == 1 && p->a.format == MK_FMT_F32 && p->a.cs == 1) {
        dot_plan d = {p, 0};
        mk_parallel_for(pool, p->batch * cdiv(p->m, THIN_CHUNK), grain_all, dot_tasks, &d);
        return atomic_load(&d.failed) ? MK_ENOMEM : MK_OK;
    }
    sgemm_plan g = {.p = p, .u = mk_gemm_ukernel_active()};
    int64_t MR = g.u->mr, m = p->m, n = p->n, k = p->k;
    g.kc = cdiv(k, cdiv(k, KC_MAX));
    g.c_buffer = p->c.format != MK_FMT_F32 || p->c.cs != 1;
    g.pack_b = !(p->b.format == MK_FMT_F32 && p->b.cs == 1 && (m <= MR || k * n <= 16384));
    /* Split the longer side of the output: a row split packs B once per row block, a
     * column split reads A once per column block. */
    int64_t row_tiles = cdiv(m, MR), col_blocks = cdiv(n, NB_MAX), row_blocks = 1;
    if (m <= n) {
        int64_t want = cdiv(TASKS, p->batch);
        if (col_blocks < want) col_blocks = want < cdiv(n, MK_GEMM_NR) ? want : cdiv(n, MK_GEMM_NR);
    } else if (p->batch * col_blocks < TASKS) {
        row_blocks = cdiv(TASKS, p->batch * col_blocks);
        if (row_blocks > row_tiles) row_blocks = row_tiles;
    }
    g.nb = cdiv(cdiv(n, col_blocks), MK_GEMM_NR) * MK_GEMM_NR;
    g.col_blocks = cdiv(n, g.nb);
    g.mb = cdiv(row_tiles, row_blocks) * MR;
    g.row_blocks = cdiv(m, g.mb);
    int64_t tasks = p->batch * g.row_blocks * g.col_blocks;
    mk_parallel_for(pool, tasks, fmas < SERIAL_FMAS ? tasks : 1, sgemm_tasks, &g);
    return atomic_load(&g.failed) ? MK_ENOMEM : MK_OK;
}
