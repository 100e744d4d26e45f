/* A small pthread pool: one parallel_for at a time, the caller takes part.
 *
 * Our own pool (not OpenMP) so it never fights torch's or numpy's pools in one process.
 * Chunk boundaries come from `grain` alone, so which thread runs a chunk never changes a
 * result. Each thread first runs its own share, a contiguous run of chunks (the caller the
 * first), then takes chunks from the others' shares: consecutive layers split an image the same
 * way, so a thread mostly reads the rows it wrote itself, from its own cache. The caller waits
 * only for chunks still running, never for idle workers; idle workers poll briefly for the
 * next job, then sleep on a condition variable. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

/* The job a parallel_for publishes. A worker copies it under `mu`, then claims chunks from
 * the shares' counters: (job generation << 32) | next chunk of that share. Claiming by
 * compare-and-swap against its own generation means a worker that wakes late can never take
 * a chunk of the next job and run it with the old job's function. */
typedef struct job {
    mk_task_fn fn;
    void *ctx;
    int64_t n, grain, num_chunks;
    int shares;          /* participants when it was published: share k is chunks
                          * [k * num_chunks / shares, (k + 1) * num_chunks / shares) */
    uint64_t generation;
} job;

/* One share's next chunk, on its own cache line. */
typedef struct share {
    _Atomic uint64_t next;
    char pad[64 - sizeof(uint64_t)];
} share;

/* Idle workers poll for the next job WORKER_SPIN_NS before sleeping, and the caller polls
 * CALLER_SPIN_NS for the last chunks before it sleeps. The kernels of a command buffer, and
 * of a loop of command buffers, follow each other within tens of microseconds (the caller's
 * last chunk and Python's encode lie between them), while waking a sleeping thread costs
 * tens of microseconds on a quiet machine and up to a scheduler slice on a busy one. */
#define WORKER_SPIN_NS 200000
#define CALLER_SPIN_NS 50000

struct mk_pool {
    pthread_mutex_t run_lock;   /* held by the caller of the current parallel_for */
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    atomic_int num_threads;     /* participants, the caller included; written under run_lock,
                                 * read without it by parallel_for's quick check */
    int num_workers;            /* threads running now (num_threads - 1 once started) */
    pthread_t *threads;
    share *shares;              /* num_workers + 1: the caller's is share 0 */
    atomic_int next_worker;     /* numbers the workers as they start: worker i owns share i */
    uint64_t start_generation;  /* the last job published before the workers started: they
                                 * join the next one, even if it was published before they ran */
    int shutdown;               /* under mu */
    int sleepers;               /* workers waiting on `wake`, under mu */
    int caller_waiting;         /* the caller waits on `done`, under mu */
    job current;                /* under mu */
    _Atomic uint64_t generation;   /* current.generation, readable while spinning */
    _Atomic uint64_t finished;     /* chunks of the current job done */
};

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Poll until *word differs from `value` or `ns` have passed; returns the last value read. */
static uint64_t spin_while_equal(const _Atomic uint64_t *word, uint64_t value, uint64_t ns) {
    const uint64_t deadline = now_ns() + ns;
    for (unsigned i = 1;; i++) {
        uint64_t v = atomic_load_explicit(word, memory_order_acquire);
        if (v != value || (i % 64 == 0 && now_ns() > deadline)) return v;
#if MK_X86
        _mm_pause();
#endif
    }
}

static int64_t share_begin(const job *j, int k) { return j->num_chunks * k / j->shares; }

/* Claim chunk after chunk of job `j` and run them, share `self` first, then the others';
 * returns when none is left. */
static void run_chunks(struct mk_pool *p, const job *j, int self) {
    const uint64_t tag = (uint64_t)j->generation << 32;
    for (int i = 0; i < j->shares; i++) {
        const int k = (self + i) % j->shares;
        _Atomic uint64_t *next = &p->shares[k].next;
        const int64_t end = share_begin(j, k + 1);
        uint64_t t = atomic_load_explicit(next, memory_order_relaxed);
        while ((t & ~(uint64_t)UINT32_MAX) == tag && (int64_t)(t & UINT32_MAX) < end) {
            if (!atomic_compare_exchange_weak_explicit(next, &t, t + 1, memory_order_acquire,
                                                       memory_order_relaxed))
                continue;   /* t now holds the fresh value */
            const int64_t begin = (int64_t)(t & UINT32_MAX) * j->grain;
            j->fn(j->ctx, begin, begin + j->grain < j->n ? begin + j->grain : j->n);
            if (atomic_fetch_add_explicit(&p->finished, 1, memory_order_acq_rel) + 1 ==
                (uint64_t)j->num_chunks) {
                pthread_mutex_lock(&p->mu);
                if (p->caller_waiting) pthread_cond_signal(&p->done);
                pthread_mutex_unlock(&p->mu);
            }
            t = atomic_load_explicit(next, memory_order_relaxed);
        }
    }
}

static void *worker_main(void *arg) {
    struct mk_pool *p = arg;
    const int self = atomic_fetch_add_explicit(&p->next_worker, 1, memory_order_relaxed) + 1;
    pthread_mutex_lock(&p->mu);
    uint64_t seen = p->start_generation;
    for (;;) {
        if (!p->shutdown && p->current.generation == seen) {
            pthread_mutex_unlock(&p->mu);
            spin_while_equal(&p->generation, seen, WORKER_SPIN_NS);
            pthread_mutex_lock(&p->mu);
            p->sleepers++;
            while (!p->shutdown && p->current.generation == seen) pthread_cond_wait(&p->wake, &p->mu);
            p->sleepers--;
        }
        if (p->shutdown) break;
        job j = p->current;
        seen = j.generation;
        pthread_mutex_unlock(&p->mu);
        mk_fpstate fp = fp_enter();
        run_chunks(p, &j, self);   /* self < j.shares: workers start before a job is published */
        fp_leave(fp);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void free_workers(struct mk_pool *p) {
    free(p->threads);
    free(p->shares);
    p->threads = NULL;
    p->shares = NULL;
    p->num_workers = 0;
}

static void stop_workers(struct mk_pool *p) {
    if (!p->num_workers) return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->num_workers; i++) pthread_join(p->threads[i], NULL);
    free_workers(p);
    p->shutdown = 0;
}

/* Called with run_lock held. A thread that cannot be created just means fewer helpers (none:
 * the caller runs every job alone and the next job tries again). */
static void start_workers(struct mk_pool *p) {
    int want = atomic_load_explicit(&p->num_threads, memory_order_relaxed) - 1;
    if (p->num_workers || want <= 0) return;
    p->threads = calloc((size_t)want, sizeof *p->threads);
    p->shares = aligned_alloc(64, (size_t)(want + 1) * sizeof *p->shares);
    if (p->threads && p->shares) {
        for (int i = 0; i <= want; i++) atomic_init(&p->shares[i].next, 0);
        atomic_store_explicit(&p->next_worker, 0, memory_order_relaxed);
        p->start_generation = p->current.generation;
        while (p->num_workers < want &&
               pthread_create(&p->threads[p->num_workers], NULL, worker_main, p) == 0)
            p->num_workers++;
    }
    if (!p->num_workers) free_workers(p);
}

mk_pool *mk_pool_create(int num_threads) {
    struct mk_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->num_threads, num_threads < 1 ? 1 : num_threads);
    atomic_init(&p->generation, 0);
    atomic_init(&p->next_worker, 0);
    atomic_init(&p->finished, 0);
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
    if (num_chunks > UINT32_MAX) {   /* a share counts chunks in 32 bits: merge chunks */
        grain *= (num_chunks + UINT32_MAX - 1) / UINT32_MAX;
        num_chunks = (n + grain - 1) / grain;
    }
    mk_fpstate fp = fp_enter();
    /* One chunk, one thread, the pool busy with another caller, or no worker could be
     * started: run here, in order. */
    int alone = !p || num_chunks == 1 ||
                atomic_load_explicit(&p->num_threads, memory_order_relaxed) == 1 ||
                pthread_mutex_trylock(&p->run_lock);
    if (!alone) {
        start_workers(p);
        if (!p->num_workers) {
            pthread_mutex_unlock(&p->run_lock);
            alone = 1;
        }
    }
    if (alone) {
        for (int64_t k = 0; k < num_chunks; k++) {
            int64_t begin = k * grain;
            fn(ctx, begin, begin + grain < n ? begin + grain : n);
        }
        fp_leave(fp);
        return;
    }
    pthread_mutex_lock(&p->mu);
    const uint64_t g = (p->current.generation + 1) & UINT32_MAX;
    p->current = (job){fn, ctx, n, grain, num_chunks, p->num_workers + 1, g};
    atomic_store_explicit(&p->finished, 0, memory_order_relaxed);
    for (int k = 0; k < p->current.shares; k++)
        atomic_store_explicit(&p->shares[k].next, (uint64_t)g << 32 | (uint64_t)share_begin(&p->current, k),
                              memory_order_release);
    atomic_store_explicit(&p->generation, g, memory_order_release);
    if (p->sleepers) pthread_cond_broadcast(&p->wake);
    const job j = p->current;
    pthread_mutex_unlock(&p->mu);

    run_chunks(p, &j, 0);

    /* Wait for the chunks other threads still run (not for idle workers to check in): the
     * count only grows, so polling while it is unchanged suffices. */
    const uint64_t all = (uint64_t)num_chunks;
    uint64_t done = atomic_load_explicit(&p->finished, memory_order_acquire);
    while (done < all) {
        const uint64_t before = done;
        if ((done = spin_while_equal(&p->finished, before, CALLER_SPIN_NS)) != before) continue;
        break;
    }
    if (atomic_load_explicit(&p->finished, memory_order_acquire) < all) {
        pthread_mutex_lock(&p->mu);
        p->caller_waiting = 1;
        while (atomic_load_explicit(&p->finished, memory_order_acquire) < all)
            pthread_cond_wait(&p->done, &p->mu);
        p->caller_waiting = 0;
        pthread_mutex_unlock(&p->mu);
    }
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
