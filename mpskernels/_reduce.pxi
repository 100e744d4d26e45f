# The reductions (src/reduce/reduce.h): ReduceCommand records one mk_reduce call.
# Included at the end of _native.pyx.
from libc.stdint cimport uint64_t

cdef extern from "reduce/reduce.h" nogil:
    ctypedef struct mk_reduce_params:
        int32_t op
        int32_t axis
        float weight
        int32_t by_nonzero_weights
    mk_status mk_reduce(const mk_reduce_params *p, const mk_operand *src,
                        const mk_operand *weights, const mk_operand *dst, mk_extent e,
                        mk_pool *pool)
    uint64_t mk_reduce_read_probe(const void *data, int64_t nbytes, mk_pool *pool)


cdef struct rd_args:
    mk_reduce_params params
    mk_operand ops[3]      # source, weights (if any), destination
    int weighted
    mk_extent extent


cdef mk_status run_reduce(void *p, mk_pool *pool) noexcept nogil:
    cdef rd_args *a = <rd_args *>p
    if a.weighted:
        return mk_reduce(&a.params, &a.ops[0], &a.ops[1], &a.ops[2], a.extent, pool)
    return mk_reduce(&a.params, &a.ops[0], NULL, &a.ops[1], a.extent, pool)


cdef class ReduceCommand(Command):
    """mk_reduce over a source region of `extent` (n, h, w, c); operands: source, weights
    (when weighted), destination."""
    cdef rd_args args

    def __cinit__(self, extent, int op, int axis, float weight=1.0,
                  bint by_nonzero_weights=False, bint weighted=False):
        n, h, w, ch = extent
        if n <= 0 or h <= 0 or w <= 0 or ch <= 0 or max(n, h, w, ch) > 0x7fffffff:
            raise ValueError(f"bad extent {extent}")
        memset(&self.args, 0, sizeof(rd_args))
        self.args.params.op = op
        self.args.params.axis = axis
        self.args.params.weight = weight
        self.args.params.by_nonzero_weights = by_nonzero_weights
        self.args.weighted = weighted
        self.args.extent.n = n
        self.args.extent.h = h
        self.args.extent.w = w
        self.args.extent.c = ch
        self.command.run = run_reduce
        self.command.args = &self.args

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k < 2 + self.args.weighted:
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


def read_probe(const unsigned char[::1] data, Pool pool=None):
    """Read every byte of `data` (split over the pool) and return the OR of its 64-bit
    words: the bench/ read-bandwidth probe."""
    cdef mk_pool *p = pool.pool if pool is not None else NULL
    cdef int64_t n = data.shape[0]
    cdef uint64_t r
    with nogil:
        r = mk_reduce_read_probe(&data[0] if n else NULL, n, p)
    return r
