/* Command queues and command buffers.
 *
 * A queue keeps its buffers in enqueue order; its worker thread runs the head once it is
 * committed. A thread that waits for the head buffer before the worker has taken it runs the
 * buffer itself: the common "commit, then wait" costs no thread hand-off. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "mpskernels.h"

/* Waking a sleeping thread costs several microseconds (more in a VM), more than a small
 * buffer takes to run. So a waiter looks for MK_WAIT_SPIN_NS before it sleeps, and an idle
 * worker looks for the next commit MK_IDLE_SPIN_NS (while it does, commit needs no wake-up).
 * Both are short: on a machine with few cores a looking thread takes a core from kernels.
 * The worker leaves a fresh commit alone for MK_HANDOFF_GRACE_NS: the common "commit, then
 * wait" then runs on the waiting thread, which returns the moment the work is done instead of
 * being woken by the worker (a wake-up costs 10-30 us, more than a small kernel).
 * While commits keep coming (one in the last MK_NAP_WINDOW_NS), the worker naps in steps of
 * MK_NAP_NS instead of sleeping until woken, also while another thread runs a buffer, so a
 * commit costs no wake-up; a buffer nobody waits for then starts at most MK_NAP_NS late (a
 * buffer ending with committed work queued behind it wakes the worker at once). Each wake-up,
 * a nap's end or a commit's signal, is a context switch, and on a busy machine the switch can
 * hand the core running the kernels to another process: a worker that slept until a commit
 * woke it (and napped 0.2 ms when idle) preempted the thread running a 150 us reduction
 * 0.7-1.6 times per call (other jobs on the machine); with 2 ms naps, 0.1-0.4 times. */
#define MK_WAIT_SPIN_NS 10000
#define MK_IDLE_SPIN_NS 30000
#define MK_HANDOFF_GRACE_NS 20000
#define MK_NAP_NS 2000000
#define MK_NAP_WINDOW_NS 50000000

#if MK_X86
#include <immintrin.h>
static void cpu_relax(void) { _mm_pause(); }
#else
static void cpu_relax(void) {}
#endif
#include <time.h>

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Look (without the lock) until stop(arg) or `ns` pass; returns stop(arg). */
static int spin(int (*stop)(const void *), const void *arg, int64_t ns) {
    int64_t deadline = now_ns() + ns;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (stop(arg)) return 1;
            cpu_relax();
        }
        if (now_ns() > deadline) return stop(arg);
    }
}

enum { ST_NOT_ENQUEUED = 0, ST_ENQUEUED = 1, ST_COMMITTED = 2, ST_SCHEDULED = 3,
       ST_COMPLETED = 4, ST_ERROR = 5 };

struct mk_buffer {
    mk_queue *queue;
    mk_buffer *next;            /* in the queue's list while enqueued */
    atomic_int status;
    atomic_int finished;        /* ran, notified, waiters released */
    mk_command *commands;
    int32_t count;
    mk_pool *pool;
    mk_block_cache *cache;
    mk_block *block;
    mk_notify_fn notify;
    void *user;
    int32_t failed_command;
    mk_status failure;
    int64_t committed_ns;       /* when commit() was called (the worker's grace period) */
};

struct mk_queue {
    pthread_mutex_t mu;
    pthread_cond_t work, changed;   /* work: for the worker; changed: for waiters */
    mk_buffer *head, *tail;         /* enqueued, not yet taken */
    int running;                    /* a buffer of this queue is executing */
    int worker_asleep;              /* the worker waits on `work` with no time limit: only
                                     * then does a commit wake it */
    int64_t last_commit_ns;         /* when the latest commit came */
    atomic_llong commits;           /* bumped by every commit */

    int shutdown, worker_started;
    pthread_t worker;
};

mk_queue *mk_queue_create(void) {
    mk_queue *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    pthread_mutex_init(&q->mu, NULL);
    pthread_condattr_t monotonic;   /* the grace period is timed on CLOCK_MONOTONIC */
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(&q->work, &monotonic);
    pthread_condattr_destroy(&monotonic);
    pthread_cond_init(&q->changed, NULL);
    return q;
}

void mk_queue_destroy(mk_queue *q) {
    if (!q) return;
    pthread_mutex_lock(&q->mu);
    q->shutdown = 1;
    pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->mu);
    if (q->worker_started) pthread_join(q->worker, NULL);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->work);
    pthread_cond_destroy(&q->changed);
    free(q);
}

mk_buffer *mk_buffer_create(mk_queue *q) {
    mk_buffer *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->queue = q;
    b->failed_command = -1;
    return b;
}

void mk_buffer_free(mk_buffer *b) {
    if (!b) return;
    free(b->commands);
    free(b);
}

int mk_buffer_status(const mk_buffer *b) { return atomic_load(&b->status); }
int mk_buffer_finished(const mk_buffer *b) { return atomic_load(&b->finished); }
int mk_buffer_failed_command(const mk_buffer *b) { return b->failed_command; }
mk_status mk_buffer_failure(const mk_buffer *b) { return b->failure; }

void mk_buffer_set_notify(mk_buffer *b, mk_notify_fn fn, void *user) { b->notify = fn; b->user = user; }

void mk_buffer_set_arena(mk_buffer *b, mk_block_cache *cache, mk_block *block) {
    b->cache = cache;
    b->block = block;
}

/* Called with q->mu held. */
static void append(mk_queue *q, mk_buffer *b) {
    b->next = NULL;
    if (q->tail) q->tail->next = b; else q->head = b;
    q->tail = b;
    atomic_store(&b->status, ST_ENQUEUED);
}

void mk_buffer_enqueue(mk_buffer *b) {
    mk_queue *q = b->queue;
    pthread_mutex_lock(&q->mu);
    if (atomic_load(&b->status) == ST_NOT_ENQUEUED) append(q, b);
    pthread_mutex_unlock(&q->mu);
}

void mk_buffer_dequeue(mk_buffer *b) {
    mk_queue *q = b->queue;
    pthread_mutex_lock(&q->mu);
    mk_buffer *prev = NULL;
    for (mk_buffer *p = q->head; p; prev = p, p = p->next) {
        if (p != b) continue;
        if (prev) prev->next = p->next; else q->head = p->next;
        if (q->tail == p) q->tail = prev;
        break;
    }
    /* Buffers behind it may now be runnable. */
    pthread_cond_broadcast(&q->work);
    pthread_cond_broadcast(&q->changed);
    pthread_mutex_unlock(&q->mu);
}

/* Run one buffer that was taken off the queue (q->running set by the taker). */
static void execute(mk_queue *q, mk_buffer *b) {
    atomic_store(&b->status, ST_SCHEDULED);
    pthread_mutex_lock(&q->mu);
    pthread_cond_broadcast(&q->changed);
    pthread_mutex_unlock(&q->mu);
    if (b->notify) b->notify(b->user, MK_EVENT_SCHEDULED);

    int status = ST_COMPLETED;
    for (int32_t i = 0; i < b->count; i++) {
        mk_status s = b->commands[i].run(b->commands[i].args, b->pool);
        if (s != MK_OK) {
            b->failed_command = i;
            b->failure = s;
            status = ST_ERROR;
            break;
        }
    }
    if (b->block) mk_block_cache_release(b->cache, b->block);
    b->block = NULL;
    atomic_store(&b->status, status);
    if (b->notify) b->notify(b->user, MK_EVENT_COMPLETED);

    pthread_mutex_lock(&q->mu);
    q->running = 0;
    atomic_store(&b->finished, 1);   /* b may be freed by its owner from here on */
    pthread_cond_broadcast(&q->changed);
    /* The worker (asleep or napping) only needs waking when a committed buffer waits behind
     * this one (or to exit); waking it for nothing costs the waker a system call. */
    if ((q->head && atomic_load(&q->head->status) == ST_COMMITTED) || q->shutdown)
        pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->mu);
}

/* With q->mu held: take the head if it may run now. */
static mk_buffer *take_runnable(mk_queue *q) {
    mk_buffer *b = q->head;
    if (q->running || !b || atomic_load(&b->status) != ST_COMMITTED) return NULL;
    q->head = b->next;
    if (!q->head) q->tail = NULL;
    b->next = NULL;
    q->running = 1;
    return b;
}

typedef struct commits_since { const mk_queue *q; long long seen; } commits_since;
static int new_commit(const void *arg) {
    const commits_since *c = arg;
    return atomic_load(&c->q->commits) != c->seen;
}

/* With q->mu held: when the head is committed but younger than the grace period, the time
 * (CLOCK_MONOTONIC ns) at which the worker may take it; else 0. */
static int64_t grace_end(const mk_queue *q) {
    const mk_buffer *b = q->head;
    if (q->running || !b || atomic_load(&b->status) != ST_COMMITTED) return 0;
    int64_t end = b->committed_ns + MK_HANDOFF_GRACE_NS;
    return now_ns() < end ? end : 0;
}

static void *worker_main(void *arg) {
    mk_queue *q = arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        int64_t end = grace_end(q);
        if (end) {   /* sleep, not spin: a waiter running the buffer needs every core */
            struct timespec t = {end / 1000000000, end % 1000000000};
            pthread_cond_timedwait(&q->work, &q->mu, &t);
            continue;
        }
        mk_buffer *b = take_runnable(q);
        if (b) {
            pthread_mutex_unlock(&q->mu);
            execute(q, b);
            commits_since c = {q, atomic_load(&q->commits)};
            spin(new_commit, &c, MK_IDLE_SPIN_NS);   /* awake, so commits need not wake it */
            pthread_mutex_lock(&q->mu);
            continue;
        }
        if (q->shutdown && !q->head && !q->running) break;
        const int64_t now = now_ns();
        if (!q->shutdown && now - q->last_commit_ns < MK_NAP_WINDOW_NS) {
            const int64_t until = now + MK_NAP_NS;
            struct timespec t = {until / 1000000000, until % 1000000000};
            pthread_cond_timedwait(&q->work, &q->mu, &t);
            continue;
        }
        q->worker_asleep = 1;
        pthread_cond_wait(&q->work, &q->mu);
        q->worker_asleep = 0;
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

mk_status mk_buffer_commit(mk_buffer *b, const mk_command *commands, int32_t count, mk_pool *pool) {
    mk_queue *q = b->queue;
    if (count > 0) {
        b->commands = malloc((size_t)count * sizeof *commands);
        if (!b->commands) return MK_ENOMEM;
        memcpy(b->commands, commands, (size_t)count * sizeof *commands);
    }
    b->count = count;
    b->pool = pool;
    b->committed_ns = now_ns();
    pthread_mutex_lock(&q->mu);
    if (!q->worker_started) {
        if (pthread_create(&q->worker, NULL, worker_main, q) == 0) q->worker_started = 1;
        /* Without a worker, waiters still run buffers themselves. */
    }
    if (atomic_load(&b->status) == ST_NOT_ENQUEUED) append(q, b);
    atomic_store(&b->status, ST_COMMITTED);
    atomic_fetch_add(&q->commits, 1);
    q->last_commit_ns = b->committed_ns;
    int wake = q->worker_asleep;   /* looking, napping, in its grace wait or busy: it will see this */
    pthread_mutex_unlock(&q->mu);
    if (wake) pthread_cond_signal(&q->work);   /* after unlocking: the lock is free for it */
    return MK_OK;
}

/* Another thread is running b or what precedes it: look before sleeping.
 * Called and returns with q->mu held; returns whether done(b) holds. */
static int spin_until(mk_buffer *b, int (*done)(const mk_buffer *), mk_queue *q) {
    pthread_mutex_unlock(&q->mu);
    spin((int (*)(const void *))done, b, MK_WAIT_SPIN_NS);
    pthread_mutex_lock(&q->mu);
    return done(b);
}

/* Wait until done(b) holds; meanwhile run this queue's head if nobody else is running it.
 * Only buffers before or equal to b are run here, so waiting never runs later work. */
static void wait_for(mk_buffer *b, int (*done)(const mk_buffer *)) {
    mk_queue *q = b->queue;
    pthread_mutex_lock(&q->mu);
    while (!done(b)) {
        mk_buffer *run = NULL;
        if (!atomic_load(&b->finished) && atomic_load(&b->status) >= ST_COMMITTED)
            run = take_runnable(q);
        if (run) {
            pthread_mutex_unlock(&q->mu);
            execute(q, run);
            pthread_mutex_lock(&q->mu);
        } else if (!spin_until(b, done, q)) {
            pthread_cond_wait(&q->changed, &q->mu);
        }
    }
    pthread_mutex_unlock(&q->mu);
}

static int is_scheduled(const mk_buffer *b) { return atomic_load(&b->status) >= ST_SCHEDULED; }

void mk_buffer_wait_scheduled(mk_buffer *b) { wait_for(b, is_scheduled); }
void mk_buffer_wait_completed(mk_buffer *b) { wait_for(b, mk_buffer_finished); }
