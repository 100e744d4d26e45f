"""A stateful fuzzer of the matrix family (mpskernels/matrix.py): matrices and vectors of random
shapes, row and matrix strides, offsets and storage (their own buffer, a device buffer, a NumPy
array), windows and aliases of each other's memory, and MatrixMultiplication,
MatrixVectorMultiplication, MatrixSum, MatrixFullyConnected and MatrixNeuron encoded with
random sizes, transposes, origins, batch ranges, alpha / beta, neurons and bias / scale /
offset vectors, valid and not; kernels reused across encodes; commit, wait, read back.

Checks: a call raises exactly when it breaks a rule (a window outside its matrix, a result
overlapping an input, a batch range past an operand, a vector of the wrong type or too short,
an origin with z != 0...) and then only ValidationError / TypeError; a valid call succeeds and
every element of every matrix and vector afterwards lies within a float64 model's error bound
(the reference is NumPy on the model; fp16 storage and in-place steps rounded as stored).
Memory is read through NumPy views of the buffers made here, independently of the library.

CI runs a short fuzz (test_matrix_fuzz); scripts/fuzz_long.py runs it in the long run.
"""
import collections
import faulthandler
import weakref

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

import mpskernels as mk
import reference as ref
from test_fuzz import ALLOWED, CountedCalls, FMT, HANG_SECONDS, _REFS, _check_collected, store

STATS = collections.Counter()
DT = mk.DataType
ESIZE = {DT.FLOAT32: 4, DT.FLOAT16: 2, DT.UINT32: 4}
NPTYPE = {DT.FLOAT32: np.float32, DT.FLOAT16: np.float16, DT.UINT32: np.uint32}
FORMAT = {DT.FLOAT32: FMT.FLOAT32, DT.FLOAT16: FMT.FLOAT16}
U = 2.0 ** -24
T = mk.CNNNeuronType
# neurons the matrix kernels take, with parameters that keep them well conditioned
NEURONS = [T.NONE, T.RELU, T.LINEAR, T.SIGMOID, T.TANH, T.ABSOLUTE, T.RELUN, T.HARD_SIGMOID,
           T.SOFT_SIGN, T.ELU]


class Memory:
    """What a Matrix or Vector holds: value, error bound, unknown mask (float64, shape
    (matrices, rows, columns) or (vectors, length)) and `mem`, the bytes as the CPU last saw
    them (what kernels that read at encode read). Windows and aliases share their root's
    arrays; span is the [first, last) byte range."""

    def __init__(self, obj, val, err, unk, mem, ids=None, root=None):
        self.obj, self.val, self.err, self.unk, self.mem = obj, val, err, unk, mem
        self.root = root or self
        self.ids = np.arange(val.size).reshape(val.shape) if ids is None else ids   # element ids in the root
        self.is_matrix = isinstance(obj, mk.Matrix)
        self.dtype = obj.data_type
        esize = ESIZE[self.dtype]
        if self.is_matrix:
            self.strides = (obj.matrix_bytes, obj.row_bytes, esize)
            needed = (obj.matrices - 1) * obj.matrix_bytes + (obj.rows - 1) * obj.row_bytes + obj.columns * esize
        else:
            self.strides = (obj.vector_bytes, esize)
            needed = (obj.vectors - 1) * obj.vector_bytes + obj.length * esize
        self.lo = _bytes(obj.data).ctypes.data + obj.offset
        self.hi = self.lo + needed
        self.writes = []    # (call, ids of the root's elements written) since the last check: the report

    def overlaps(self, other):
        return self.lo < other.hi and other.lo < self.hi

    def view(self):
        """The elements, read straight from the buffer's bytes."""
        return np.ndarray(self.val.shape, NPTYPE[self.dtype], _bytes(self.obj.data), self.obj.offset, self.strides)

    @property
    def count(self):   # matrices / vectors
        return self.val.shape[0]


def _bytes(data):
    return data.contents() if isinstance(data, mk.Buffer) else data.reshape(-1).view(np.uint8)


def random_values(rng, shape, dtype):
    if dtype == DT.UINT32:
        return rng.integers(0, 4, shape).astype(np.float64)
    return rng.uniform(-2, 2, shape).astype(NPTYPE[dtype]).astype(np.float64)


def _f(lo, hi):
    """A float32 parameter, 0 or not tiny (the kernels flush denormals)."""
    return st.floats(lo, hi, width=32).map(lambda v: v if abs(v) >= 2.0 ** -20 else 0.0)


class MatrixMachine(CountedCalls, RuleBasedStateMachine):
    stats = STATS

    def __init__(self):
        super().__init__()
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        self.device = mk.Device(num_threads=2)
        self.queue = self.device.make_command_queue()
        self.items = []       # Memory of every matrix and vector (roots, windows, aliases)
        self.kernels = []     # kernels made so far, reused now and then
        self.cb, self.encoded = None, 0
        self.committed, self.refs = [], []
        self.log = []         # the calls encoded since the last check: the report

    def matrices(self):
        return [m for m in self.items if m.is_matrix]

    def vectors(self):
        return [v for v in self.items if not v.is_matrix]

    # ---- matrices and vectors ---------------------------------------------------------------

    @initialize(data=st.data())
    def first_items(self, data):
        """A few matrices and vectors to start with, so that most calls find valid operands."""
        for vector in (False, False, False, False, True, True, True):
            self.new_item(data, vector, valid=True)

    @precondition(lambda self: len(self.items) < 16)
    @rule(data=st.data(), vector=st.booleans())
    def new_item(self, data, vector, valid=False):
        draw = data.draw
        dtype = draw(st.sampled_from([DT.FLOAT32, DT.FLOAT32, DT.FLOAT16] + ([DT.UINT32] if vector else [])))
        esize = ESIZE[dtype]
        if vector:
            length, count = draw(st.integers(1, 9)), draw(st.sampled_from([1, 1, 2, 3]))
            rows, columns = 1, length
        else:
            rows, columns, count = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.sampled_from([1, 1, 2, 3]))
        row_bytes = draw(st.sampled_from([None, None, columns * esize, (columns + 3) * esize]
                                         + ([] if valid else [columns * esize - esize, columns * esize + 1])))
        stride = row_bytes or -(-columns * esize // 64) * 64
        matrix_bytes = None
        if not vector and count > 1:
            matrix_bytes = draw(st.sampled_from([None, None, (rows + 1) * stride]
                                                + ([] if valid else [rows * stride - stride, rows * stride + 2])))
        bad = (row_bytes is not None and (row_bytes % esize or row_bytes < columns * esize)) or \
              (matrix_bytes is not None and (matrix_bytes % stride or matrix_bytes < rows * stride))
        if vector:
            make_descriptor = lambda: mk.VectorDescriptor(length, count, row_bytes, dtype)  # noqa: E731
        else:
            make_descriptor = lambda: mk.MatrixDescriptor(rows, columns, count, row_bytes, matrix_bytes, dtype)  # noqa: E731
        if bad:
            self.expect_error(make_descriptor, f"{'Vector' if vector else 'Matrix'}Descriptor with bad strides")
            return
        self.call("descriptor")
        d = make_descriptor()
        cls = mk.Vector if vector else mk.Matrix
        needed = ((count - 1) * d.vector_bytes + length * esize if vector else
                  (count - 1) * d.matrix_bytes + (rows - 1) * d.row_bytes + columns * esize)
        how = draw(st.sampled_from(["with_device", "buffer", "numpy"] + ([] if valid else ["short", "unaligned"])))
        offset = esize * draw(st.integers(0, 5))
        if how == "with_device":
            self.call("with_device")
            obj = cls.with_device(self.device, d)
        elif how == "buffer":
            self.call("make_buffer")
            obj = cls(self.device.make_buffer(needed + offset + draw(st.integers(0, 64))), d, offset)
        elif how == "numpy":
            self.call("NumPy buffer")
            obj = cls(np.zeros(needed + offset + draw(st.integers(0, 8)), np.uint8), d, offset)
        else:
            buffer = self.device.make_buffer(needed + offset - (how == "short"))
            self.expect_error(lambda: cls(buffer, d, offset + (how == "unaligned")),
                              f"{cls.__name__} on a {how} buffer")
            return
        shape = (count, length) if vector else (count, rows, columns)
        val = random_values(np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))), shape, dtype)
        item = Memory(obj, val, np.zeros(shape), np.zeros(shape, bool), val.copy())
        item.view()[...] = val
        self.items.append(item)
        self.refs.append(weakref.ref(obj))

    @precondition(lambda self: any(m.is_matrix for m in self.items))
    @rule(data=st.data())
    def window(self, data):
        """Another Matrix or Vector over a matrix's memory: an alias, a window of rows and
        columns (the same strides), or a vector per matrix along one row."""
        draw = data.draw
        parent = draw(st.sampled_from(self.matrices()))
        p = parent.obj
        esize = ESIZE[parent.dtype]
        r0, c0 = draw(st.integers(0, p.rows - 1)), draw(st.integers(0, p.columns - 1))
        rows, columns = draw(st.integers(1, p.rows - r0)), draw(st.integers(1, p.columns - c0))
        count = draw(st.integers(1, p.matrices))
        offset = p.offset + r0 * p.row_bytes + c0 * esize
        kind = draw(st.sampled_from(["alias", "window", "window", "vector"]))
        self.call(kind)
        if kind == "alias":
            obj = mk.Matrix(p.data, mk.MatrixDescriptor(p.rows, p.columns, p.matrices, p.row_bytes,
                                                        p.matrix_bytes, p.data_type), p.offset)
            index = (slice(None),) * 3
        elif kind == "window":
            obj = mk.Matrix(p.data, mk.MatrixDescriptor(rows, columns, count, p.row_bytes,
                                                        p.matrix_bytes if count > 1 else None, p.data_type), offset)
            index = (slice(0, count), slice(r0, r0 + rows), slice(c0, c0 + columns))
        else:
            obj = mk.Vector(p.data, mk.VectorDescriptor(columns, count, p.matrix_bytes if count > 1 else None,
                                                        p.data_type), offset)
            index = (slice(0, count), r0, slice(c0, c0 + columns))
        item = Memory(obj, *(a[index] for a in (parent.val, parent.err, parent.unk, parent.mem, parent.ids)),
                      root=parent.root)
        self.items.append(item)
        self.refs.append(weakref.ref(obj))

    @precondition(lambda self: self.items and self.encoded == 0)
    @rule(data=st.data())
    def cpu_write(self, data):
        """New values through the buffer's bytes (nothing is encoded yet)."""
        item = data.draw(st.sampled_from(self.items))
        val = random_values(np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))), item.val.shape, item.dtype)
        self.call("cpu write")
        item.view()[...] = val
        item.val[...], item.mem[...], item.err[...], item.unk[...] = val, val, 0, False

    # ---- kernels ------------------------------------------------------------------------------

    def kernel(self, data, cls, make):
        """A new kernel, or now and then one made before (its cached command must not leak
        into an encode with other operands)."""
        old = [k for k in self.kernels if type(k) is cls]
        if old and data.draw(st.integers(0, 4)) == 0:
            return old[-1 - data.draw(st.integers(0, len(old) - 1))]
        self.call(cls.__name__)
        k = make()
        self.kernels = (self.kernels + [k])[-12:]
        return k

    def batch(self, data, kernel, counts):
        """Set batch_start / batch_size; the (start, size) encode must use, or None."""
        start, size = data.draw(st.integers(0, min(counts) - 1)), None
        if data.draw(st.booleans()):
            size = data.draw(st.integers(1, min(counts) - start))
        if data.draw(st.integers(0, 11)) == 0:     # past the operands
            start, size = data.draw(st.sampled_from([(min(counts), None), (start, min(counts) - start + 1)]))
        kernel.batch_start, kernel.batch_size = start, size
        available = min(counts) - start
        size = available if size is None else size
        return (start, size) if 1 <= size <= available else None

    def set_neuron(self, data, kernel):
        t = data.draw(st.sampled_from(NEURONS + [T.PRELU]))
        a, b, c = data.draw(_f(-1.5, 1.5)), data.draw(_f(-1.5, 1.5)), 0.0
        if t == T.RELUN:
            b = abs(b) + 0.5
        if t == T.PRELU:
            self.expect_error(lambda: kernel.set_neuron_type(t, a, b, c), "matrix kernel with PReLU")
            t = T.NONE
        kernel.set_neuron_type(t, a, b, c)
        return t, a, b, c

    def pick(self, data, pool, ok=None, other=None, avoid=()):
        """Mostly one of pool that passes ok and overlaps nothing in `avoid` (so that most
        calls are valid), else one that overlaps nothing; now and then any, or one of `other`
        (an operand of the wrong kind)."""
        if other and data.draw(st.integers(0, 19)) == 0:
            return data.draw(st.sampled_from(other)), True
        if data.draw(st.integers(0, 15)):
            apart = [p for p in pool if not any(p.overlaps(q) for q in avoid)]
            good = [p for p in apart if ok is None or ok(p)]
            pool = good or apart or pool
        return data.draw(st.sampled_from(pool)), False

    def origin_in(self, data, item, transpose=False):
        """An origin inside item (mostly (0, 0)), now and then an invalid one (negative,
        z != 0); (0, 0, 0) for a vector."""
        if data.draw(st.integers(0, 23)) == 0:
            return data.draw(st.sampled_from([(-1, 0, 0), (0, -2, 0), (0, 0, 1)]))
        if not item.is_matrix or data.draw(st.booleans()):
            return (0, 0, 0)
        return (data.draw(st.integers(0, item.val.shape[1] - 1)), data.draw(st.integers(0, item.val.shape[2] - 1)), 0)

    def origin_for(self, data, item, rows, columns):
        """An origin from which item holds rows x columns, if there is one (mostly)."""
        if not item.is_matrix or data.draw(st.integers(0, 7)) == 0:
            return self.origin_in(data, item)
        x, y = item.val.shape[1] - rows, item.val.shape[2] - columns
        return (data.draw(st.integers(0, max(0, x))), data.draw(st.integers(0, max(0, y))), 0)

    def size(self, data, *limits):
        """A size that fits every limit (mostly), or one past the smallest."""
        top = max(1, min(limits))
        return data.draw(st.integers(1, top + (data.draw(st.integers(0, 15)) == 0)))

    def set_origins(self, kernel, names, values):
        """None if setting an invalid origin raised (MatrixMultiplication checks when set),
        else [why encode must raise]."""
        for name, value in zip(names, values):
            if min(value[:2]) >= 0 and value[2] == 0:
                setattr(kernel, name, value)
                continue
            try:
                setattr(kernel, name, value)
            except ALLOWED as exc:
                STATS["raised " + type(exc).__name__] += 1
                return None
            return [f"{name} {value}"]
        return []

    def run_encode(self, kernel, reasons, encode, what, apply):
        if reasons:
            recorded = len(self.cb._commands)
            self.expect_error(encode, f"{what} ({'; '.join(reasons)})")
            assert len(self.cb._commands) == recorded, f"a refused {what} left commands in the buffer"
            return
        self.call(what)
        encode()
        STATS[what + " encoded"] += 1
        self.encoded += 1
        CURRENT[0] = what + " " + ", ".join(f"{k}={v!r}" for k, v in sorted(vars(kernel).items()))
        self.log.append(CURRENT[0])
        apply()

    def encode_multiplication(self, data):
        draw = data.draw
        tl, tr = draw(st.booleans()), draw(st.booleans())
        c, wrong_c = self.pick(data, self.matrices(), other=self.vectors())
        co = self.origin_in(data, c)
        a, _ = self.pick(data, self.matrices(), avoid=[c])
        lo = self.origin_in(data, a, tl)
        m = self.size(data, room(c, co)[0], room(a, lo, tl)[0])
        k = self.size(data, room(a, lo, tl)[1])
        b, _ = self.pick(data, self.matrices(), lambda p: room(p, (0, 0), tr)[0] >= k, avoid=[c])
        ro = self.origin_in(data, b, tr)
        n = self.size(data, room(c, co)[1], room(b, ro, tr)[1])
        kernel = self.kernel(data, mk.MatrixMultiplication, lambda: mk.MatrixMultiplication(
            self.device, m, n, k, tl, tr, draw(st.sampled_from([1.0, draw(_f(-2, 2))])),
            draw(st.sampled_from([0.0, 0.0, 1.0, draw(_f(-2, 2))]))))
        m, n, k, tl, tr = (kernel.result_rows, kernel.result_columns, kernel.interior_columns,
                           kernel.transpose_left, kernel.transpose_right)
        reasons = self.set_origins(kernel, ["left_matrix_origin", "right_matrix_origin", "result_matrix_origin"],
                                   (lo, ro, co))
        if reasons is None:
            return
        reasons += ["result is a Vector"] if wrong_c else []
        reasons += holds(a, lo, m, k, "left", tl) + holds(b, ro, k, n, "right", tr)
        if not wrong_c:
            reasons += holds(c, co, m, n, "result") + overlap(c, [a, b])
        batch = self.batch(data, kernel, [a.count, b.count, c.count])
        if batch is None:
            reasons.append("batch range past an operand")

        def apply():
            s = slice(batch[0], batch[0] + batch[1])
            x = window(a, s, lo, m, k, tl)
            y = window(b, s, ro, k, n, tr)
            z = window(c, s, co, m, n)
            put(c, s, co, store(*gemm(kernel.alpha, x, y, kernel.beta, z), FORMAT[c.dtype]))
        self.run_encode(kernel, reasons, lambda: kernel.encode(self.cb, a.obj, b.obj, c.obj), "MatrixMultiplication", apply)

    def encode_matrix_vector(self, data):
        draw = data.draw
        t = draw(st.booleans())
        a, wrong_a = self.pick(data, self.matrices(), other=self.vectors())
        lo = self.origin_in(data, a)
        x, _ = self.pick(data, self.vectors(), lambda v: v.dtype != DT.UINT32)
        y, _ = self.pick(data, self.vectors(), lambda v: v.dtype != DT.UINT32, avoid=[a, x])
        ro = (draw(st.integers(0, x.val.shape[1] - 1)), draw(st.sampled_from([0] * 9 + [1])), 0)
        co = (draw(st.integers(0, y.val.shape[1] - 1)), 0, draw(st.sampled_from([0] * 9 + [1])))
        rows = self.size(data, room(a, lo, t)[0], y.val.shape[1] - co[0])
        columns = self.size(data, room(a, lo, t)[1], x.val.shape[1] - ro[0])
        self.call("MatrixVectorMultiplication")
        kernel = mk.MatrixVectorMultiplication(self.device, rows, columns, t, draw(_f(-2, 2)),
                                               draw(st.sampled_from([0.0, 1.0, draw(_f(-2, 2))])))
        reasons = self.set_origins(kernel, ["left_matrix_origin", "right_matrix_origin", "result_matrix_origin"],
                                   (lo, ro, co))
        if reasons is None:
            return
        reasons += ["input_matrix is a Vector"] if wrong_a else holds(a, lo, rows, columns, "matrix", t)
        for v, first, length in ((x, ro, columns), (y, co, rows)):
            if v.dtype == DT.UINT32:
                reasons.append("a UINT32 vector")
            if first[0] + length > v.val.shape[1] or first[1] or first[2]:
                reasons.append("a vector does not hold its elements from its origin")
        reasons += overlap(y, [a, x])
        batch = self.batch(data, kernel, [a.count, x.count, y.count])
        if batch is None:
            reasons.append("batch range past an operand")

        def apply():
            s = slice(batch[0], batch[0] + batch[1])
            xs, ys = window(x, s, ro, columns, 1), window(y, s, co, rows, 1)
            r = store(*gemm(kernel.alpha, window(a, s, lo, rows, columns, t), xs, kernel.beta, ys), FORMAT[y.dtype])
            put(y, s, co, r)
        self.run_encode(kernel, reasons, lambda: kernel.encode(self.cb, a.obj, x.obj, y.obj),
                        "MatrixVectorMultiplication", apply)

    def encode_sum(self, data):
        draw = data.draw
        result, _ = self.pick(data, self.matrices())
        co = self.origin_in(data, result)
        count, t = draw(st.integers(1, 3)), draw(st.booleans())
        rows, columns = (self.size(data, d) for d in room(result, co))
        sources = [self.pick(data, self.matrices(), lambda p: not holds(p, (0, 0, 0), rows, columns, "", t),
                             avoid=[result])[0]
                   for _ in range(count + draw(st.sampled_from([0] * 15 + [1])))]
        vectors = self.vectors()
        scale = draw(st.sampled_from([None, self.pick(data, vectors, lambda v: v.val.shape[1] >= count)[0]])) \
            if vectors else None
        offsets = draw(st.sampled_from([None, None, self.pick(data, vectors, lambda v: v.dtype == DT.UINT32)[0]])) \
            if vectors else None
        bias = draw(st.sampled_from([None, self.pick(data, vectors, lambda v: v.val.shape[1] >= columns)[0]])) \
            if vectors else None
        self.call("MatrixSum")
        kernel = mk.MatrixSum(self.device, count, rows, columns, t)
        neuron = self.set_neuron(data, kernel)
        reasons = self.set_origins(kernel, ["result_matrix_origin"], [co])
        if reasons is None:
            return
        start = draw(st.sampled_from([0] * 6 + [1, 2]))
        reasons += [] if len(sources) == count else ["count sources needed"]
        if scale is not None and scale.val.shape[1] < count:
            reasons.append("scale_vector too short")
        where = np.zeros((count, 2), np.int64)
        if offsets is not None:
            if offsets.dtype != DT.UINT32:
                reasons.append("offset_vector not UINT32")
            elif offsets.val.shape[1] < 2 * count:
                reasons.append("offset_vector too short")
            else:
                where = offsets.mem[0, :2 * count].astype(np.int64).reshape(-1, 2)
        if not reasons:
            reasons += holds(result, co, rows, columns, "result")
            for i, src in enumerate(sources):
                reasons += holds(src, (*where[i], 0), rows, columns, f"source {i}", t)
            reasons += overlap(result, sources)
            if min(m.count for m in sources + [result]) - start < 1:
                reasons.append("start_index past the operands")
            if bias is not None and bias.val.shape[1] < columns:
                reasons.append("bias_vector too short")

        def apply():
            s = slice(start, min(m.count for m in sources + [result]))
            fmt = FORMAT[result.dtype]
            scales = np.ones(count) if scale is None else scale.mem[0, :count].astype(np.float32).astype(np.float64)
            y = None
            for i, src in enumerate(sources):
                v, e, u = window(src, s, (*where[i], 0), rows, columns, t)
                if y is None:
                    y = store(scales[i] * v, 2 * abs(scales[i]) * e + U * abs(scales[i] * v), u, fmt)
                else:
                    r = y[0] + scales[i] * v
                    y = store(r, y[1] + abs(scales[i]) * e + 2 * U * (np.abs(y[0]) + np.abs(scales[i] * v)),
                              y[2] | u, fmt)
            if bias is not None:
                b = bias.mem[0, :columns].astype(np.float32)
                y = store(y[0] + b, y[1] + 2 * U * (np.abs(y[0]) + np.abs(b)), y[2], fmt)
            put(result, s, co, neuron_of(neuron, *y, fmt))
        self.run_encode(kernel, reasons, lambda: kernel.encode(
            self.cb, [m.obj for m in sources], result.obj, None if scale is None else scale.obj,
            None if offsets is None else offsets.obj, None if bias is None else bias.obj, start),
            "MatrixSum", apply)

    def encode_unary(self, data):
        """MatrixFullyConnected (y = neuron(alpha x W + bias)) or MatrixNeuron (y =
        neuron(alpha x + bias)) over the rows of the input from source_matrix_origin."""
        draw = data.draw
        fully_connected = draw(st.booleans())
        x, wrong_x = self.pick(data, self.matrices(), other=self.vectors())
        so = self.origin_in(data, x)
        cls = mk.MatrixFullyConnected if fully_connected else mk.MatrixNeuron
        kernel = self.kernel(data, cls, lambda: cls(self.device))
        kernel.alpha = draw(st.sampled_from([1.0, draw(_f(-2, 2))]))
        neuron = self.set_neuron(data, kernel)
        kernel.source_number_of_feature_vectors = draw(st.sampled_from([None, None, None, 1, 2, 3]))
        kernel.source_input_feature_channels = draw(st.sampled_from([None, None, None, 1, 2, 5]))
        if fully_connected:
            kernel.source_output_feature_channels = draw(st.sampled_from([None, None, None, 1, 3]))
        rows = kernel.source_number_of_feature_vectors or room(x, so)[0]
        inputs = kernel.source_input_feature_channels or room(x, so)[1]
        w, _ = self.pick(data, self.matrices(), lambda p: p.val.shape[1] >= inputs)
        outputs = (kernel.source_output_feature_channels or w.val.shape[2]) if fully_connected else inputs
        result, _ = self.pick(data, self.matrices(), lambda p: not holds(p, (0, 0), rows, outputs, ""),
                              avoid=[x, w] if fully_connected else [x])
        co = self.origin_for(data, result, rows, outputs)
        bias = draw(st.sampled_from([None, None] + self.vectors()))
        bad_origin = self.set_origins(kernel, ["source_matrix_origin", "result_matrix_origin"], (so, co))
        if bad_origin is None:
            return
        if wrong_x or bad_origin:
            reasons, rows, inputs = ["input is a Vector"] if wrong_x else bad_origin, 1, 1
        else:
            shape = x.val.shape
            rows = kernel.source_number_of_feature_vectors or shape[1] - so[0]
            inputs = kernel.source_input_feature_channels or shape[2] - so[1]
            reasons = [] if rows >= 1 and inputs >= 1 else ["source origin outside the input"]
            reasons = reasons or holds(x, so, rows, inputs, "input")
        outputs = (kernel.source_output_feature_channels or w.val.shape[2]) if fully_connected else inputs
        if fully_connected:
            reasons += holds(w, (0, 0, 0), inputs, outputs, "weights")
        reasons += holds(result, co, rows, outputs, "result")
        in_place = (not wrong_x and x.root is result.root and x.lo + so[0] * x.strides[1] + so[1] * x.strides[2]
                    == result.lo + co[0] * result.strides[1] + co[1] * result.strides[2]
                    and x.strides[:2] == result.strides[:2] and x.dtype == result.dtype)
        if fully_connected or not in_place:
            reasons += overlap(result, [x, w] if fully_connected else [x])
        batch = self.batch(data, kernel, [x.count, result.count])
        if batch is None:
            reasons.append("batch range past an operand")
        if bias is not None and bias.val.shape[1] < outputs:
            reasons.append("bias_vector too short")
        b = None if bias is None else bias.mem[0, :outputs].astype(np.float32).astype(np.float64)
        fmt = FORMAT.get(result.dtype)

        def apply():
            s = slice(batch[0], batch[0] + batch[1])
            v = window(x, s, so, rows, inputs)
            if fully_connected:
                weights = window(w, slice(0, 1), (0, 0, 0), inputs, outputs)
                y = gemm(kernel.alpha, v, weights, 0.0, None, b)
                t, na, nb, _ = neuron
                clamp = {T.NONE: (-np.inf, np.inf), T.RELU: (0.0, np.inf), T.RELUN: (0.0, nb)}.get(t)
                if clamp is not None and (t == T.NONE or na == 0.0):
                    y = (np.clip(y[0], *clamp),) + y[1:]    # fused in the GEMM: one rounding
                    put(result, s, co, store(*y, fmt))
                    return
                y = store(*y, fmt)
            else:
                y = store(kernel.alpha * v[0], 2 * abs(kernel.alpha) * v[1] + U * np.abs(kernel.alpha * v[0]), v[2], fmt)
                if b is not None:
                    y = store(y[0] + b, y[1] + 2 * U * (np.abs(y[0]) + np.abs(b)), y[2], fmt)
            put(result, s, co, neuron_of(neuron, *y, fmt))
        args = (x.obj, w.obj, None if bias is None else bias.obj, result.obj) if fully_connected else \
            (x.obj, None if bias is None else bias.obj, result.obj)
        self.run_encode(kernel, reasons, lambda: kernel.encode(self.cb, *args), cls.__name__, apply)

    def encode(self, data):
        if self.cb is None:
            self.new_command_buffer(data)
        which = data.draw(st.sampled_from(["multiplication", "multiplication", "matrix_vector", "sum", "unary",
                                           "unary"]))
        if which == "matrix_vector" and not self.vectors():
            which = "multiplication"
        getattr(self, "encode_" + which)(data)

    # kernels are what the fuzz is about: five rules, so that most steps encode
    can_encode = precondition(lambda self: any(m.is_matrix for m in self.items))
    encode_a = can_encode(rule(data=st.data())(encode))
    encode_b = can_encode(rule(data=st.data())(encode))
    encode_c = can_encode(rule(data=st.data())(encode))
    encode_d = can_encode(rule(data=st.data())(encode))
    encode_e = can_encode(rule(data=st.data())(encode))

    # ---- life cycle ---------------------------------------------------------------------------

    def new_command_buffer(self, data):
        if self.cb is not None:
            self.commit(data)
        self.call("make_command_buffer")
        self.cb = self.queue.make_command_buffer()
        self.refs.append(weakref.ref(self.cb))
        self.encoded = 0

    @precondition(lambda self: self.cb is not None and self.encoded > 0)
    @rule(data=st.data())
    def commit(self, data):
        cb, calls = self.cb, []
        if data.draw(st.booleans()):
            self.expect_error(cb.wait_until_completed, "wait before commit")
        cb.add_completed_handler(calls.append)
        self.call("commit")
        cb.commit()
        if self.matrices() and data.draw(st.integers(0, 3)) == 0:
            m = self.matrices()[0]
            self.expect_error(lambda: mk.MatrixNeuron(self.device).encode(cb, m.obj, None, m.obj),
                              "encode after commit")
        cb.wait_until_completed()
        self.cb, self.encoded = None, 0
        assert cb.status == mk.CommandBufferStatus.COMPLETED, cb.error
        assert calls == [cb]
        self.committed.append((cb, calls))
        self.check()

    def check(self):
        for item in self.items:
            if item.root is not item:
                continue
            self.call("read back")
            got = item.view().astype(np.float64)
            assert np.array_equal(item.obj.to_numpy().astype(np.float64).reshape(got.shape), got, equal_nan=True)
            with np.errstate(invalid="ignore"):
                ok = ((got == item.val) | (np.abs(got - item.val) <= item.err * (1 + 1e-9) + 1e-30)
                      | (np.isnan(got) & np.isnan(item.val)) | item.unk)
            if not ok.all():
                i = tuple(np.argwhere(~ok)[0])
                writers = [call for call, ids in item.writes if item.ids[i] in ids][-3:]
                items = [(m.obj, hex(m.lo), hex(m.hi), m.root.obj) for m in self.items]
                raise AssertionError(f"{item.obj!r} at {i}: got {got[i]!r}, model {item.val[i]!r} ± "
                                     f"{item.err[i]!r} ({(~ok).sum()} wrong); written by {writers}; "
                                     f"calls {self.log}; items {items}")
            item.val[...], item.mem[...], item.err[...], item.unk[...] = got, got, 0, False
            item.writes = []
        self.log = []

    def teardown(self):
        try:
            if self.cb is not None and self.encoded:
                self.commit(_First())
            assert all(calls == [cb] for cb, calls in self.committed)
            self.items, self.kernels, self.committed = [], [], []
            self.cb = None
            _REFS.append((weakref.ref(self), self.refs))
            _check_collected()
        finally:
            faulthandler.cancel_dump_traceback_later()


class _First:
    def draw(self, strategy):
        return False


# ---- the reference --------------------------------------------------------------------------

def holds(item, origin, rows, columns, what, transpose=False):
    """[why not] if `item` (a matrix) does not hold rows x columns of op(item) from origin."""
    if not item.is_matrix:
        return [f"{what} is a Vector"]
    if transpose:
        rows, columns = columns, rows
    if origin[0] + rows > item.val.shape[1] or origin[1] + columns > item.val.shape[2]:
        return [f"{what} does not hold the window"]
    return []


def room(item, origin, transpose=False):
    """(rows, columns) of op(item) from origin: what a window there can hold."""
    if not item.is_matrix:
        return (item.val.shape[1], 1)
    rows, columns = item.val.shape[1] - origin[0], item.val.shape[2] - origin[1]
    return (columns, rows) if transpose else (rows, columns)


def overlap(result, inputs):
    return ["the result overlaps an input"] if any(result.overlaps(i) for i in inputs) else []


def window(item, batch, origin, rows, columns, transpose=False):
    """(val, err, unk) of op(item)'s rows x columns window from origin, for the batch slice;
    non-finite values are unknown."""
    r, c = (columns, rows) if transpose else (rows, columns)
    index = (batch, slice(origin[0], origin[0] + r), slice(origin[1], origin[1] + c))
    if not item.is_matrix:   # a vector's elements origin.x.. as a column
        index = (batch, slice(origin[0], origin[0] + r), None)
    val, err, unk = (a[index] for a in (item.val, item.err, item.unk))
    if transpose:
        val, err, unk = (a.transpose(0, 2, 1) for a in (val, err, unk))
    unk = unk | ~np.isfinite(val)
    return np.where(unk, 0.0, val), err, unk


def put(item, batch, origin, y):
    """Write a result (val, err, unk) at origin: (batch, rows, columns), for a vector
    (batch, elements, 1) from origin.x."""
    rows, columns = y[0].shape[1:]
    index = (batch, slice(origin[0], origin[0] + rows), slice(origin[1], origin[1] + columns))
    if not item.is_matrix:
        index, y = index[:2], [a[:, :, 0] for a in y]
    item.val[index], item.err[index], item.unk[index] = y
    item.root.writes.append((f"{CURRENT[0]} into {item.obj!r}", item.ids[index].ravel()))


CURRENT = [""]    # the call being modelled, for the report


def gemm(alpha, a, b, beta, c, bias=None):
    """alpha op(A) op(B) + beta C (+ bias per column), float64, with its bound: fp32 sums of K
    products in any order err by (K+2) u sum |a b|; the inputs' errors pass through; beta = 0
    does not read C (BLAS)."""
    (av, ae, au), (bv, be, bu) = a, b
    k = av.shape[2]
    with np.errstate(all="ignore"):
        y = alpha * (av @ bv)
        size = abs(alpha) * (np.abs(av) @ np.abs(bv))
        bound = abs(alpha) * (np.abs(av) @ be + ae @ np.abs(bv) + ae @ be) + (k + 4) * U * size
        unk = (au.any(axis=2)[:, :, None] | bu.any(axis=1)[:, None, :])
        if beta != 0.0:
            y = y + beta * c[0]
            bound = bound + abs(beta) * c[1] + 4 * U * abs(beta) * np.abs(c[0])
            unk = unk | c[2]
        if bias is not None:
            y = y + bias
            bound = bound + 4 * U * np.abs(y)
    return y, 2 * bound + 2.0 ** -120, unk


def neuron_of(neuron, y, bound, unk, fmt):
    """The neuron applied in place to a stored result: its value at the centre and corners
    of the error box (the neurons here are monotone or 1-Lipschitz), doubled, plus the
    kernel's own rounding."""
    t, a, b, c = neuron
    if t == T.NONE:
        return y, bound, unk
    with np.errstate(all="ignore"):
        f = lambda v: ref.neuron(int(t), v, a, b, c)  # noqa: E731
        out = f(y)
        dev = np.maximum(np.abs(f(y + bound) - out), np.abs(f(y - bound) - out))
        return store(out, 2 * dev + 1e-5 * np.abs(out) + 2.0 ** -18, unk, fmt)


def run_fuzz(max_examples, steps, derandomize=True):
    from hypothesis.stateful import run_state_machine_as_test
    before = STATS.copy()
    run_state_machine_as_test(MatrixMachine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), print_blob=True, derandomize=derandomize))
    return STATS - before


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_matrix_fuzz():
    added = run_fuzz(max_examples=60, steps=40)
    encoded = sum(v for k, v in added.items() if k.endswith(" encoded"))
    assert added["calls"] > 1500 and encoded > 150, added
