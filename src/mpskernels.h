/* mpskernels C API: what the Cython binding (mpskernels/_native.pyx) calls.
 *
 * Layers: kernels (src/<family>/) -> this API -> Cython binding -> Python object model.
 * Every function returns an mk_status; the binding turns a failure into a Python exception.
 * Nothing here touches Python objects or the GIL.
 */
#ifndef MPSKERNELS_H
#define MPSKERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MK_X86 1
#else
#define MK_X86 0
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mk_status {
    MK_OK = 0,
    MK_ENOMEM = 1,   /* an allocation failed */
    MK_EINVAL = 2,   /* an argument the binding should have rejected */
} mk_status;

/* ---- CPU features and instruction-set dispatch (src/runtime/cpu.c) ---------------- */

typedef enum mk_isa { MK_ISA_GENERIC = 0, MK_ISA_AVX2 = 1, MK_ISA_AVX512 = 2 } mk_isa;

typedef struct mk_cpu_features {
    int sse2, avx, avx2, fma, f16c;
    int avx512f, avx512bw, avx512dq, avx512vl, avx512_vnni, avx512_bf16, avx512_vpopcntdq;
    int os_ymm, os_zmm;  /* the OS saves the YMM / ZMM register state (XGETBV) */
} mk_cpu_features;

const mk_cpu_features *mk_cpu_detect(void);
mk_isa mk_best_isa(void);              /* the best ISA this CPU and OS support */
mk_isa mk_active_isa(void);            /* the ISA the dispatch tables use now */
/* Fill every dispatch table for `isa` (capped at mk_best_isa()); returns the ISA chosen. */
mk_isa mk_select_isa(mk_isa isa);

/* ---- Thread pool (src/runtime/pool.c) -------------------------------------------- */

typedef struct mk_pool mk_pool;
/* fn handles the index range [begin, end). */
typedef void (*mk_task_fn)(void *ctx, int64_t begin, int64_t end);

mk_pool *mk_pool_create(int num_threads);   /* NULL on failure; threads start lazily */
void mk_pool_destroy(mk_pool *pool);
int mk_pool_num_threads(const mk_pool *pool);
mk_status mk_pool_set_num_threads(mk_pool *pool, int num_threads);
int mk_affinity_cpu_count(void);            /* CPUs in this process's affinity mask */

/* Run fn over [0, n) in chunks [k*grain, min((k+1)*grain, n)). Chunk boundaries depend on
 * `grain` only, never on the thread count, so a kernel that computes each output from its
 * own chunk gives bitwise identical results for any number of threads. The caller takes
 * part. Every participant runs with denormals flushed (FTZ/DAZ) and gets its previous
 * floating-point state back. pool == NULL runs serially in the caller. */
void mk_parallel_for(mk_pool *pool, int64_t n, int64_t grain, mk_task_fn fn, void *ctx);

/* ---- Image operands ---------------------------------------------------------------- */

/* Storage formats: Apple's MPSImageFeatureChannelFormat values (BF16 is our extension). */
typedef enum mk_format {
    MK_FMT_UNORM8 = 1, MK_FMT_UNORM16 = 2, MK_FMT_F16 = 3, MK_FMT_F32 = 4, MK_FMT_BF16 = 5,
} mk_format;

size_t mk_format_size(int format);  /* bytes per element; 0 for an unknown format */

/* A 4-D strided view (images n, rows y, columns x, channels c) of one operand.
 * `data` points at element (0,0,0,0) of the region; strides count elements, not bytes.
 * A stride of 0 repeats (broadcasts) along that axis. */
typedef struct mk_operand {
    void *data;
    int32_t format;
    int64_t stride_n, stride_y, stride_x, stride_c;
} mk_operand;

typedef struct mk_extent { int32_t n, h, w, c; } mk_extent;

/* ---- Elementwise kernels (src/elementwise/) ----------------------------------------
 * Compute in fp32 whatever the storage format: loads decode (unorm v/255 or v/65535,
 * f16 and bf16 exactly), stores round to nearest even (unorm: clamp to [0,1], then
 * round(x * 255) or round(x * 65535)). Destination and sources may be the same memory
 * only when their views are identical. */

/* Copy with conversion between formats (read_bytes, write_bytes, from_numpy, to_numpy). */
mk_status mk_copy(const mk_operand *src, const mk_operand *dst, mk_extent e, mk_pool *pool);

/* Fill the region with one value (converted to the destination format). */
mk_status mk_fill(const mk_operand *dst, mk_extent e, float value, mk_pool *pool);

/* Neuron types: Apple's MPSCNNNeuronType values. */
typedef enum mk_neuron_type {
    MK_NEURON_NONE = 0, MK_NEURON_RELU = 1, MK_NEURON_LINEAR = 2, MK_NEURON_SIGMOID = 3,
    MK_NEURON_HARD_SIGMOID = 4, MK_NEURON_TANH = 5, MK_NEURON_ABSOLUTE = 6,
    MK_NEURON_SOFT_PLUS = 7, MK_NEURON_SOFT_SIGN = 8, MK_NEURON_ELU = 9, MK_NEURON_PRELU = 10,
    MK_NEURON_RELUN = 11, MK_NEURON_POWER = 12, MK_NEURON_EXPONENTIAL = 13,
    MK_NEURON_LOGARITHM = 14, MK_NEURON_GELU = 15,
} mk_neuron_type;

typedef struct mk_neuron_params {
    int32_t type;         /* mk_neuron_type */
    float a, b, c;
    const float *prelu;   /* PRELU: one slope per channel of the extent (e.c floats) */
} mk_neuron_params;

mk_status mk_neuron(const mk_neuron_params *p, const mk_operand *src, const mk_operand *dst,
                    mk_extent e, mk_pool *pool);

typedef enum mk_arith_op { MK_ARITH_ADD = 0, MK_ARITH_SUB = 1, MK_ARITH_MUL = 2, MK_ARITH_DIV = 3 } mk_arith_op;

/* dst = clamp((primary_scale * a) OP (secondary_scale * b) + bias, min_value, max_value) */
typedef struct mk_arith_params {
    int32_t op;           /* mk_arith_op */
    float primary_scale, secondary_scale, bias, min_value, max_value;
} mk_arith_params;

mk_status mk_arithmetic(const mk_arith_params *p, const mk_operand *a, const mk_operand *b,
                        const mk_operand *dst, mk_extent e, mk_pool *pool);

/* dst = clamp(scale[0] * src[0] + scale[1] * src[1] + ... + scale[count-1] * src[count-1],
 * min_value, max_value) in one pass, summed in that order, each product rounded to fp32 before
 * it is added, the partial sums kept in fp32 (the same bits as count - 1 two-operand passes of
 * mk_arithmetic ADD into an fp32 dst; another format is rounded once, at the end). Operands
 * are batches of rows: extent (n, h, w, 1), any format and strides (stride_x 0: one value per
 * row); count >= 2; dst must not overlap a source. */
mk_status mk_sum(int count, const float *scale, const mk_operand *src, const mk_operand *dst,
                 float min_value, float max_value, mk_extent e, mk_pool *pool);

/* Fill the elementwise dispatch table for `isa` (called by mk_select_isa). */
void mk_elementwise_select_isa(mk_isa isa);


/* ---- The arena (src/arena/arena.c) ---------------------------------------------------
 * A command buffer's temporaries all live in one block. Every lifetime is known at commit
 * (first and last command touching the image), so offsets are planned then, greedy by size:
 * largest first, each at the lowest 64-byte aligned offset that does not overlap a placed
 * block whose lifetime overlaps its own. */

#define MK_ALIGNMENT 64

typedef struct mk_arena_stats {
    int64_t peak_bytes;         /* size of the arena the plan needs */
    int64_t requested_bytes;    /* sum of all sizes: what no aliasing would need */
    int64_t lower_bound_bytes;  /* largest sum of sizes live at one time */
} mk_arena_stats;

/* size[i] bytes live from command first[i] to command last[i] (inclusive). Writes offset[i].
 * Returns MK_ENOMEM if scratch memory cannot be had, MK_EINVAL for a bad interval. */
mk_status mk_arena_plan(int32_t count, const int64_t *size, const int32_t *first,
                        const int32_t *last, int64_t *offset, mk_arena_stats *stats);

/* Per-device cache of backing blocks, reused across command buffers. */
typedef struct mk_block { void *data; int64_t size; struct mk_block *next; } mk_block;
typedef struct mk_block_cache mk_block_cache;

mk_block_cache *mk_block_cache_create(void);
void mk_block_cache_destroy(mk_block_cache *cache);   /* frees every block not in use */
/* A block of at least `size` bytes, 64-byte aligned; *fresh = 1 if it had to be allocated. */
mk_block *mk_block_cache_acquire(mk_block_cache *cache, int64_t size, int *fresh);
void mk_block_cache_release(mk_block_cache *cache, mk_block *block);
int64_t mk_block_cache_trim(mk_block_cache *cache);   /* frees idle blocks; returns bytes */
int64_t mk_block_cache_idle_bytes(mk_block_cache *cache);
int64_t mk_block_cache_total_bytes(mk_block_cache *cache);  /* idle + in use */

/* ---- Command queues and buffers (src/runtime/queue.c) --------------------------------
 * A queue runs its buffers in enqueue order on its own worker thread. A thread waiting for
 * a buffer that is next in line and not yet started runs it itself (no hand-off cost). */

typedef mk_status (*mk_command_fn)(void *args, mk_pool *pool);
typedef struct mk_command { mk_command_fn run; void *args; } mk_command;

enum { MK_EVENT_SCHEDULED = 0, MK_EVENT_COMPLETED = 1 };
/* Called on the executing thread, without the GIL: once when the buffer is scheduled and once
 * after it ran (status already COMPLETED or ERROR), before waiters are released. */
typedef void (*mk_notify_fn)(void *user, int event);

typedef struct mk_queue mk_queue;
typedef struct mk_buffer mk_buffer;

mk_queue *mk_queue_create(void);
void mk_queue_destroy(mk_queue *q);                 /* every committed buffer must be done */

mk_buffer *mk_buffer_create(mk_queue *q);
void mk_buffer_free(mk_buffer *b);                  /* not while committed and unfinished */
int mk_buffer_status(const mk_buffer *b);           /* CommandBufferStatus values 0..5 */
int mk_buffer_finished(const mk_buffer *b);         /* ran and notified */
int mk_buffer_failed_command(const mk_buffer *b);   /* index of the failed command, or -1 */
mk_status mk_buffer_failure(const mk_buffer *b);
void mk_buffer_set_notify(mk_buffer *b, mk_notify_fn fn, void *user);
/* The block (may be NULL) goes back to the cache once the commands have run. */
void mk_buffer_set_arena(mk_buffer *b, mk_block_cache *cache, mk_block *block);
void mk_buffer_enqueue(mk_buffer *b);
void mk_buffer_dequeue(mk_buffer *b);               /* an enqueued buffer being freed */
/* Takes a copy of the command list; enqueues if needed. MK_ENOMEM leaves it uncommitted. */
mk_status mk_buffer_commit(mk_buffer *b, const mk_command *commands, int32_t count, mk_pool *pool);
void mk_buffer_wait_scheduled(mk_buffer *b);
void mk_buffer_wait_completed(mk_buffer *b);

#ifdef __cplusplus
}
#endif
#endif
