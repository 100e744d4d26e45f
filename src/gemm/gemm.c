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
    if (format == MK_FMT_F32 && cs == 1) {
        /* row by row, so that the source is read once in address order (the hardware
         * prefetcher streams it; panel by panel takes 2 lines of every row, rows apart) */
        const int64_t full = n / MK_GEMM_NR * MK_GEMM_NR;
        for (int64_t r = 0; r < k; r++) {
            const float *src = (const float *)b + r * rs;
            float *dst = packed + r * MK_GEMM_NR;
            for (int64_t j0 = 0; j0 < full; j0 += MK_GEMM_NR, dst += k * MK_GEMM_NR)
                for (int j = 0; j < MK_GEMM_NR; j++) dst[j] = src[j0 + j];
            if (full < n) {
                memcpy(dst, src + full, (size_t)(n - full) * sizeof(float));
                memset(dst + (n - full), 0, (size_t)(MK_GEMM_NR - (n - full)) * sizeof(float));
            }
        }
        return;
    }
    for (int64_t j0 = 0; j0 < n; j0 += MK_GEMM_NR) {
        int64_t nc = n - j0 < MK_GEMM_NR ? n - j0 : MK_GEMM_NR;
        for (int64_t r = 0; r < k; r++, packed += MK_GEMM_NR) {
            int64_t at = r * rs + j0 * cs;
            if (format == MK_FMT_F16) {
                const uint16_t *src = (const uint16_t *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = mk_ew_f16_to_f32(src[j * cs]);
            } else {
                const float *src = (const float *)b + at;
                for (int64_t j = 0; j < nc; j++) packed[j] = src[j * cs];
            }
            for (int64_t j = nc; j < MK_GEMM_NR; j++) packed[j] = 0.0f;
        }
    }
}

/* ---- SGEMM driver ---------------------------------------------------------------------------
 * The output is cut into tasks (a batch item's block of rows x columns), by the shape and the
 * pool's thread count (the cut changes no result, see below). A task
 * sums its whole K in blocks of kc: per block and per tile of MR rows it packs the A tile
 * (MR x kc contiguous, so it stays in L1 with no 4 KiB aliasing between rows; or reads the
 * rows in place when they do not alias) and runs the micro-kernel over its columns' 32-column
 * panels of packed B (kc x 32 each, from L2). Every output element is summed in the same order
 * (K blocks of kc, k within a block) whoever computes it: results are bitwise identical for
 * any thread count.
 *
 * B is packed one of two ways:
 * - shared, when an item's packed B fits half the L2 (SHARED_FLOATS): a first parallel pass
 *   packs it for a round of items, then tasks cut rows and columns freely (A tiles run
 *   against all of a task's <= NB_MAX columns);
 * - private, otherwise: tasks cut the columns (the rows only if there are more rows than
 *   columns) and pack their kc x nb slice per K block, used while it is in L2. When few rows
 *   use B (<= THIN_TILES row tiles), reading B from memory is a large part of the time: K
 *   blocks of <= KC_THIN and slices of up to NB_THIN columns, read row by row in long runs.
 * Small products (k x n <= 16384) and one-tile products (m <= MR) read B in place. */

#define KC_MAX 384                /* K block: fewer calls and passes over C per FMA (and
                                   * <= MK_GEMM_PACKED_LDA, the packed A tile's row stride) */
#define KC_IN_PLACE 256           /* ... unless a shorter one lets A be read in place */
#define TILE_WHOLE_BYTES (32 << 10) /* an A tile of whole adjacent rows up to this size: ... */
#define KC_WHOLE 1024             /* ... (and K <= this) is read in place, K in one block */
#define NB_MAX 512                /* columns per task: a kc x nb slice of B (512 KiB) in L2 */
#define SHARED_FLOATS (256 << 10) /* packed B (1 MiB) that stays in L2 with the C tiles */
#define PACK_PANELS 4             /* panels per packing task (256^3: two tasks) */
#define C_BUFFER_FLOATS (256 << 10) /* fp32 block of an fp16 result per task (1 MiB) */
#define MR_MAX 16
_Static_assert(KC_MAX <= MK_GEMM_PACKED_LDA, "a packed A row holds a K block");
#define THIN_TILES 8              /* B used by at most this many row tiles: ... */
#define KC_THIN 192               /* ... K blocks of <= 192 and ... */
#define NB_THIN 1024              /* ... tasks of up to 1024 columns (a 768 KiB slice of B) */
#define SERIAL_FMAS (1 << 19)     /* below this much work, threads cost more than they save */

static const float zeros[KC_WHOLE];

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Scratch memory (packed B and A rows, fp32 C blocks) kept between calls: fresh pages cost a
 * page fault each (5% of a 1024^3 product). At most SCRATCH_SLOTS blocks of <= 4 MiB (about
 * 1-2 MiB each in practice), taken and given back atomically. */
#define SCRATCH_SLOTS 4
#define SCRATCH_KEEP_MAX (4 << 20)   /* bytes: larger blocks are freed */

static _Atomic(size_t *) scratch_slots[SCRATCH_SLOTS];   /* size_t bytes, then the floats */

static float *scratch_get(size_t bytes) {
    for (int i = 0; i < SCRATCH_SLOTS; i++) {
        size_t *b = atomic_exchange(&scratch_slots[i], NULL);
        if (b && *b >= bytes) return (float *)((char *)b + MK_ALIGNMENT);
        free(b);
    }
    if (bytes > SIZE_MAX - 2 * MK_ALIGNMENT) return NULL;
    size_t *b = aligned_alloc(MK_ALIGNMENT, (bytes + 2 * MK_ALIGNMENT - 1) / MK_ALIGNMENT
                                            * MK_ALIGNMENT);
    if (b) *b = bytes;
    return b ? (float *)((char *)b + MK_ALIGNMENT) : NULL;
}

static void scratch_put(float *data) {
    if (!data) return;
    size_t *b = (size_t *)((char *)data - MK_ALIGNMENT);
    if (*b <= SCRATCH_KEEP_MAX)
        for (int i = 0; i < SCRATCH_SLOTS; i++) {
            size_t *empty = NULL;
            if (atomic_compare_exchange_strong(&scratch_slots[i], &empty, b)) return;
        }
    free(b);
}

/* Block b of `blocks` near-equal blocks of `units`, the larger ones first (a greedy pick of
 * tasks in order then evens out between threads): [*first, *first + *count). */
static void even_block(int64_t units, int64_t blocks, int64_t b, int64_t *first, int64_t *count) {
    int64_t q = units / blocks, r = units % blocks;
    *first = b * q + min64(b, r);
    *count = q + (b < r);
}

typedef enum { B_IN_PLACE, B_PRIVATE, B_SHARED } b_mode;

typedef struct sgemm_plan {
    const mk_sgemm_args *p;
    const mk_gemm_ukernel *u;
    b_mode b_mode;
    int a_in_place;              /* the micro-kernel reads A's rows where they are */
    int c_buffer;                /* fp16 or strided C: a task accumulates in fp32 scratch */
    int64_t kc, nb_max;          /* K block; columns per task at most */
    int64_t item0, items;        /* the round: batch items [item0, item0 + items) */
    int64_t row_blocks, col_blocks;   /* tasks per item: blocks of row tiles x of panels */
    float *pb;                   /* B_SHARED: packed B of the round, pb_item floats per item */
    int64_t pb_item;             /* 0: every item has the same B (batch stride 0) */
    _Atomic int failed;
} sgemm_plan;

static inline float load_elem(const void *base, int format, int64_t at) {
    return format == MK_FMT_F16 ? mk_ew_f16_to_f32(((const uint16_t *)base)[at])
                                : ((const float *)base)[at];
}

/* Whether a tile's A rows can be read in place (no copy): fp32 rows with unit column stride
 * that spread over the 64 sets of the L1 (4 KiB apart repeat the same sets) nearly as evenly
 * as a packed tile; rows a multiple of 2 KiB apart, say, would evict each other. */
static int a_in_place(const mk_sgemm_args *p, int mr, int64_t kc) {
    if (p->a.format != MK_FMT_F32 || p->a.cs != 1) return 0;
    const int64_t lines = (kc * 4 + 63) / 64 + 1;   /* + 1: rows need not start a line */
    int count[64] = {0}, worst = 0;
    for (int r = 0; r < mr; r++)
        for (int64_t l = 0, start = (int64_t)((uint64_t)(r * p->a.rs) * 4 / 64); l < lines; l++) {
            int *at = &count[(start + l) & 63];
            worst = ++*at > worst ? *at : worst;
        }
    return worst <= 4;
}

/* Pack rows [r0, r0 + kr) x columns [j0, j0 + nc) of batch item `item`'s B. */
static void pack_b_block(const mk_sgemm_args *p, int64_t item, int64_t r0, int64_t kr,
                         int64_t j0, int64_t nc, float *dst) {
    const char *src = (const char *)p->b.data + (size_t)(item * p->b.bs + r0 * p->b.rs
                                                         + j0 * p->b.cs)
                                                * mk_format_size(p->b.format);
    mk_gemm_pack_b(kr, nc, src, p->b.format, p->b.rs, p->b.cs, dst);
}

/* Shared packed B of one item: K block after K block, each all the panels (kc x 32 each), so
 * that a task's part of a K block is contiguous (panels k x 32 floats apart would sit a
 * multiple of the L2's way size apart for k = 1024, 2048, ... and fight over its sets). */
static float *shared_panel(const sgemm_plan *g, float *pb, int64_t pc, int64_t kc, int64_t j) {
    return pb + pc * cdiv(g->p->n, MK_GEMM_NR) * MK_GEMM_NR + j * kc;
}

static void pack_tasks(void *ctx, int64_t begin, int64_t end) {
    const sgemm_plan *g = ctx;
    const mk_sgemm_args *p = g->p;
    const int64_t groups = cdiv(cdiv(p->n, MK_GEMM_NR), PACK_PANELS);
    for (int64_t t = begin; t < end; t++) {
        int64_t it = t / groups, j0 = t % groups * PACK_PANELS * MK_GEMM_NR;
        int64_t nc = min64(PACK_PANELS * MK_GEMM_NR, p->n - j0);
        for (int64_t pc = 0; pc < p->k; pc += g->kc) {
            int64_t kc = min64(p->k - pc, g->kc);
            pack_b_block(p, g->item0 + it, pc, kc, j0, nc,
                         shared_panel(g, g->pb + it * g->pb_item, pc, kc, j0));
        }
    }
}

/* Prefetch rows [rows * part / parts, rows * (part + 1) / parts) of `rows` rows of `lines`
 * cache lines each, `stride` bytes apart from `base`, into L2: a share of a block per call. */
static void prefetch_part(const char *base, int64_t stride, int64_t rows, int64_t lines,
                          int64_t part, int64_t parts) {
    for (int64_t r = rows * part / parts; r < rows * (part + 1) / parts; r++)
        for (int64_t l = 0; l < lines; l++) __builtin_prefetch(base + r * stride + l * 64, 0, 2);
}

/* The A rows [i, i + mr) of K block pc for the micro-kernel: in place, or packed at pa, rows
 * MK_GEMM_PACKED_LDA floats apart (kc <= KC_MAX when packed), for run_packed. */
static void tile_rows(const sgemm_plan *g, const char *A, int64_t i, int mr, int64_t pc,
                      int64_t kc, float *pa, const float **rows) {
    const mk_sgemm_args *p = g->p;
    for (int r = 0; r < mr; r++) {
        const int64_t at = (i + r) * p->a.rs + pc * p->a.cs;
        float *row = pa + r * MK_GEMM_PACKED_LDA;
        if (g->a_in_place) {
            rows[r] = (const float *)A + at;
        } else if (p->a.format == MK_FMT_F32 && p->a.cs == 1) {
            rows[r] = memcpy(row, (const float *)A + at, (size_t)kc * sizeof(float));
        } else {
            for (int64_t q = 0; q < kc; q++) row[q] = load_elem(A, p->a.format, at + q * p->a.cs);
            rows[r] = row;
        }
    }
}

/* One task: its C block, K block after K block, tile after tile, each against all its panels
 * (B in L2; the A tile in L1; packed A: the next tile's rows prefetched into L2). */
static void sgemm_task(const sgemm_plan *g, int64_t t, float *pb, float *pa, float *cbuf) {
    const mk_sgemm_args *p = g->p;
    const mk_gemm_ukernel *u = g->u;
    const int MR = u->mr;
    const int64_t per_item = g->row_blocks * g->col_blocks, it = t / per_item;
    const int64_t bi = g->item0 + it, rest = t % per_item;
    int64_t i0, i1, j0, j1;
    even_block(cdiv(p->m, MR), g->row_blocks, rest / g->col_blocks, &i0, &i1);
    even_block(cdiv(p->n, MK_GEMM_NR), g->col_blocks, rest % g->col_blocks, &j0, &j1);
    i0 *= MR, i1 = min64(i0 + i1 * MR, p->m);
    j0 *= MK_GEMM_NR, j1 = min64(j0 + j1 * MK_GEMM_NR, p->n);
    const int panels = (int)cdiv(j1 - j0, MK_GEMM_NR);
    const size_t asz = mk_format_size(p->a.format), csz = mk_format_size(p->c.format);
    const char *A = (const char *)p->a.data + (size_t)(bi * p->a.bs) * asz;
    const float *B = (const float *)p->b.data + bi * p->b.bs;   /* in place, or to pack */
    if (g->b_mode == B_SHARED) pb = g->pb + it * g->pb_item;
    char *Cm = (char *)p->c.data + (size_t)(bi * p->c.bs + i0 * p->c.rs + j0 * p->c.cs) * csz;
    float *C = (float *)Cm;
    int64_t ldc = p->c.rs;
    if (g->c_buffer) {   /* accumulate the block in fp32, store it at the end */
        C = cbuf;
        ldc = j1 - j0;
        if (p->beta != 0.0f)
            for (int64_t i = 0; i < i1 - i0; i++)
                for (int64_t j = 0; j < j1 - j0; j++)
                    C[i * ldc + j] = load_elem(Cm, p->c.format, i * p->c.rs + j * p->c.cs);
    }
    const float *rows[MR_MAX];
    for (int64_t pc = 0; pc < p->k; pc += g->kc) {
        const int64_t kc = min64(p->k - pc, g->kc);
        const int first = pc == 0, last = pc + kc == p->k;
        mk_gemm_epilogue ep = {p->alpha, first ? p->beta : 1.0f, NULL,
                               last ? p->lo : -INFINITY, last ? p->hi : INFINITY};
        if (g->b_mode == B_PRIVATE) pack_b_block(p, bi, pc, kc, j0, j1 - j0, pb);
        for (int64_t i = i0; i < i1; i += MR) {
            const int mr = (int)min64(i1 - i, MR);
            tile_rows(g, A, i, mr, pc, kc, pa, rows);
            for (int q = 0; q < panels; q++) {
                const int64_t j = j0 + q * MK_GEMM_NR;
                const int nc = (int)min64(j1 - j, MK_GEMM_NR);
                /* packed A: the next tile's rows, into L2, in shares (A in place: the
                 * hardware prefetcher does better alone, 3136 x 576 x 64 3% faster) */
                if (i + MR < i1 && !g->a_in_place && p->a.cs == 1)
                    prefetch_part(A + (size_t)((i + MR) * p->a.rs + pc) * asz,
                                  p->a.rs * (int64_t)asz, min64(i1 - i - MR, MR),
                                  cdiv(kc * (int64_t)asz, 64), q, panels);
                float *c = C + (i - i0) * ldc + (j - j0);
                ep.bias = first && p->bias ? p->bias + j : NULL;
                if (g->b_mode == B_IN_PLACE) {
                    u->run_strided(mr, nc, kc, rows, zeros, B + pc * p->b.rs + j, p->b.rs, c,
                                   ldc, &ep);
                    continue;
                }
                const float *w = g->b_mode == B_SHARED ? shared_panel(g, pb, pc, kc, j)
                                                       : pb + (j - j0) * kc;
                if (!g->a_in_place && u->run_packed)
                    u->run_packed(mr, nc, kc, pa, w, c, ldc, &ep);
                else
                    u->run(mr, nc, kc, 1, rows, 0, zeros, w, c, ldc, &ep);
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
    /* the largest task: one more unit than an even share */
    const int64_t mb = (cdiv(g->p->m, g->u->mr) / g->row_blocks + 1) * g->u->mr;
    const int64_t nb = (cdiv(g->p->n, MK_GEMM_NR) / g->col_blocks + 1) * MK_GEMM_NR;
    const size_t pb_floats = g->b_mode == B_PRIVATE ? (size_t)(g->kc * nb) : 0;
    const size_t pa_floats = g->a_in_place ? 0 : (size_t)g->u->mr * MK_GEMM_PACKED_LDA;
    const size_t c_floats = g->c_buffer ? (size_t)(mb * nb) : 0;
    const size_t bytes = (pb_floats + pa_floats + c_floats) * sizeof(float);
    float *scratch = bytes ? scratch_get(bytes) : NULL;
    if (bytes && !scratch) { atomic_store(&g->failed, 1); return; }
    for (int64_t t = begin; t < end; t++)
        sgemm_task(g, t, scratch, scratch + pb_floats, scratch + pb_floats + pa_floats);
    scratch_put(scratch);
}

static mk_status sgemm(const mk_sgemm_args *p, mk_pool *pool, int serial) {
    sgemm_plan g = {.p = p, .u = mk_gemm_ukernel_active()};
    const int64_t MR = g.u->mr, m = p->m, n = p->n, k = p->k;
    const int64_t row_tiles = cdiv(m, MR), panels = cdiv(n, MK_GEMM_NR);
    int64_t items = p->batch;   /* per round */
    if (p->b.format == MK_FMT_F32 && p->b.cs == 1 && (m <= MR || k <= 16384 / n)) {
        g.b_mode = B_IN_PLACE;
    } else if (panels <= SHARED_FLOATS / MK_GEMM_NR / k) {
        g.b_mode = B_SHARED;
        g.pb_item = p->b.bs == 0 ? 0 : panels * MK_GEMM_NR * k;
        if (p->b.bs != 0) items = min64(p->batch, SHARED_FLOATS / g.pb_item);
        g.pb = scratch_get((size_t)(p->b.bs == 0 ? 1 : items) * panels * MK_GEMM_NR * k * 4);
        if (!g.pb) return MK_ENOMEM;
    } else {
        g.b_mode = B_PRIVATE;
    }
    /* K blocks of <= 384 (2% faster than 256 at 1024^3 and 2048^3), unless blocks of <= 256
     * let A be read in place (6% faster for 3136 x 576 x 64); B packed for few rows: <= 192
     * and slices of up to 1024 columns (64 x 4096 x 1024: 12% faster than 384 x 512). A tile
     * of whole adjacent rows (a contiguous block) that fits the L1 with room for B is read in
     * place, K in one block, when B is not private (C written once, A streamed in order:
     * 3136 x 576 x 64 8% faster, 256^3 and 512^3 2%) */
    const int thin = g.b_mode == B_PRIVATE && row_tiles <= THIN_TILES;
    g.kc = cdiv(k, cdiv(k, thin ? KC_THIN : KC_MAX));
    g.nb_max = thin ? NB_THIN : NB_MAX;
    g.a_in_place = a_in_place(p, (int)min64(m, MR), g.kc);
    if (g.b_mode != B_PRIVATE && p->a.format == MK_FMT_F32 && p->a.cs == 1 && p->a.rs == k
        && k <= KC_WHOLE && k * MR * (int64_t)sizeof(float) <= TILE_WHOLE_BYTES) {
        g.kc = k;
        g.a_in_place = 1;
    } else if (!thin && !g.a_in_place
               && a_in_place(p, (int)min64(m, MR), cdiv(k, cdiv(k, KC_IN_PLACE)))) {
        g.kc = cdiv(k, cdiv(k, KC_IN_PLACE));
        g.a_in_place = 1;
    }
    g.c_buffer = p->c.format != MK_FMT_F32 || p->c.cs != 1;
    g.col_blocks = cdiv(panels, g.nb_max / MK_GEMM_NR);
    g.row_blocks = 1;
    /* at least one task per thread (not more: 4 smaller tasks for 2 threads were 2-3.5% slower
     * at one thread, 1024^3); the cut does not change any result */
    const int64_t threads = serial ? 1 : mk_pool_num_threads(pool);
    int64_t want = cdiv(threads, items * g.col_blocks);
    if (g.b_mode == B_SHARED || m > n)
        g.row_blocks = min64(want, row_tiles);
    else
        g.col_blocks = max64(g.col_blocks, min64(cdiv(threads, items), panels));
    if (g.c_buffer) {   /* a task's fp32 block of an fp16 or strided C: <= C_BUFFER_FLOATS */
        int64_t nb = (panels / g.col_blocks + 1) * MK_GEMM_NR;
        g.row_blocks = max64(g.row_blocks, cdiv(row_tiles, max64(C_BUFFER_FLOATS / nb / MR, 1)));
    }
    for (g.item0 = 0; g.item0 < p->batch; g.item0 += g.items) {
        g.items = min64(items, p->batch - g.item0);
        if (g.b_mode == B_SHARED && (p->b.bs != 0 || g.item0 == 0)) {
            int64_t tasks = (p->b.bs == 0 ? 1 : g.items) * cdiv(panels, PACK_PANELS);
            mk_parallel_for(pool, tasks, serial ? tasks : 1, pack_tasks, &g);
        }
        int64_t tasks = g.items * g.row_blocks * g.col_blocks;
        mk_parallel_for(pool, tasks, serial ? tasks : 1, sgemm_tasks, &g);
    }
    scratch_put(g.pb);
    return atomic_load(&g.failed) ? MK_ENOMEM : MK_OK;
}

/* ---- thin products (one row or one column of output): bound by memory, not FMAs, so loops
 * that read each operand once, in address order, at the speed of memory (one row: the
 * micro-kernel's gemv, 8 rows of B per pass over the sums; one column: plain C). */

#define THIN_CHUNK 256   /* rows per dot_tasks task */
#define GEMV_MAX 4096    /* columns per gemv_tasks task: B rows read in long runs (few pages) */

/* Columns per task: one task per thread (at most GEMV_MAX columns). The cut may follow the
 * thread count: each sum is taken in the same order whoever computes it. On one thread, whole
 * rows of 1 x 4096 x 4096 instead of two halves read B 2.5% faster (C harness, alternating
 * builds call by call, three runs of 150 calls: medians 0.972-0.976). */
static int64_t gemv_chunk(int64_t n, int threads) {
    int64_t c = cdiv(cdiv(n, threads), 64) * 64;
    return c < 256 ? 256 : c > GEMV_MAX ? GEMV_MAX : c;
}

static void store_out(const mk_sgemm_args *p, char *c, int64_t at, float acc, float bias) {
    float v = p->alpha * acc;
    if (p->beta != 0.0f) v += p->beta * load_elem(c, p->c.format, at);
    v += bias;
    v = v < p->lo ? p->lo : v;   /* as the micro-kernels: a NaN is kept */
    v = v > p->hi ? p->hi : v;
    if (p->c.format == MK_FMT_F16) ((uint16_t *)c)[at] = mk_ew_f32_to_f16(v);
    else ((float *)c)[at] = v;
}

typedef struct gemv_plan { const mk_sgemm_args *p; int64_t chunk; } gemv_plan;

/* m == 1, B fp32 with unit column stride: C[0, j] for a chunk of columns, B row by row. */
static void gemv_tasks(void *ctx, int64_t begin, int64_t end) {
    const mk_sgemm_args *p = ((gemv_plan *)ctx)->p;
    const int64_t chunk = ((gemv_plan *)ctx)->chunk;
    const mk_gemm_ukernel *u = mk_gemm_ukernel_active();
    for (int64_t t = begin; t < end; t++) {
        int64_t bi = t / cdiv(p->n, chunk), j0 = t % cdiv(p->n, chunk) * chunk;
        int64_t nc = p->n - j0 < chunk ? p->n - j0 : chunk;
        const char *A = (const char *)p->a.data + (size_t)(bi * p->a.bs) * mk_format_size(p->a.format);
        const float *B = (const float *)p->b.data + bi * p->b.bs + j0;
        char *C = (char *)p->c.data + (size_t)(bi * p->c.bs) * mk_format_size(p->c.format);
        float acc[GEMV_MAX] = {0}, x[MK_GEMM_GEMV_ROWS];
        for (int64_t q = 0; q < p->k; q += MK_GEMM_GEMV_ROWS) {   /* rows per pass over acc */
            int rows = (int)min64(p->k - q, MK_GEMM_GEMV_ROWS);
            for (int r = 0; r < rows; r++) x[r] = load_elem(A, p->a.format, (q + r) * p->a.cs);
            u->gemv(rows, nc, x, B + q * p->b.rs, p->b.rs, acc);
        }
        for (int64_t j = 0; j < nc; j++)
            store_out(p, C, (j0 + j) * p->c.cs, acc[j], p->bias ? p->bias[j0 + j] : 0.0f);
    }
}

/* n == 1, A fp32 with unit column stride: C[i, 0] = dot(A row i, B column) for a chunk of
 * rows, MK_GEMM_DOT_ROWS rows per call of the micro-kernel's `dot` (its order is fixed). */
typedef struct dot_plan { const mk_sgemm_args *p; _Atomic int failed; } dot_plan;

static void dot_tasks(void *ctx, int64_t begin, int64_t end) {
    const mk_sgemm_args *p = ((dot_plan *)ctx)->p;
    const mk_gemm_ukernel *u = mk_gemm_ukernel_active();
    float *x = malloc((size_t)p->k * sizeof(float));
    if (!x) { atomic_store(&((dot_plan *)ctx)->failed, 1); return; }
    for (int64_t t = begin; t < end; t++) {
        int64_t bi = t / cdiv(p->m, THIN_CHUNK), i0 = t % cdiv(p->m, THIN_CHUNK) * THIN_CHUNK;
        int64_t mc = p->m - i0 < THIN_CHUNK ? p->m - i0 : THIN_CHUNK;
        const float *A = (const float *)p->a.data + bi * p->a.bs + i0 * p->a.rs;
        const char *B = (const char *)p->b.data + (size_t)(bi * p->b.bs) * mk_format_size(p->b.format);
        char *C = (char *)p->c.data + (size_t)(bi * p->c.bs) * mk_format_size(p->c.format);
        for (int64_t q = 0; q < p->k; q++) x[q] = load_elem(B, p->b.format, q * p->b.rs);
        for (int64_t i = 0; i < mc; i += MK_GEMM_DOT_ROWS) {
            const int rows = (int)min64(MK_GEMM_DOT_ROWS, mc - i);
            float s[MK_GEMM_DOT_ROWS];
            u->dot(rows, p->k, A + i * p->a.rs, p->a.rs, x, s);
            for (int r = 0; r < rows; r++)
                store_out(p, C, (i0 + i + r) * p->c.rs, s[r], p->bias ? p->bias[0] : 0.0f);
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
        gemv_plan g = {p, gemv_chunk(p->n, grain_all == 1 ? mk_pool_num_threads(pool) : 1)};
        mk_parallel_for(pool, p->batch * cdiv(p->n, g.chunk), grain_all, gemv_tasks, &g);
        return MK_OK;
    }
    if (p->n == 1 && p->a.format == MK_FMT_F32 && p->a.cs == 1) {
        dot_plan d = {p, 0};
        mk_parallel_for(pool, p->batch * cdiv(p->m, THIN_CHUNK), grain_all, dot_tasks, &d);
        return atomic_load(&d.failed) ? MK_ENOMEM : MK_OK;
    }
    return sgemm(p, pool, fmas < SERIAL_FMAS);
}
