/* A small pthread pool: one parallel_for at a time, the caller takes part.
 *
 * Our own pool (not OpenMP) so it never fights torch's or numpy's pools in one process.
 * Chunk boundaries come from `grain` alone, so which thread runs a chunk never changes a
 * result. Idle workers sleep on a condition variable: nothing spins between jobs. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "mpskernels.h"

#if MK_X86
#include <xmmintrin.h>
#define MK_FTZ_DAZ 0x8040u  /* MXCSR flush-to-zero (bit 15) | denormals-are-zero (bit 6) */
typedef unsigned mk_fpstate;
static mk_fpstate fp_enter(void) { mk_fpstate s = _mm_getcsr(); _mm_setcsr(s | MK_FTZ_DAZ); return s; }
static void fp_leave(mk_fpstate s) { _mm_setcsr(s); }
#else  /* other architectures: kernels run in the caller's floating-point mode */
typedef int mk_fpstate;
static mk_fpstate fp_enter(void) { return 0; }
static void fp_leave(mk_fpstate s) { (void)s; }
#endif

typedef struct worker_arg { struct mk_pool *pool; uint64_t generation0; } worker_arg;

struct mk_pool {
    pthread_mutex_t run_lock;   /* held by the caller of the current parallel_for */
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    atomic_int num_threads;     /* participants, the caller included; written under run_lock,
                                 * read without it by parallel_for's quick check */
    int num_workers;            /* threads running now (num_threads - 1 once started) */
    pthread_t *threads;
    worker_arg *args;
    uint64_t generation;        /* bumped for each job and for shutdown */
    int shutdown, checked_in;
    /* the current job */
    mk_task_fn fn;
    void *ctx;
    int64_t n, grain, num_chunks;
    atomic_llong next_chunk;
};

static void run_chunks(struct mk_pool *p) {
    for (;;) {
        int64_t k = atomic_fetch_add_explicit(&p->next_chunk, 1, memory_order_relaxed);
        if (k >= p->num_chunks) return;
        int64_t begin = k * p->grain;
        int64_t end = begin + p->grain < p->n ? begin + p->grain : p->n;
        p->fn(p->ctx, begin, end);
    }
}

static void *worker_main(void *arg) {
    worker_arg *w = arg;
    struct mk_pool *p = w->pool;
    uint64_t seen = w->generation0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->shutdown && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
        if (p->shutdown) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        mk_fpstate fp = fp_enter();
        run_chunks(p);
        fp_leave(fp);
        pthread_mutex_lock(&p->mu);
        if (++p->checked_in == p->num_workers) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void stop_workers(struct mk_pool *p) {
    if (!p->num_workers) return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->num_workers; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    free(p->args);
    p->threads = NULL;
    p->args = NULL;
    p->num_workers = 0;
    p->shutdown = 0;
}

/* Called with run_lock held. A thread that cannot be created just means fewer helpers. */
static void start_workers(struct mk_pool *p) {
    int want = atomic_load_explicit(&p->num_threads, memory_order_relaxed) - 1;
    if (p->num_workers == want || want <= 0) return;
    p->threads = calloc((size_t)want, sizeof *p->threads);
    p->args = calloc((size_t)want, sizeof *p->args);
    if (!p->threads || !p->args) {
        free(p->threads);
        free(p->args);
        p->threads = NULL;
        p->args = NULL;
        return;
    }
    for (int i = 0; i < want; i++) {
        p->args[i].pool = p;
        p->args[i].generation0 = p->generation;
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->args[i]) != 0) break;
        p->num_workers++;
    }
}

mk_pool *mk_pool_create(int num_threads) {
    struct mk_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->num_threads, num_threads < 1 ? 1 : num_threads);
    return p;
}

void mk_pool_destroy(mk_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->run_lock);
    stop_workers(p);
    pthread_mutex_unlock(&p->run_lock);
    pthread_mutex_destroy(&p->run_lock);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p);
}

int mk_pool_num_threads(const mk_pool *p) {
    return p ? atomic_load_explicit(&p->num_threads, memory_order_relaxed) : 1;
}

mk_status mk_pool_set_num_threads(mk_pool *p, int num_threads) {
    if (num_threads < 1) return MK_EINVAL;
    pthread_mutex_lock(&p->run_lock);
    if (num_threads != atomic_load_explicit(&p->num_threads, memory_order_relaxed)) {
        stop_workers(p);
        atomic_store_explicit(&p->num_threads, num_threads, memory_order_relaxed);
    }
    pthread_mutex_unlock(&p->run_lock);
    return MK_OK;
}

void mk_parallel_for(mk_pool *p, int64_t n, int64_t grain, mk_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t num_chunks = (n + grain - 1) / grain;
    mk_fpstate fp = fp_enter();
    /* One chunk, one thread, or the pool busy with another caller: run here, in order. */
    if (!p || num_chunks == 1 || atomic_load_explicit(&p->num_threads, memory_order_relaxed) == 1
        || pthread_mutex_trylock(&p->run_lock)) {
        for (int64_t k = 0; k < num_chunks; k++) {
            int64_t begin = k * grain;
            fn(ctx, begin, begin + grain < n ? begin + grain : n);
        }
        fp_leave(fp);
        return;
    }
    start_workers(p);
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->grain = grain;
    p->num_chunks = num_chunks;
    atomic_store(&p->next_chunk, 0);
    p->checked_in = 0;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    run_chunks(p);

    pthread_mutex_lock(&p->mu);
    while (p->checked_in < p->num_workers) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->run_lock);
    fp_leave(fp);
}

/* CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota. */
int mk_affinity_cpu_count(void) {
    int count = 1;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) count = CPU_COUNT(&set);
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f) {
        long long quota, period;
        if (fscanf(f, "%lld %lld", &quota, &period) == 2 && quota > 0 && period > 0) {
            int cap = (int)((quota + period - 1) / period);
            if (cap >= 1 && cap < count) count = cap;
        }
        fclose(f);
    }
#endif
    return count < 1 ? 1 : count;
}
