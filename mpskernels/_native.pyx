# cython: language_level=3
"""The binding: thin wrappers over the C API (src/mpskernels.h). No policy lives here: the
Python object model validates, this module takes pointers, releases the GIL and calls C."""
cimport cython
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from cpython.ref cimport PyObject

from mpskernels._capi cimport *

import numpy as np

ISA_NAMES = ("generic", "avx2", "avx512")


class NativeError(MemoryError):
    pass


cdef int check(mk_status s, what) except -1:
    if s == MK_OK:
        return 0
    if s == MK_ENOMEM:
        raise MemoryError(f"{what}: out of memory")
    raise ValueError(f"{what}: invalid argument (status {int(s)})")


# ---- CPU and dispatch ----------------------------------------------------------------------

def cpu_features():
    cdef const mk_cpu_features *f = mk_cpu_detect()
    return {name: bool(value) for name, value in (
        ("sse2", f.sse2), ("avx", f.avx), ("avx2", f.avx2), ("fma", f.fma), ("f16c", f.f16c),
        ("avx512f", f.avx512f), ("avx512bw", f.avx512bw), ("avx512dq", f.avx512dq),
        ("avx512vl", f.avx512vl), ("avx512_vnni", f.avx512_vnni),
        ("avx512_bf16", f.avx512_bf16), ("avx512_vpopcntdq", f.avx512_vpopcntdq),
        ("os_ymm", f.os_ymm), ("os_zmm", f.os_zmm))}


def best_isa():
    return ISA_NAMES[<int>mk_best_isa()]


def active_isa():
    return ISA_NAMES[<int>mk_active_isa()]


def select_isa(name):
    """Fill the dispatch tables for `name`, capped at what the CPU supports; returns the ISA."""
    if name not in ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; expected one of {', '.join(ISA_NAMES)}")
    cdef int wanted = ISA_NAMES.index(name)
    return ISA_NAMES[<int>mk_select_isa(<mk_isa>wanted)]


def affinity_cpu_count():
    return mk_affinity_cpu_count()


def format_size(int fmt):
    return mk_format_size(fmt)


# ---- thread pool ---------------------------------------------------------------------------

cdef class Pool:
    cdef mk_pool *pool

    def __cinit__(self, int num_threads):
        self.pool = mk_pool_create(num_threads)
        if self.pool == NULL:
            raise MemoryError("cannot create the thread pool")

    def __dealloc__(self):
        if self.pool != NULL:
            with nogil:
                mk_pool_destroy(self.pool)

    @property
    def num_threads(self):
        return mk_pool_num_threads(self.pool)

    @num_threads.setter
    def num_threads(self, int n):
        with nogil:
            s = mk_pool_set_num_threads(self.pool, n)
        check(s, "set_num_threads")


cdef void _count_visits(void *ctx, int64_t begin, int64_t end) noexcept nogil:
    cdef int32_t *counts = <int32_t *>ctx
    cdef int64_t i
    for i in range(begin, end):
        counts[i] += 1


def pool_visit_counts(Pool pool, int64_t n, int64_t grain):
    """How often mk_parallel_for(pool, n, grain) hands each index to a task: all ones when the
    pool works (the thread-pool tests; a chunk run twice is also a race ThreadSanitizer sees)."""
    counts = np.zeros(max(n, 0), dtype=np.int32)
    cdef int32_t[::1] c = counts
    cdef void *data = &c[0] if n > 0 else NULL
    with nogil:
        mk_parallel_for(pool.pool, n, grain, _count_visits, data)
    return counts


cdef extern from *:
    """
    #include <time.h>
    typedef struct { int started, want, timed_out, first[64]; } mk_test_claims;
    /* Each chunk notes its index in start order; the first `want` wait (up to 2 s) until
     * `want` chunks have started, so every thread has claimed its first chunk. */
    static void mk_test_note_claim(void *ctx, int64_t begin, int64_t end) {
        mk_test_claims *c = ctx;
        (void)end;
        int k = __atomic_fetch_add(&c->started, 1, __ATOMIC_SEQ_CST);
        if (k < 64) c->first[k] = (int)begin;
        if (k >= c->want) return;
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            if (__atomic_load_n(&c->started, __ATOMIC_SEQ_CST) >= c->want) return;
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) > 2000000000L) break;
        }
        __atomic_store_n(&c->timed_out, 1, __ATOMIC_SEQ_CST);
    }
    """
    ctypedef struct mk_test_claims:
        int started, want, timed_out
        int first[64]
    void mk_test_note_claim(void *ctx, int64_t begin, int64_t end) nogil


def pool_first_claims(Pool pool, int64_t n):
    """The first chunk each thread of the pool claimed in mk_parallel_for(pool, n, 1), in
    start order (n <= 64), or None if not every thread took part within 2 s."""
    cdef mk_test_claims c
    memset(&c, 0, sizeof(c))
    c.want = pool.num_threads
    if n > 64 or n < c.want:
        raise ValueError("pool_first_claims: num_threads <= n <= 64")
    with nogil:
        mk_parallel_for(pool.pool, n, 1, mk_test_note_claim, &c)
    return None if c.timed_out else [c.first[k] for k in range(c.want)]


# ---- arena ---------------------------------------------------------------------------------

def plan_arena(sizes, firsts, lasts):
    """Offsets for blocks sizes[i] live over commands [firsts[i], lasts[i]]; and the stats."""
    cdef int64_t[::1] size = np.ascontiguousarray(sizes, dtype=np.int64)
    cdef int32_t[::1] first = np.ascontiguousarray(firsts, dtype=np.int32)
    cdef int32_t[::1] last = np.ascontiguousarray(lasts, dtype=np.int32)
    cdef int32_t n = size.shape[0]
    if first.shape[0] != n or last.shape[0] != n:
        raise ValueError("sizes, firsts and lasts must have the same length")
    offsets = np.zeros(n, dtype=np.int64)
    cdef int64_t[::1] off = offsets
    cdef mk_arena_stats stats
    cdef mk_status s
    with nogil:
        s = mk_arena_plan(n, &size[0] if n else NULL, &first[0] if n else NULL,
                          &last[0] if n else NULL, &off[0] if n else NULL, &stats)
    check(s, "arena plan")
    return offsets, {"peak_bytes": stats.peak_bytes, "requested_bytes": stats.requested_bytes,
                     "lower_bound_bytes": stats.lower_bound_bytes}


cdef class Block:
    """A backing block lent by a BlockCache; goes back when its command buffer has run."""
    cdef mk_block *block
    cdef BlockCache cache
    cdef readonly bint fresh
    cdef readonly size_t address
    cdef readonly int64_t size

    def release(self):
        """Give the block back now (only for blocks never handed to a command buffer)."""
        if self.block != NULL:
            mk_block_cache_release(self.cache.cache, self.block)
            self.block = NULL


cdef class BlockCache:
    cdef mk_block_cache *cache

    def __cinit__(self):
        self.cache = mk_block_cache_create()
        if self.cache == NULL:
            raise MemoryError("cannot create the block cache")

    def __dealloc__(self):
        mk_block_cache_destroy(self.cache)

    def acquire(self, int64_t size):
        cdef int fresh = 0
        cdef mk_block *b
        with nogil:
            b = mk_block_cache_acquire(self.cache, size, &fresh)
        if b == NULL:
            raise MemoryError(f"cannot allocate a {size}-byte arena block")
        block = Block()
        block.block = b
        block.cache = self
        block.fresh = fresh
        block.address = <size_t>b.data
        block.size = b.size
        return block

    def trim(self):
        return mk_block_cache_trim(self.cache)

    @property
    def idle_bytes(self):
        return mk_block_cache_idle_bytes(self.cache)

    @property
    def total_bytes(self):
        return mk_block_cache_total_bytes(self.cache)


# ---- commands ------------------------------------------------------------------------------

cdef enum:
    EW_COPY = 0
    EW_FILL = 1
    EW_NEURON = 2
    EW_ARITHMETIC = 3

cdef struct ew_args:
    int kind
    mk_operand ops[3]      # sources first, the destination last
    mk_extent extent
    mk_neuron_params neuron
    mk_arith_params arith
    float value

cdef mk_status run_elementwise(void *p, mk_pool *pool) noexcept nogil:
    cdef ew_args *a = <ew_args *>p
    if a.kind == EW_COPY:
        return mk_copy(&a.ops[0], &a.ops[1], a.extent, pool)
    if a.kind == EW_FILL:
        return mk_fill(&a.ops[0], a.extent, a.value, pool)
    if a.kind == EW_NEURON:
        return mk_neuron(&a.neuron, &a.ops[0], &a.ops[1], a.extent, pool)
    if a.kind == EW_ARITHMETIC:
        return mk_arithmetic(&a.arith, &a.ops[0], &a.ops[1], &a.ops[2], a.extent, pool)
    return MK_EINVAL


cdef class Command:
    """One recorded kernel call: a C function and its arguments, addresses bound at commit."""
    cdef mk_command command
    cdef public object keep          # Python objects the arguments point into
    cdef public object description   # what to name if it fails: a kernel or a string

    def run(self, Pool pool=None):
        """Run now, on the calling thread (the GIL released)."""
        cdef mk_pool *p = pool.pool if pool is not None else NULL
        cdef mk_status s
        with nogil:
            s = self.command.run(self.command.args, p)
        check(s, str(self.description or type(self).__name__))


cdef class ElementwiseCommand(Command):
    cdef ew_args args
    cdef int num_operands

    def __cinit__(self):
        memset(&self.args, 0, sizeof(ew_args))
        self.command.run = run_elementwise
        self.command.args = &self.args

    @staticmethod
    def copy(extent):
        return _elementwise(EW_COPY, 2, extent)

    @staticmethod
    def fill(extent, float value):
        cdef ElementwiseCommand c = _elementwise(EW_FILL, 1, extent)
        c.args.value = value
        return c

    @staticmethod
    def neuron(extent, int neuron_type, float a, float b, float c, prelu=None):
        cdef ElementwiseCommand cmd = _elementwise(EW_NEURON, 2, extent)
        cdef float[::1] slopes
        cmd.args.neuron.type = neuron_type
        cmd.args.neuron.a = a
        cmd.args.neuron.b = b
        cmd.args.neuron.c = c
        if prelu is not None:
            slopes = prelu
            if slopes.shape[0] < extent[3]:
                raise ValueError("PReLU needs one slope per channel")
            cmd.args.neuron.prelu = &slopes[0]
            cmd.keep = prelu
        return cmd

    @staticmethod
    def arithmetic(extent, int op, float primary_scale, float secondary_scale, float bias,
                   float min_value, float max_value):
        cdef ElementwiseCommand cmd = _elementwise(EW_ARITHMETIC, 3, extent)
        cmd.args.arith.op = op
        cmd.args.arith.primary_scale = primary_scale
        cmd.args.arith.secondary_scale = secondary_scale
        cmd.args.arith.bias = bias
        cmd.args.arith.min_value = min_value
        cmd.args.arith.max_value = max_value
        return cmd

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k < self.num_operands:
            raise IndexError(k)
        cdef mk_operand *o = &self.args.ops[k]
        o.data = <void *>address
        o.format = fmt
        o.stride_n = stride_n
        o.stride_y = stride_y
        o.stride_x = stride_x
        o.stride_c = stride_c

    def bind(self, int k, size_t address):
        """Point operand k at its final address (temporaries: known at commit)."""
        self.args.ops[k].data = <void *>address


cdef struct sum_args:
    int count
    float *scale
    mk_operand *ops        # the destination, then the `count` sources
    float lo, hi
    mk_extent extent

cdef mk_status run_sum(void *p, mk_pool *pool) noexcept nogil:
    cdef sum_args *a = <sum_args *>p
    return mk_sum(a.count, a.scale, &a.ops[1], &a.ops[0], a.lo, a.hi, a.extent, pool)


cdef class SumCommand(Command):
    """dst = clamp(sum of scale[k] * source k, lo, hi) in one pass (mk_sum): operand 0 is the
    destination, operands 1..count the sources; extent (n, rows, columns, 1)."""
    cdef sum_args args

    def __cinit__(self, extent, scales, float lo, float hi):
        n, h, w, ch = extent
        count = len(scales)
        if count < 2 or n <= 0 or h <= 0 or w <= 0 or ch != 1 or max(n, h, w) > 0x7fffffff:
            raise ValueError(f"bad sum: {count} sources over {extent}")
        self.args.scale = <float *>malloc(count * sizeof(float))
        self.args.ops = <mk_operand *>malloc((count + 1) * sizeof(mk_operand))
        if self.args.scale == NULL or self.args.ops == NULL:
            raise MemoryError("cannot allocate a sum command")
        memset(self.args.ops, 0, (count + 1) * sizeof(mk_operand))
        for k in range(count):
            self.args.scale[k] = scales[k]
        self.args.count = count
        self.args.lo, self.args.hi = lo, hi
        self.args.extent.n, self.args.extent.h, self.args.extent.w, self.args.extent.c = n, h, w, 1
        self.command.run = run_sum
        self.command.args = &self.args

    def __dealloc__(self):
        free(self.args.scale)
        free(self.args.ops)

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k <= self.args.count:
            raise IndexError(k)
        cdef mk_operand *o = &self.args.ops[k]
        o.data = <void *>address
        o.format = fmt
        o.stride_n, o.stride_y, o.stride_x, o.stride_c = stride_n, stride_y, stride_x, stride_c


cdef ElementwiseCommand _elementwise(int kind, int num_operands, extent):
    cdef ElementwiseCommand c = ElementwiseCommand()
    n, h, w, ch = extent
    if n <= 0 or h <= 0 or w <= 0 or ch <= 0 or max(n, h, w, ch) > 0x7fffffff:
        raise ValueError(f"bad extent {extent}")
    c.args.kind = kind
    c.num_operands = num_operands
    c.args.extent.n = n
    c.args.extent.h = h
    c.args.extent.w = w
    c.args.extent.c = ch
    return c


# ---- queues and command buffers ------------------------------------------------------------

cdef void notify(void *user, int event) noexcept nogil:
    with gil:
        try:
            (<object>user)._on_event(event)
        except BaseException:
            pass


cdef class Queue:
    cdef mk_queue *queue

    def __cinit__(self):
        self.queue = mk_queue_create()
        if self.queue == NULL:
            raise MemoryError("cannot create a command queue")

    def __dealloc__(self):
        with nogil:
            mk_queue_destroy(self.queue)


include "_command_buffer.pxi"
include "_gemm.pxi"
include "_conv.pxi"
include "_reduce.pxi"
include "_pool.pxi"
include "_nn.pxi"
