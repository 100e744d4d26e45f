# The nn family (src/nn/nn.h): NNRowsCommand, NNGatherCommand and NNResizeCommand record one
# mk_nn_rows / mk_nn_gather / mk_nn_resize_linear call. Included at the end of _native.pyx.

cdef extern from "nn/nn.h" nogil:
    ctypedef struct mk_nn_rows_params:
        int32_t op
        float epsilon
        const float *scale
        const float *bias
    mk_status mk_nn_rows(const mk_nn_rows_params *p, const mk_operand *src, const mk_operand *dst,
                         mk_extent e, mk_pool *pool)
    ctypedef struct mk_nn_gather_params:
        const int32_t *index[4]
        float value
    mk_status mk_nn_gather(const mk_nn_gather_params *p, const mk_operand *src, mk_extent src_e,
                           const mk_operand *dst, mk_extent e, mk_pool *pool)
    ctypedef struct mk_nn_resize_params:
        const int32_t *y0
        const int32_t *y1
        const int32_t *x0
        const int32_t *x1
        const float *wy
        const float *wx
    mk_status mk_nn_resize_linear(const mk_nn_resize_params *p, const mk_operand *src, int32_t src_h,
                                  int32_t src_w, const mk_operand *dst, mk_extent e, mk_pool *pool)


# the row ops (mk_nn_row_op)
NN_SOFTMAX, NN_LAYER_NORM, NN_LAYER_NORM_MEAN, NN_LAYER_NORM_INV_STD, NN_ERF, NN_HARD_SWISH, NN_GELU_TANH = range(7)


cdef mk_extent _nn_extent(extent) except *:
    cdef mk_extent e
    n, h, w, c = extent
    if min(n, h, w, c) <= 0 or max(n, h, w, c) > 0x7fffffff:
        raise ValueError(f"bad extent {extent}")
    e.n, e.h, e.w, e.c = n, h, w, c
    return e


cdef const float *_nn_floats(object array, Py_ssize_t n, str what) except? NULL:
    """The address of a float32 C-contiguous array of n values (None: NULL)."""
    if array is None:
        return NULL
    cdef const float[::1] view = array
    if view.shape[0] != n:
        raise ValueError(f"{what} needs {n} values, got {view.shape[0]}")
    return &view[0]


cdef const int32_t *_nn_indices(object array, Py_ssize_t n, str what) except NULL:
    cdef const int32_t[::1] view = array
    if view.shape[0] != n:
        raise ValueError(f"{what} needs {n} indices, got {view.shape[0]}")
    return &view[0]


cdef class _NNCommand(Command):
    """Two operands (source, destination), each (address, format, 4 element strides)."""
    cdef mk_operand ops[2]

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k < 2:
            raise IndexError(k)
        cdef mk_operand *o = &self.ops[k]
        o.data = <void *>address
        o.format = fmt
        o.stride_n, o.stride_y, o.stride_x, o.stride_c = stride_n, stride_y, stride_x, stride_c

    def bind(self, int k, size_t address):
        self.ops[k].data = <void *>address


cdef struct nn_rows_args:
    mk_nn_rows_params params
    mk_operand *ops
    mk_extent extent


cdef mk_status run_nn_rows(void *p, mk_pool *pool) noexcept nogil:
    cdef nn_rows_args *a = <nn_rows_args *>p
    return mk_nn_rows(&a.params, &a.ops[0], &a.ops[1], a.extent, pool)


cdef class NNRowsCommand(_NNCommand):
    """mk_nn_rows: op (NN_SOFTMAX, ...) on each row of `extent` (n, h, w, c), rows along c;
    scale / bias (float32, c values each): LAYER_NORM."""
    cdef nn_rows_args args

    def __cinit__(self, extent, int op, float epsilon=0.0, scale=None, bias=None):
        memset(&self.args, 0, sizeof(nn_rows_args))
        self.args.extent = _nn_extent(extent)
        self.args.params.op = op
        self.args.params.epsilon = epsilon
        self.args.params.scale = _nn_floats(scale, extent[3], "scale")
        self.args.params.bias = _nn_floats(bias, extent[3], "bias")
        self.keep = (scale, bias)
        self.args.ops = self.ops
        self.command.run = run_nn_rows
        self.command.args = &self.args


cdef struct nn_gather_args:
    mk_nn_gather_params params
    mk_operand *ops
    mk_extent src_extent, extent


cdef mk_status run_nn_gather(void *p, mk_pool *pool) noexcept nogil:
    cdef nn_gather_args *a = <nn_gather_args *>p
    return mk_nn_gather(&a.params, &a.ops[0], a.src_extent, &a.ops[1], a.extent, pool)


cdef class NNGatherCommand(_NNCommand):
    """mk_nn_gather: destination element (n, y, x, c) = source element (index[0][n],
    index[1][y], index[2][x], index[3][c]), or `value` where an index is -1. index: four
    int32 arrays (one entry per destination element along that axis)."""
    cdef nn_gather_args args

    def __cinit__(self, index, float value, src_extent, extent):
        memset(&self.args, 0, sizeof(nn_gather_args))
        self.args.src_extent = _nn_extent(src_extent)
        self.args.extent = _nn_extent(extent)
        index = list(index)
        if len(index) != 4:
            raise ValueError(f"gather takes 4 index tables, got {len(index)}")
        for k in range(4):
            self.args.params.index[k] = _nn_indices(index[k], extent[k], f"index[{k}]")
        self.args.params.value = value
        self.keep = tuple(index)
        self.args.ops = self.ops
        self.command.run = run_nn_gather
        self.command.args = &self.args


cdef struct nn_resize_args:
    mk_nn_resize_params params
    mk_operand *ops
    int32_t src_h, src_w
    mk_extent extent


cdef mk_status run_nn_resize(void *p, mk_pool *pool) noexcept nogil:
    cdef nn_resize_args *a = <nn_resize_args *>p
    return mk_nn_resize_linear(&a.params, &a.ops[0], a.src_h, a.src_w, &a.ops[1], a.extent, pool)


cdef class NNResizeCommand(_NNCommand):
    """mk_nn_resize_linear of NHWC operands: output row y blends source rows y0[y], y1[y]
    with weight wy[y] on y1; columns likewise (x0, x1, wx)."""
    cdef nn_resize_args args

    def __cinit__(self, y0, y1, wy, x0, x1, wx, int32_t src_h, int32_t src_w, extent):
        memset(&self.args, 0, sizeof(nn_resize_args))
        self.args.extent = _nn_extent(extent)
        h, w = extent[1], extent[2]
        p = &self.args.params
        p.y0, p.y1 = _nn_indices(y0, h, "y0"), _nn_indices(y1, h, "y1")
        p.x0, p.x1 = _nn_indices(x0, w, "x0"), _nn_indices(x1, w, "x1")
        p.wy, p.wx = _nn_floats(wy, h, "wy"), _nn_floats(wx, w, "wx")
        self.args.src_h, self.args.src_w = src_h, src_w
        self.keep = (y0, y1, wy, x0, x1, wx)
        self.args.ops = self.ops
        self.command.run = run_nn_resize
        self.command.args = &self.args
