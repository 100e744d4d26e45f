# The convolution family's binding (src/conv/conv.h): packed weights, per-geometry plans and
# the recorded command. Included at the end of _native.pyx.
from libc.stdint cimport int32_t, int64_t


cdef extern from "conv/conv.h" nogil:
    ctypedef struct mk_conv_params:
        int32_t groups, cin_g, cout_g, kh, kw, sy, sx, dy, dx, up_y, up_x, sub_pixel
        int32_t n, src_h, src_w, out_h, out_w, dst_h, dst_w, top, left, edge_mode
        mk_operand src, dst
        mk_neuron_params neuron
        int32_t accumulate
    ctypedef struct mk_conv_weights:
        pass
    ctypedef struct mk_conv_plan:
        pass
    mk_conv_weights *mk_conv_weights_create(const mk_conv_params *shape, const void *weights,
                                            int format, const float *bias, mk_status *status)
    void mk_conv_weights_free(mk_conv_weights *w)
    void mk_conv_weights_export(const mk_conv_weights *w, float *weights, float *bias)
    const char *mk_conv_implementation(const mk_conv_weights *w, char *buffer, size_t size)
    mk_conv_plan *mk_conv_plan_create(const mk_conv_weights *w, const mk_conv_params *p,
                                      mk_status *status)
    void mk_conv_plan_free(mk_conv_plan *plan)
    mk_status mk_conv_run(const mk_conv_plan *plan, const mk_conv_params *p, mk_pool *pool)


cdef void _conv_shape(mk_conv_params *p, dict shape):
    p.groups = shape["groups"]
    p.cin_g = shape["cin_g"]
    p.cout_g = shape["cout_g"]
    p.kh = shape["kh"]
    p.kw = shape["kw"]
    p.sy = shape["sy"]
    p.sx = shape["sx"]
    p.dy = shape["dy"]
    p.dx = shape["dx"]
    p.up_y = shape.get("up_y", 1)
    p.up_x = shape.get("up_x", 1)
    p.sub_pixel = shape.get("sub_pixel", 1)


cdef class ConvWeights:
    """Weights and bias packed once for the kernel chosen for the shape (mk_conv_select)."""
    cdef mk_conv_weights *weights
    cdef readonly dict shape

    def __cinit__(self, dict shape, weights, bias):
        """weights: C-contiguous float32/float16 [out][kh][kw][cin_g]; bias: float32 or None."""
        cdef mk_conv_params p
        memset(&p, 0, sizeof(p))
        _conv_shape(&p, shape)
        self.shape = dict(shape)
        cdef const unsigned char[::1] w = weights.reshape(-1).view(np.uint8)
        cdef const float[::1] b
        cdef const float *bp = NULL
        if bias is not None:
            b = bias
            bp = &b[0]
        fmt = 4 if weights.dtype == np.float32 else 3
        cdef int f = fmt
        cdef mk_status s = MK_OK
        with nogil:
            self.weights = mk_conv_weights_create(&p, &w[0], f, bp, &s)
        check(s, "convolution weights")

    def __dealloc__(self):
        mk_conv_weights_free(self.weights)

    def export(self):
        """(weights float32 [out][kh][kw][cin_g], bias float32 [out]) as packed now."""
        s = self.shape
        out = s["groups"] * s["cout_g"]
        weights = np.empty((out, s["kh"], s["kw"], s["cin_g"]), dtype=np.float32)
        bias = np.empty(out, dtype=np.float32)
        cdef float[::1] w = weights.reshape(-1)
        cdef float[::1] b = bias
        mk_conv_weights_export(self.weights, &w[0], &b[0])
        return weights, bias

    def implementation(self):
        cdef char buffer[96]
        return mk_conv_implementation(self.weights, buffer, sizeof(buffer)).decode()


@cython.no_gc_clear   # __dealloc__ reads self.weights' kernel: the GC must not clear it first
cdef class ConvPlan:
    """One geometry's precomputed state (the igemm indirection buffer); shared by commands."""
    cdef mk_conv_plan *plan
    cdef ConvWeights weights
    cdef mk_conv_params params

    def __cinit__(self, ConvWeights weights, dict placement, int src_format, src_strides,
                  int dst_format):
        memset(&self.params, 0, sizeof(self.params))
        _conv_shape(&self.params, weights.shape)
        p = &self.params
        p.n = placement["n"]
        p.src_h = placement["src_h"]
        p.src_w = placement["src_w"]
        p.out_h = placement["out_h"]
        p.out_w = placement["out_w"]
        p.dst_h = placement["dst_h"]
        p.dst_w = placement["dst_w"]
        p.top = placement["top"]
        p.left = placement["left"]
        p.edge_mode = placement["edge_mode"]
        p.src.format = src_format
        p.src.stride_n, p.src.stride_y, p.src.stride_x, p.src.stride_c = src_strides
        p.dst.format = dst_format
        self.weights = weights
        cdef mk_status s = MK_OK
        with nogil:
            self.plan = mk_conv_plan_create(weights.weights, &self.params, &s)
        check(s, "convolution plan")

    def __dealloc__(self):
        mk_conv_plan_free(self.plan)


cdef mk_status run_conv(void *p, mk_pool *pool) noexcept nogil:
    cdef ConvCommandArgs *a = <ConvCommandArgs *>p
    return mk_conv_run(a.plan, &a.params, pool)


cdef struct ConvCommandArgs:
    mk_conv_plan *plan
    mk_conv_params params


cdef class ConvCommand(Command):
    """A convolution over one plan's geometry; operand 0 the source, 1 the destination.
    accumulate: the destination holds a residual, added before the neuron."""
    cdef ConvCommandArgs args

    def __cinit__(self, ConvPlan plan, int neuron_type, float a, float b, float c, prelu=None,
                  bint accumulate=False):
        memset(&self.args, 0, sizeof(ConvCommandArgs))
        self.args.plan = plan.plan
        self.args.params = plan.params
        self.args.params.neuron.type = neuron_type
        self.args.params.neuron.a = a
        self.args.params.neuron.b = b
        self.args.params.neuron.c = c
        self.args.params.neuron.prelu = NULL
        self.args.params.accumulate = accumulate
        cdef const float[::1] slopes
        if prelu is not None:
            slopes = prelu
            self.args.params.neuron.prelu = &slopes[0]
        self.keep = (plan, prelu)
        self.command.run = run_conv
        self.command.args = &self.args

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k < 2:
            raise IndexError(k)
        cdef mk_operand *o = &self.args.params.src if k == 0 else &self.args.params.dst
        o.data = <void *>address
        o.format = fmt
        o.stride_n = stride_n
        o.stride_y = stride_y
        o.stride_x = stride_x
        o.stride_c = stride_c

    def bind(self, int k, size_t address):
        if k == 0:
            self.args.params.src.data = <void *>address
        else:
            self.args.params.dst.data = <void *>address
