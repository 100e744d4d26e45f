/* The arena: offset planning for a command buffer's temporaries, and the per-device cache of
 * backing blocks the plans are laid on.
 *
 * Planning happens at commit, when every temporary's lifetime [first, last] (command indices)
 * is known. We use greedy-by-size with offsets (Pisarchyk & Lee, "Efficient Memory Management
 * for Deep Neural Net Inference", 2020): place the largest block first, each in the smallest
 * gap between already-placed blocks whose lifetimes overlap its own, else after the highest.
 * Large blocks placed first leave gaps that smaller ones fill, which is why it lands within a
 * few percent of the live-bytes lower bound on real networks. */
#define _DEFAULT_SOURCE   /* MAP_ANONYMOUS */
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "mpskernels.h"

/* Large blocks are mapped directly so that trim() really gives them back: glibc's free()
 * keeps a freed chunk in its heap once its dynamic mmap threshold has grown past that size.
 * Sanitizer builds keep malloc, whose red zones around each block catch overruns. */
#if (defined(__unix__) || defined(__APPLE__)) && !defined(__SANITIZE_ADDRESS__) \
    && !defined(__SANITIZE_THREAD__)
#include <sys/mman.h>
#define MK_MMAP_MIN_BYTES (64 << 10)
#endif

static void *block_data_alloc(int64_t size) {
#ifdef MK_MMAP_MIN_BYTES
    if (size >= MK_MMAP_MIN_BYTES) {
        void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;   /* page aligned, so MK_ALIGNMENT aligned */
    }
#endif
    return aligned_alloc(MK_ALIGNMENT, (size_t)size);
}

static int64_t align_up(int64_t v) { return (v + MK_ALIGNMENT - 1) / MK_ALIGNMENT * MK_ALIGNMENT; }

typedef struct item { int64_t size; int32_t first, index; } item;
static int by_size_desc(const void *pa, const void *pb) {
    const item *a = pa, *b = pb;
    if (a->size != b->size) return a->size > b->size ? -1 : 1;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    return a->index < b->index ? -1 : (a->index > b->index);
}

typedef struct span { int64_t begin, end; } span;
static int by_begin(const void *pa, const void *pb) {
    const span *a = pa, *b = pb;
    return a->begin < b->begin ? -1 : (a->begin > b->begin);
}

typedef struct event { int32_t time; int64_t delta; } event;
static int by_time(const void *pa, const void *pb) {
    const event *a = pa, *b = pb;
    if (a->time != b->time) return a->time < b->time ? -1 : 1;
    return a->delta < b->delta ? -1 : (a->delta > b->delta);  /* frees before allocations */
}

mk_status mk_arena_plan(int32_t count, const int64_t *size, const int32_t *first,
                        const int32_t *last, int64_t *offset, mk_arena_stats *stats) {
    memset(stats, 0, sizeof *stats);
    if (count <= 0) return MK_OK;
    for (int32_t i = 0; i < count; i++)
        if (size[i] < 0 || first[i] > last[i]) return MK_EINVAL;

    item *order = malloc((size_t)count * sizeof *order);
    int32_t *placed = malloc((size_t)count * sizeof *placed);
    span *busy = malloc((size_t)count * sizeof *busy);
    event *events = malloc((size_t)count * 2 * sizeof *events);
    if (!order || !placed || !busy || !events) {
        free(order); free(placed); free(busy); free(events);
        return MK_ENOMEM;
    }
    for (int32_t i = 0; i < count; i++) order[i] = (item){align_up(size[i]), first[i], i};
    qsort(order, (size_t)count, sizeof *order, by_size_desc);

    int32_t num_placed = 0;
    int64_t peak = 0;
    for (int32_t k = 0; k < count; k++) {
        int32_t i = order[k].index;
        int64_t need = order[k].size;
        int32_t nb = 0;
        for (int32_t m = 0; m < num_placed; m++) {
            int32_t j = placed[m];
            if (first[j] <= last[i] && first[i] <= last[j])
                busy[nb++] = (span){offset[j], offset[j] + align_up(size[j])};
        }
        qsort(busy, (size_t)nb, sizeof *busy, by_begin);
        int64_t best = -1, best_gap = 0, cursor = 0;
        for (int32_t m = 0; m < nb; m++) {
            int64_t gap = busy[m].begin - cursor;
            if (gap >= need && (best < 0 || gap < best_gap)) { best = cursor; best_gap = gap; }
            if (busy[m].end > cursor) cursor = busy[m].end;
        }
        offset[i] = best >= 0 ? best : cursor;
        if (offset[i] + need > peak) peak = offset[i] + need;
        placed[num_placed++] = i;
        stats->requested_bytes += need;
    }
    stats->peak_bytes = peak;

    for (int32_t i = 0; i < count; i++) {
        int64_t need = align_up(size[i]);
        events[2 * i] = (event){first[i], need};
        events[2 * i + 1] = (event){last[i] + 1, -need};
    }
    qsort(events, (size_t)count * 2, sizeof *events, by_time);
    int64_t live = 0;
    for (int32_t i = 0; i < 2 * count; i++) {
        live += events[i].delta;
        if (live > stats->lower_bound_bytes) stats->lower_bound_bytes = live;
    }
    free(order); free(placed); free(busy); free(events);
    return MK_OK;
}

/* ---- the block cache ------------------------------------------------------------------ */

struct mk_block_cache {
    pthread_mutex_t mu;
    mk_block *idle;       /* blocks not lent out, any order */
    int64_t idle_bytes, total_bytes;
};

mk_block_cache *mk_block_cache_create(void) {
    mk_block_cache *c = calloc(1, sizeof *c);
    if (c) pthread_mutex_init(&c->mu, NULL);
    return c;
}

static void free_block(mk_block *b) {
#ifdef MK_MMAP_MIN_BYTES
    if (b->size >= MK_MMAP_MIN_BYTES) munmap(b->data, (size_t)b->size);
    else
#endif
        free(b->data);
    free(b);
}

int64_t mk_block_cache_trim(mk_block_cache *c) {
    pthread_mutex_lock(&c->mu);
    mk_block *b = c->idle;
    int64_t freed = c->idle_bytes;
    c->idle = NULL;
    c->total_bytes -= c->idle_bytes;
    c->idle_bytes = 0;
    pthread_mutex_unlock(&c->mu);
    while (b) { mk_block *next = b->next; free_block(b); b = next; }
    return freed;
}

void mk_block_cache_destroy(mk_block_cache *c) {
    if (!c) return;
    mk_block_cache_trim(c);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

mk_block *mk_block_cache_acquire(mk_block_cache *c, int64_t size, int *fresh) {
    size = align_up(size < 1 ? 1 : size);
    *fresh = 0;
    pthread_mutex_lock(&c->mu);
    /* The smallest idle block that fits. */
    mk_block **best = NULL;
    for (mk_block **p = &c->idle; *p; p = &(*p)->next)
        if ((*p)->size >= size && (!best || (*p)->size < (*best)->size)) best = p;
    if (best) {
        mk_block *b = *best;
        *best = b->next;
        b->next = NULL;
        c->idle_bytes -= b->size;
        pthread_mutex_unlock(&c->mu);
        return b;
    }
    /* Nothing fits: idle blocks smaller than this request are dropped rather than kept
     * beside a bigger one, so the cache follows the workload instead of ratcheting up. */
    mk_block *drop = NULL;
    for (mk_block **p = &c->idle; *p;) {
        mk_block *b = *p;
        *p = b->next;
        b->next = drop;
        drop = b;
        c->idle_bytes -= b->size;
        c->total_bytes -= b->size;
    }
    pthread_mutex_unlock(&c->mu);
    while (drop) { mk_block *next = drop->next; free_block(drop); drop = next; }

    mk_block *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->data = block_data_alloc(size);
    if (!b->data) { free(b); return NULL; }
    b->size = size;
    *fresh = 1;
    pthread_mutex_lock(&c->mu);
    c->total_bytes += size;
    pthread_mutex_unlock(&c->mu);
    return b;
}

void mk_block_cache_release(mk_block_cache *c, mk_block *b) {
    if (!b) return;
    pthread_mutex_lock(&c->mu);
    b->next = c->idle;
    c->idle = b;
    c->idle_bytes += b->size;
    pthread_mutex_unlock(&c->mu);
}

int64_t mk_block_cache_idle_bytes(mk_block_cache *c) {
    pthread_mutex_lock(&c->mu);
    int64_t v = c->idle_bytes;
    pthread_mutex_unlock(&c->mu);
    return v;
}

int64_t mk_block_cache_total_bytes(mk_block_cache *c) {
    pthread_mutex_lock(&c->mu);
    int64_t v = c->total_bytes;
    pthread_mutex_unlock(&c->mu);
    return v;
}
