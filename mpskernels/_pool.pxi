# Pooling (src/pool/pool.h): PoolCommand records one mk_pool2d call. Included at the end of
# _native.pyx.

cdef extern from "pool/pool.h" nogil:
    ctypedef struct mk_pool2d_params:
        int32_t mode, kh, kw, sy, sx, dy, dx
        int32_t pad_top, pad_left, pad_bottom, pad_right
        int32_t count_include_pad
    mk_status mk_pool2d(const mk_pool2d_params *p, const mk_operand *src, int32_t src_h,
                        int32_t src_w, const mk_operand *dst, mk_extent out, mk_pool *pool)


cdef struct pl_args:
    mk_pool2d_params params
    mk_operand ops[2]      # source, destination
    int32_t src_h, src_w
    mk_extent out


cdef mk_status run_pool(void *p, mk_pool *pool) noexcept nogil:
    cdef pl_args *a = <pl_args *>p
    return mk_pool2d(&a.params, &a.ops[0], a.src_h, a.src_w, &a.ops[1], a.out, pool)


cdef class PoolCommand(Command):
    """mk_pool2d: mode 0 max, 1 average; window (kh, kw), strides, dilations, pads (top, left,
    bottom, right); source (src_h, src_w), output extent (n, h, w, c). Operands: source,
    destination (NHWC, fp32, channel stride 1)."""
    cdef pl_args args

    def __cinit__(self, int mode, window, strides, dilations, pads, bint count_include_pad,
                  int32_t src_h, int32_t src_w, out):
        n, h, w, ch = out
        if min(n, h, w, ch, src_h, src_w) <= 0 or max(n, h, w, ch) > 0x7fffffff:
            raise ValueError(f"bad pooling extent {out} from {src_h}x{src_w}")
        memset(&self.args, 0, sizeof(pl_args))
        p = &self.args.params
        p.mode = mode
        p.kh, p.kw = window
        p.sy, p.sx = strides
        p.dy, p.dx = dilations
        p.pad_top, p.pad_left, p.pad_bottom, p.pad_right = pads
        p.count_include_pad = count_include_pad
        self.args.src_h, self.args.src_w = src_h, src_w
        self.args.out.n, self.args.out.h, self.args.out.w, self.args.out.c = n, h, w, ch
        self.command.run = run_pool
        self.command.args = &self.args

    def set_operand(self, int k, size_t address, int fmt, int64_t stride_n, int64_t stride_y,
                    int64_t stride_x, int64_t stride_c):
        if not 0 <= k < 2:
            raise IndexError(k)
        cdef mk_operand *o = &self.args.ops[k]
        o.data = <void *>address
        o.format = fmt
        o.stride_n = stride_n
        o.stride_y = stride_y
        o.stride_x = stride_x
        o.stride_c = stride_c

    def bind(self, int k, size_t address):
        self.args.ops[k].data = <void *>address
