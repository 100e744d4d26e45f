# Declarations of the C API in src/mpskernels.h, for the binding in _native.pyx.
from libc.stdint cimport int32_t, int64_t

cdef extern from "mpskernels.h" nogil:
    ctypedef enum mk_status:
        MK_OK
        MK_ENOMEM
        MK_EINVAL

    ctypedef enum mk_isa:
        MK_ISA_GENERIC
        MK_ISA_AVX2
        MK_ISA_AVX512

    ctypedef struct mk_cpu_features:
        int sse2, avx, avx2, fma, f16c
        int avx512f, avx512bw, avx512dq, avx512vl, avx512_vnni, avx512_bf16, avx512_vpopcntdq
        int os_ymm, os_zmm

    const mk_cpu_features *mk_cpu_detect()
    mk_isa mk_best_isa()
    mk_isa mk_active_isa()
    mk_isa mk_select_isa(mk_isa isa)

    ctypedef struct mk_pool:
        pass
    mk_pool *mk_pool_create(int num_threads)
    void mk_pool_destroy(mk_pool *pool)
    int mk_pool_num_threads(const mk_pool *pool)
    mk_status mk_pool_set_num_threads(mk_pool *pool, int num_threads)
    ctypedef void (*mk_task_fn)(void *ctx, int64_t begin, int64_t end) noexcept nogil
    void mk_parallel_for(mk_pool *pool, int64_t n, int64_t grain, mk_task_fn fn, void *ctx)
    int mk_affinity_cpu_count()

    size_t mk_format_size(int format)

    ctypedef struct mk_operand:
        void *data
        int32_t format
        int64_t stride_n, stride_y, stride_x, stride_c

    ctypedef struct mk_extent:
        int32_t n, h, w, c

    mk_status mk_copy(const mk_operand *src, const mk_operand *dst, mk_extent e, mk_pool *pool)
    mk_status mk_fill(const mk_operand *dst, mk_extent e, float value, mk_pool *pool)

    ctypedef struct mk_neuron_params:
        int32_t type
        float a, b, c
        const float *prelu
    mk_status mk_neuron(const mk_neuron_params *p, const mk_operand *src, const mk_operand *dst,
                        mk_extent e, mk_pool *pool)

    ctypedef struct mk_arith_params:
        int32_t op
        float primary_scale, secondary_scale, bias, min_value, max_value
    mk_status mk_arithmetic(const mk_arith_params *p, const mk_operand *a, const mk_operand *b,
                            const mk_operand *dst, mk_extent e, mk_pool *pool)
    mk_status mk_sum(int count, const float *scale, const mk_operand *src, const mk_operand *dst,
                     float min_value, float max_value, mk_extent e, mk_pool *pool)

    ctypedef struct mk_arena_stats:
        int64_t peak_bytes, requested_bytes, lower_bound_bytes
    mk_status mk_arena_plan(int32_t count, const int64_t *size, const int32_t *first,
                            const int32_t *last, int64_t *offset, mk_arena_stats *stats)

    ctypedef struct mk_block:
        void *data
        int64_t size
    ctypedef struct mk_block_cache:
        pass
    mk_block_cache *mk_block_cache_create()
    void mk_block_cache_destroy(mk_block_cache *cache)
    mk_block *mk_block_cache_acquire(mk_block_cache *cache, int64_t size, int *fresh)
    void mk_block_cache_release(mk_block_cache *cache, mk_block *block)
    int64_t mk_block_cache_trim(mk_block_cache *cache)
    int64_t mk_block_cache_idle_bytes(mk_block_cache *cache)
    int64_t mk_block_cache_total_bytes(mk_block_cache *cache)

    ctypedef mk_status (*mk_command_fn)(void *args, mk_pool *pool)
    ctypedef struct mk_command:
        mk_command_fn run
        void *args
    enum:
        MK_EVENT_SCHEDULED
        MK_EVENT_COMPLETED
    ctypedef void (*mk_notify_fn)(void *user, int event)

    ctypedef struct mk_queue:
        pass
    ctypedef struct mk_buffer:
        pass
    mk_queue *mk_queue_create()
    void mk_queue_destroy(mk_queue *q)
    mk_buffer *mk_buffer_create(mk_queue *q)
    void mk_buffer_free(mk_buffer *b)
    int mk_buffer_status(const mk_buffer *b)
    int mk_buffer_finished(const mk_buffer *b)
    int mk_buffer_failed_command(const mk_buffer *b)
    mk_status mk_buffer_failure(const mk_buffer *b)
    void mk_buffer_set_notify(mk_buffer *b, mk_notify_fn fn, void *user)
    void mk_buffer_set_arena(mk_buffer *b, mk_block_cache *cache, mk_block *block)
    void mk_buffer_enqueue(mk_buffer *b)
    void mk_buffer_dequeue(mk_buffer *b)
    mk_status mk_buffer_commit(mk_buffer *b, const mk_command *commands, int32_t count, mk_pool *pool)
    void mk_buffer_wait_scheduled(mk_buffer *b)
    void mk_buffer_wait_completed(mk_buffer *b)
