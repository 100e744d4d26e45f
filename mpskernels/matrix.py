"""Matrices and vectors (MPSMatrix, MPSVector and their descriptors) and the matrix kernels:
MatrixMultiplication, MatrixVectorMultiplication, MatrixSum, MatrixFullyConnected, MatrixNeuron.

Element [k][i][j] of a matrix is at byte offset + k*matrix_bytes + i*row_bytes + j*element size
of its buffer. Storage is FLOAT32 or FLOAT16; kernels compute in fp32. Origins are
Origin(x=row, y=column, z=0). Products run on the C GEMM (src/gemm/), the rest on the
elementwise kernels (src/elementwise/). Like every kernel, they are recorded at encode and run
at commit; scale, offset and bias vectors of MatrixSum are read at encode."""
import numpy as np

from mpskernels import _native
from mpskernels.enums import CNNNeuronType, DataType
from mpskernels.errors import ValidationError
from mpskernels.geometry import LIMIT, Origin
from mpskernels.heap import Buffer
from mpskernels.kernel import Kernel

_ESIZE = {DataType.FLOAT32: 4, DataType.FLOAT16: 2, DataType.UINT32: 4}
_DTYPE = {DataType.FLOAT32: np.float32, DataType.FLOAT16: np.float16, DataType.UINT32: np.uint32}
_FORMAT = {DataType.FLOAT32: 4, DataType.FLOAT16: 3}   # mk_format codes
_OF_DTYPE = {np.dtype(np.float32): DataType.FLOAT32, np.dtype(np.float16): DataType.FLOAT16,
             np.dtype(np.float64): DataType.FLOAT32}
_ALIGN = 64


def _count(value, what, minimum=1):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValidationError(f"{what} must be an integer, got {value!r}")
    value = value.__index__()
    if not minimum <= value <= LIMIT:
        raise ValidationError(f"{what} must be in {minimum}..2**40, got {value}")
    return value


def _data_type(data_type, what="data_type", allowed=(DataType.FLOAT32, DataType.FLOAT16)):
    try:
        data_type = DataType(data_type)
    except ValueError:
        raise ValidationError(f"{what}: unknown DataType {data_type!r}") from None
    if data_type not in allowed:
        names = ", ".join(d.name for d in allowed)
        raise ValidationError(f"{what} {data_type.name} is not supported; use one of {names}")
    return data_type


def _strides(rows, columns, row_bytes, matrix_bytes, esize, what):
    if row_bytes % esize or row_bytes < columns * esize:
        raise ValidationError(f"{what}: row_bytes {row_bytes} must be a multiple of the element "
                              f"size {esize} and at least columns*{esize} = {columns * esize}")
    if matrix_bytes % row_bytes or matrix_bytes < rows * row_bytes:
        raise ValidationError(f"{what}: matrix_bytes {matrix_bytes} must be a multiple of "
                              f"row_bytes {row_bytes} and at least rows*row_bytes = "
                              f"{rows * row_bytes}")


class MatrixDescriptor:
    """MPSMatrixDescriptor: the shape and strides (bytes) of one or more matrices."""

    def __init__(self, rows, columns, matrices=1, row_bytes=None, matrix_bytes=None,
                 data_type=DataType.FLOAT32):
        self._data_type = _data_type(data_type)
        self._rows, self._columns = _count(rows, "rows"), _count(columns, "columns")
        self._matrices = _count(matrices, "matrices")
        esize = _ESIZE[self._data_type]
        self._row_bytes = (self.row_bytes_for_columns(self._columns, self._data_type)
                           if row_bytes is None else _count(row_bytes, "row_bytes"))
        self._matrix_bytes = (self._rows * self._row_bytes if matrix_bytes is None
                              else _count(matrix_bytes, "matrix_bytes"))
        _strides(self._rows, self._columns, self._row_bytes, self._matrix_bytes, esize,
                 "MatrixDescriptor")

    @staticmethod
    def row_bytes_for_columns(columns, data_type=DataType.FLOAT32):
        """The recommended row stride: whole 64-byte cache lines."""
        esize = _ESIZE[_data_type(data_type)]
        return -(-_count(columns, "columns") * esize // _ALIGN) * _ALIGN

    rows = property(lambda self: self._rows, lambda self, v: self._set("_rows", v, "rows"))
    columns = property(lambda self: self._columns,
                       lambda self, v: self._set("_columns", v, "columns"))
    row_bytes = property(lambda self: self._row_bytes,
                         lambda self, v: self._set("_row_bytes", v, "row_bytes"))
    matrices = property(lambda self: self._matrices)
    matrix_bytes = property(lambda self: self._matrix_bytes)

    @property
    def data_type(self):
        return self._data_type

    @data_type.setter
    def data_type(self, value):
        old = self._data_type
        self._data_type = _data_type(value)
        try:
            self._check()
        except ValidationError:
            self._data_type = old
            raise

    def _set(self, name, value, what):
        old = getattr(self, name), self._matrix_bytes
        setattr(self, name, _count(value, what))
        if self._matrices == 1:   # a single matrix: its stride follows its rows
            self._matrix_bytes = self._rows * self._row_bytes
        try:
            self._check()
        except ValidationError:
            setattr(self, name, old[0])
            self._matrix_bytes = old[1]
            raise

    def _check(self):
        _strides(self._rows, self._columns, self._row_bytes, self._matrix_bytes,
                 _ESIZE[self._data_type], "MatrixDescriptor")

    def __repr__(self):
        return (f"MatrixDescriptor(rows={self._rows}, columns={self._columns}, matrices="
                f"{self._matrices}, row_bytes={self._row_bytes}, matrix_bytes="
                f"{self._matrix_bytes}, data_type={self._data_type.name})")


class VectorDescriptor:
    """MPSVectorDescriptor: length elements per vector, vectors vector_bytes apart."""

    def __init__(self, length, vectors=1, vector_bytes=None, data_type=DataType.FLOAT32):
        self.data_type = _data_type(data_type, allowed=tuple(_ESIZE))
        self.length, self.vectors = _count(length, "length"), _count(vectors, "vectors")
        esize = _ESIZE[self.data_type]
        self.vector_bytes = (self.vector_bytes_for_length(self.length, self.data_type)
                             if vector_bytes is None else _count(vector_bytes, "vector_bytes"))
        if self.vector_bytes % esize or self.vector_bytes < self.length * esize:
            raise ValidationError(f"VectorDescriptor: vector_bytes {self.vector_bytes} must be a "
                                  f"multiple of {esize} and at least length*{esize}")

    @staticmethod
    def vector_bytes_for_length(length, data_type=DataType.FLOAT32):
        esize = _ESIZE[_data_type(data_type, allowed=tuple(_ESIZE))]
        return -(-_count(length, "length") * esize // _ALIGN) * _ALIGN

    def __repr__(self):
        return (f"VectorDescriptor(length={self.length}, vectors={self.vectors}, vector_bytes="
                f"{self.vector_bytes}, data_type={self.data_type.name})")


def _byte_view(buffer, what):
    if isinstance(buffer, Buffer):   # kernels may use any storage mode, as on a GPU
        return buffer._memory
    view = buffer.reshape(-1).view(np.uint8) if isinstance(buffer, np.ndarray) \
        else np.frombuffer(buffer, dtype=np.uint8)
    if not view.flags.writeable:
        raise ValidationError(f"{what}: the buffer must be writable")
    if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
        raise ValidationError(f"{what}: a NumPy buffer must be C-contiguous")
    return view


class _Storage:
    """What Matrix and Vector share: a byte buffer, an offset, a data type."""

    def _attach(self, buffer, offset, needed, what):
        self._offset = _count(offset, "offset", 0)
        if self._offset % self._esize:
            raise ValidationError(f"{what}: offset {offset} is not a multiple of the element "
                                  f"size {self._esize}")
        self._buffer = buffer
        self._bytes = _byte_view(buffer, what)
        if self._bytes.nbytes < self._offset + needed:
            raise ValidationError(f"{what}: the buffer has {self._bytes.nbytes} bytes; offset "
                                  f"{self._offset} + {needed} are needed")
        self._base = self._bytes.__array_interface__["data"][0] + self._offset   # never moves

    @property
    def offset(self):
        return self._offset

    @property
    def data(self):
        """The buffer holding the elements."""
        return self._buffer

    @property
    def data_type(self):
        return self._data_type

    def resource_size(self):
        return self._bytes.nbytes

    def synchronize(self, command_buffer):
        """Shared memory: nothing to do."""

    def _address(self):
        return self._base

    def _elements(self):
        """A NumPy view of the elements: (matrices, rows, columns) or (vectors, length)."""
        span = self._bytes[self._offset:self._offset + self._needed]   # a whole number of elements
        return np.lib.stride_tricks.as_strided(span.view(_DTYPE[self._data_type]), self._shape,
                                               self._byte_strides)

    def to_numpy(self):
        """A copy of the elements: (rows, columns) / (length,), or with a leading matrices /
        vectors axis if there are several."""
        out = self._elements().copy()
        return out[0] if self._shape[0] == 1 else out

    def _span(self):
        """[first, last) byte addresses the elements occupy."""
        return self._address(), self._address() + self._needed


def _device_of(buffer, device):
    """The Device a matrix or vector belongs to: its Buffer's, else the one given (None for
    other Python buffers; a NumPy 2 array's .device is the string "cpu")."""
    return buffer.device if isinstance(buffer, Buffer) else device


class Matrix(_Storage):
    """MPSMatrix: Matrix(buffer, descriptor, offset=0) over a Buffer (device.make_buffer) or any
    writable Python buffer, or
    Matrix.with_device(device, descriptor) / Matrix.from_numpy(device, array) with its own."""

    def __init__(self, buffer, descriptor, offset=0, device=None):
        if not isinstance(descriptor, MatrixDescriptor):
            raise TypeError(f"expected a MatrixDescriptor, got {descriptor!r}")
        d = descriptor
        self.device = _device_of(buffer, device)
        self._data_type = d.data_type
        self._rows, self._columns, self._matrices = d.rows, d.columns, d.matrices
        self._row_bytes, self._matrix_bytes = d.row_bytes, d.matrix_bytes
        self._esize = _ESIZE[d.data_type]
        self._shape = (d.matrices, d.rows, d.columns)
        self._byte_strides = (d.matrix_bytes, d.row_bytes, self._esize)
        self._needed = ((d.matrices - 1) * d.matrix_bytes + (d.rows - 1) * d.row_bytes
                        + d.columns * self._esize)
        self._attach(buffer, offset, self._needed, "Matrix")
        # everything a kernel's encode depends on: equal keys, equal commands
        self._key = (self._base, d.data_type, d.rows, d.columns, d.matrices, d.row_bytes,
                     d.matrix_bytes)

    @classmethod
    def with_device(cls, device, descriptor):
        d = descriptor
        return cls(device.make_buffer(d.matrices * d.matrix_bytes), d, 0, device)

    @classmethod
    def from_numpy(cls, device, array, data_type=None):
        """A matrix holding a 2-D (rows, columns) or 3-D (matrices, rows, columns) array;
        float32 and float16 keep their type, float64 is stored as FLOAT32 unless data_type
        says otherwise."""
        array = np.asarray(array)
        if array.ndim not in (2, 3):
            raise ValidationError(f"from_numpy needs a 2-D or 3-D array, got shape {array.shape}")
        if array.dtype not in _OF_DTYPE:
            raise ValidationError(f"from_numpy takes float32, float16 or float64 arrays, got "
                                  f"{array.dtype}")
        dt = _OF_DTYPE[array.dtype] if data_type is None else _data_type(data_type)
        shape = array.shape if array.ndim == 3 else (1,) + array.shape
        matrix = cls.with_device(device, MatrixDescriptor(shape[1], shape[2], shape[0],
                                                          data_type=dt))
        matrix._elements()[...] = array.reshape(shape)
        return matrix

    rows = property(lambda self: self._rows)
    columns = property(lambda self: self._columns)
    matrices = property(lambda self: self._matrices)
    row_bytes = property(lambda self: self._row_bytes)
    matrix_bytes = property(lambda self: self._matrix_bytes)

    def _operand(self, batch, row, column, transpose=False):
        """(address, format, rs, cs, bs) in elements of element [batch][row][column], with
        rows and columns swapped if `transpose`."""
        address = (self._address() + batch * self._matrix_bytes + row * self._row_bytes
                   + column * self._esize)
        rs, cs = self._row_bytes // self._esize, 1
        if transpose:
            rs, cs = cs, rs
        return address, _FORMAT[self._data_type], rs, cs, self._matrix_bytes // self._esize

    def __repr__(self):
        return (f"<Matrix {self._matrices}x{self._rows}x{self._columns} "
                f"{self._data_type.name} row_bytes={self._row_bytes}>")


class Vector(_Storage):
    """MPSVector: Vector(buffer, descriptor, offset=0), Vector.with_device(device, descriptor),
    Vector.from_numpy(device, array) (1-D, or 2-D for several vectors)."""

    def __init__(self, buffer, descriptor, offset=0, device=None):
        if not isinstance(descriptor, VectorDescriptor):
            raise TypeError(f"expected a VectorDescriptor, got {descriptor!r}")
        d = descriptor
        self.device = _device_of(buffer, device)
        self._data_type = d.data_type
        self._length, self._vectors, self._vector_bytes = d.length, d.vectors, d.vector_bytes
        self._esize = _ESIZE[d.data_type]
        self._shape = (d.vectors, d.length)
        self._byte_strides = (d.vector_bytes, self._esize)
        self._needed = (d.vectors - 1) * d.vector_bytes + d.length * self._esize
        self._attach(buffer, offset, self._needed, "Vector")

    @classmethod
    def with_device(cls, device, descriptor):
        d = descriptor
        return cls(device.make_buffer(d.vectors * d.vector_bytes), d, 0, device)

    @classmethod
    def from_numpy(cls, device, array, data_type=None):
        array = np.asarray(array)
        if array.ndim not in (1, 2):
            raise ValidationError(f"Vector.from_numpy needs a 1-D or 2-D array, got shape "
                                  f"{array.shape}")
        of_dtype = {**_OF_DTYPE, np.dtype(np.uint32): DataType.UINT32}
        if data_type is None and array.dtype not in of_dtype:
            raise ValidationError(f"Vector.from_numpy takes float32, float16, float64 or uint32 "
                                  f"arrays, got {array.dtype}")
        dt = of_dtype[array.dtype] if data_type is None else _data_type(data_type,
                                                                       allowed=tuple(_ESIZE))
        shape = array.shape if array.ndim == 2 else (1,) + array.shape
        vector = cls.with_device(device, VectorDescriptor(shape[1], shape[0], data_type=dt))
        vector._elements()[...] = array.reshape(shape)
        return vector

    length = property(lambda self: self._length)
    vectors = property(lambda self: self._vectors)
    vector_bytes = property(lambda self: self._vector_bytes)

    def _values(self, first, count, what):
        """count values from element `first` of vector 0, as float32 (read now)."""
        if first + count > self._length:
            raise ValidationError(f"{what} has {self._length} elements; {first + count} needed")
        return np.array(self._elements()[0, first:first + count], dtype=np.float32)

    def __repr__(self):
        return f"<Vector {self._vectors}x{self._length} {self._data_type.name}>"


# ---- kernels ---------------------------------------------------------------------------------

def _origin(value, what):
    try:
        x, y, z = Origin(*value)
    except TypeError:
        raise ValidationError(f"{what} must be an Origin (x=row, y=column, z=0), got "
                              f"{value!r}") from None
    if z != 0 or x < 0 or y < 0:
        raise ValidationError(f"{what} {value!r}: x (row) and y (column) must be >= 0 and z 0")
    return Origin(x, y, z)


def _check_holds(matrix, origin, rows, columns, what, transpose=False):
    """`matrix` holds rows x columns of op(matrix) from `origin` (in stored coordinates)."""
    if not isinstance(matrix, Matrix):
        raise TypeError(f"{what} must be a Matrix, got {type(matrix).__name__}")
    if transpose:
        rows, columns = columns, rows
    x, y, _ = origin
    if x + rows > matrix.rows or y + columns > matrix.columns:
        raise ValidationError(
            f"{what} ({matrix.rows}x{matrix.columns}) does not hold {rows}x{columns} elements"
            f"{' (transposed)' if transpose else ''} from its origin (row {x}, column {y})")


def _check_no_overlap(result, sources, what):
    lo, hi = result._span()
    for source in sources:
        if source is not None:
            s_lo, s_hi = source._span()
            if s_lo < hi and lo < s_hi:
                raise ValidationError(f"{what}: the result overlaps an input; use separate memory")


def _record(command_buffer, command, kernel, keep):
    command_buffer._check_encodable()
    for operand in keep:   # matrices, vectors and private copies (NumPy arrays)
        device = operand.device if isinstance(operand, _Storage) else None
        if device is not None and device is not command_buffer.device:
            raise ValidationError(f"{operand!r} belongs to another device than the command buffer: "
                                  f"encode it on a command buffer of its own device")
    command.keep = keep
    command.description = kernel
    command_buffer._commands.append(command)


def _batch(kernel, matrices_available):
    """The batch range [batch_start, batch_start + size) every operand must hold."""
    start = _count(kernel.batch_start, "batch_start", 0)
    available = min(matrices_available) - start
    size = available if kernel.batch_size is None else _count(kernel.batch_size, "batch_size")
    if size < 1 or size > available:
        raise ValidationError(f"batch_start {start} with batch_size {kernel.batch_size}: the "
                              f"operands hold {min(matrices_available)} matrices")
    return start, size


def _clamp_of(neuron_type, a, b):
    """(lo, hi) if the neuron is a clamp the GEMM can fuse, else None."""
    if neuron_type == CNNNeuronType.NONE:
        return -np.inf, np.inf
    if neuron_type == CNNNeuronType.RELU and a == 0.0:
        return 0.0, np.inf
    if neuron_type == CNNNeuronType.RELUN and a == 0.0:
        return 0.0, b
    return None


class _NeuronMixin:
    """set_neuron_type / neuron_type / neuron_parameter_a, _b, _c (MPSMatrixSum and friends)."""
    _neuron = (CNNNeuronType.NONE, 0.0, 0.0, 0.0)

    def set_neuron_type(self, neuron_type, parameter_a=0.0, parameter_b=0.0, parameter_c=0.0):
        try:
            t = CNNNeuronType(neuron_type)
        except ValueError:
            raise ValidationError(f"unknown neuron type {neuron_type!r}") from None
        if t in (CNNNeuronType.PRELU, CNNNeuronType.COUNT):
            raise ValidationError(f"neuron type {t.name} is not available on matrix kernels")
        self._neuron = (t, float(parameter_a), float(parameter_b), float(parameter_c))

    def neuron_type(self):
        return self._neuron[0]

    neuron_parameter_a = property(lambda self: self._neuron[1])
    neuron_parameter_b = property(lambda self: self._neuron[2])
    neuron_parameter_c = property(lambda self: self._neuron[3])

    def _neuron_command(self, command_buffer, matrix, batch, rows, columns, origin):
        """Apply the neuron in place on rows x columns of `matrix` from origin."""
        address, fmt, rs, cs, bs = matrix._operand(batch[0], origin.x, origin.y)
        window = (address, fmt, bs, rs, cs, 0)
        _neuron_pass(command_buffer, self, (matrix,), (batch[1], rows, columns, 1), self._neuron,
                     window, window)


def _neuron_pass(command_buffer, kernel, keep, extent, neuron, source, destination):
    """destination = neuron(source), one elementwise pass; source and destination are
    operands (address, format, then the strides of the extent's axes)."""
    t, a, b, c = neuron
    command = _native.ElementwiseCommand.neuron(extent, int(t), a, b, c)
    command.set_operand(0, *source)
    command.set_operand(1, *destination)
    _record(command_buffer, command, kernel, keep)


def _bias_operand(bias):
    """The operand of a bias: float32 (format 4), one value per column, the same for every row
    and batch item."""
    return (bias.ctypes.data, 4, 0, 0, 1, 0)


def _bias_pass(command_buffer, kernel, keep, extent, bias, source, destination, alpha=1.0,
               clamp=None):
    """destination = clamp(alpha * source + bias), one elementwise pass."""
    lo, hi = clamp or (-np.inf, np.inf)
    add = _native.ElementwiseCommand.arithmetic(extent, 0, float(alpha), 1.0, 0.0, lo, hi)
    add.set_operand(0, *source)
    add.set_operand(1, *_bias_operand(bias))
    add.set_operand(2, *destination)
    _record(command_buffer, add, kernel, keep)


def _origin_property(which):
    """An origin checked when set; setting it drops the kernel's cached command."""
    def set_origin(self, value):
        self._origins[which] = _origin(value, f"{which}_matrix_origin")
        self._plan = None
    return property(lambda self: self._origins[which], set_origin)


class MatrixMultiplication(Kernel):
    """MPSMatrixMultiplication: C = alpha * op(A) op(B) + beta * C, op(X) = X or its transpose;
    op(A) is result_rows x interior_columns, op(B) interior_columns x result_columns. The sizes,
    transposes, alpha and beta are fixed at creation (as in MPS); origins and the batch range
    may change between encodes (checked when set)."""

    def __init__(self, device, result_rows, result_columns, interior_columns,
                 transpose_left=False, transpose_right=False, alpha=1.0, beta=0.0):
        super().__init__(device)
        self._m = _count(result_rows, "result_rows")
        self._n = _count(result_columns, "result_columns")
        self._k = _count(interior_columns, "interior_columns")
        self._transpose_left, self._transpose_right = bool(transpose_left), bool(transpose_right)
        self._alpha, self._beta = float(alpha), float(beta)
        self._origins = {"left": Origin(), "right": Origin(), "result": Origin()}
        self._batch_start, self._batch_size = 0, None   # None: all the matrices at encode
        self._plan = None   # (operand keys, command): the last encode's command, to copy

    result_rows = property(lambda self: self._m)
    result_columns = property(lambda self: self._n)
    interior_columns = property(lambda self: self._k)
    transpose_left = property(lambda self: self._transpose_left)
    transpose_right = property(lambda self: self._transpose_right)
    alpha = property(lambda self: self._alpha)
    beta = property(lambda self: self._beta)

    left_matrix_origin = _origin_property("left")
    right_matrix_origin = _origin_property("right")
    result_matrix_origin = _origin_property("result")

    @property
    def batch_start(self):
        return self._batch_start

    @batch_start.setter
    def batch_start(self, value):
        self._batch_start = _count(value, "batch_start", 0)
        self._plan = None

    @property
    def batch_size(self):
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value):
        self._batch_size = None if value is None else _count(value, "batch_size")
        self._plan = None

    def encode(self, command_buffer, left_matrix, right_matrix, result_matrix):
        operands = (left_matrix, right_matrix, result_matrix)
        try:
            key = (left_matrix._key, right_matrix._key, result_matrix._key)
        except AttributeError:   # not matrices: _command says which
            key = None
        plan = self._plan
        if key is None or plan is None or plan[0] != key:
            plan = (key, self._command(*operands))
            self._plan = plan
        _record(command_buffer, plan[1].copy(), self, operands)

    def _command(self, left_matrix, right_matrix, result_matrix):
        m, n, k = self._m, self._n, self._k
        lo, ro, co = self._origins["left"], self._origins["right"], self._origins["result"]
        _check_holds(left_matrix, lo, m, k, "left_matrix", self._transpose_left)
        _check_holds(right_matrix, ro, k, n, "right_matrix", self._transpose_right)
        _check_holds(result_matrix, co, m, n, "result_matrix")
        _check_no_overlap(result_matrix, (left_matrix, right_matrix), "MatrixMultiplication")
        start, size = _batch(self, (left_matrix.matrices, right_matrix.matrices,
                                    result_matrix.matrices))
        command = _native.GemmCommand(size, m, n, k, self._alpha, self._beta)
        command.set_operand(0, *left_matrix._operand(start, lo.x, lo.y, self._transpose_left))
        command.set_operand(1, *right_matrix._operand(start, ro.x, ro.y, self._transpose_right))
        command.set_operand(2, *result_matrix._operand(start, co.x, co.y))
        return command


def _vector_operand(vector, batch, first):
    """(address, format, rs, cs, bs) of element `first` of vector `batch` as a column."""
    address = vector._address() + batch * vector.vector_bytes + first * vector._esize
    return address, _FORMAT[vector.data_type], 1, 1, vector.vector_bytes // vector._esize


class MatrixVectorMultiplication(Kernel):
    """MPSMatrixVectorMultiplication: y = alpha * op(A) x + beta * y, op(A) rows x columns.
    Origins: left_matrix_origin (the matrix), right_matrix_origin.x (first element of x),
    result_matrix_origin.x (first element of y)."""

    def __init__(self, device, rows, columns, transpose=False, alpha=1.0, beta=0.0):
        super().__init__(device)
        self.rows, self.columns = _count(rows, "rows"), _count(columns, "columns")
        self.transpose = bool(transpose)
        self.alpha, self.beta = float(alpha), float(beta)
        self.result_matrix_origin = self.left_matrix_origin = self.right_matrix_origin = Origin()
        self.batch_start = 0
        self.batch_size = None

    def encode(self, command_buffer, input_matrix, input_vector, result_vector):
        m, k = self.rows, self.columns
        lo = _origin(self.left_matrix_origin, "left_matrix_origin")
        ro = _origin(self.right_matrix_origin, "right_matrix_origin")
        co = _origin(self.result_matrix_origin, "result_matrix_origin")
        _check_holds(input_matrix, lo, m, k, "input_matrix", self.transpose)
        for vector, first, length, what in ((input_vector, ro.x, k, "input_vector"),
                                            (result_vector, co.x, m, "result_vector")):
            if not isinstance(vector, Vector):
                raise TypeError(f"{what} must be a Vector, got {type(vector).__name__}")
            if vector.data_type not in _FORMAT:
                raise ValidationError(f"{what}: data type {vector.data_type.name} is not "
                                      f"FLOAT32 or FLOAT16")
            if first + length > vector.length or (ro.y, ro.z, co.y, co.z) != (0, 0, 0, 0):
                raise ValidationError(f"{what} (length {vector.length}) does not hold {length} "
                                      f"elements from its origin {first} (y and z must be 0)")
        _check_no_overlap(result_vector, (input_matrix, input_vector), "MatrixVectorMultiplication")
        start, size = _batch(self, (input_matrix.matrices, input_vector.vectors,
                                    result_vector.vectors))
        x = _vector_operand(input_vector, start, ro.x)
        y = _vector_operand(result_vector, start, co.x)
        if self.transpose:   # y^T = x^T A: one output row, A read row by row
            command = _native.GemmCommand(size, 1, m, k, self.alpha, self.beta)
            command.set_operand(0, x[0], x[1], 1, 1, x[4])
            command.set_operand(1, *input_matrix._operand(start, lo.x, lo.y))
            command.set_operand(2, y[0], y[1], 1, 1, y[4])
        else:                # y = A x: one output column
            command = _native.GemmCommand(size, m, 1, k, self.alpha, self.beta)
            command.set_operand(0, *input_matrix._operand(start, lo.x, lo.y))
            command.set_operand(1, *x)
            command.set_operand(2, *y)
        _record(command_buffer, command, self, (input_matrix, input_vector, result_vector))


class MatrixSum(_NeuronMixin, Kernel):
    """MPSMatrixSum: result = neuron(sum_i scale[i] * op(source_i) + bias) over rows x columns,
    op = transpose if `transpose`. offset_vector (UINT32, 2 per source: row, column) places each
    source's window [inferred]; start_index is the first matrix of every batch used."""

    def __init__(self, device, count, rows, columns, transpose=False):
        super().__init__(device)
        self._count, self._rows = _count(count, "count"), _count(rows, "rows")
        self._columns, self._transpose = _count(columns, "columns"), bool(transpose)
        self.result_matrix_origin = Origin()

    count = property(lambda self: self._count)
    rows = property(lambda self: self._rows)
    columns = property(lambda self: self._columns)
    transpose = property(lambda self: self._transpose)

    def encode(self, command_buffer, source_matrices, result_matrix, scale_vector=None,
               offset_vector=None, bias_vector=None, start_index=0):
        sources = list(source_matrices)
        if len(sources) != self._count:
            raise ValidationError(f"MatrixSum of count {self._count} got {len(sources)} sources")
        rows, columns = self._rows, self._columns
        scales = (np.ones(self._count, np.float32) if scale_vector is None
                  else scale_vector._values(0, self._count, "scale_vector"))
        offsets = np.zeros((self._count, 2), np.int64)
        if offset_vector is not None:
            if offset_vector.data_type != DataType.UINT32:
                raise ValidationError("offset_vector must hold UINT32 (row, column) pairs")
            offsets = offset_vector._elements()[0, :2 * self._count].astype(np.int64)
            if offsets.size != 2 * self._count:
                raise ValidationError(f"offset_vector needs {2 * self._count} elements")
            offsets = offsets.reshape(-1, 2)
        co = _origin(self.result_matrix_origin, "result_matrix_origin")
        _check_holds(result_matrix, co, rows, columns, "result_matrix")
        for i, source in enumerate(sources):
            _check_holds(source, Origin(*offsets[i], 0), rows, columns, f"source_matrices[{i}]",
                         self._transpose)
        _check_no_overlap(result_matrix, sources, "MatrixSum")
        start = _count(start_index, "start_index", 0)
        size = min(m.matrices for m in sources + [result_matrix]) - start
        if size < 1:
            raise ValidationError(f"start_index {start} is past the matrices of the operands")
        extent = (size, rows, columns, 1)
        dst = result_matrix._operand(start, co.x, co.y)
        dst_strides = (dst[4], dst[2], dst[3], 0)
        # read (and checked) before anything is recorded: a refused encode records nothing
        bias = None if bias_vector is None else bias_vector._values(0, columns, "bias_vector")

        def src(i):
            a, fmt, rs, cs, bs = sources[i]._operand(start, *offsets[i], self._transpose)
            return (a, fmt, bs, rs, cs, 0)

        # One pass over every source, and the bias as one more source added last (mk_sum: the
        # order of count - 1 two-operand passes); a clamp neuron rides on it, any other
        # neuron takes a pass of its own.
        out = (dst[0], dst[1], *dst_strides)
        operands, weights = [src(i) for i in range(self._count)], [float(s) for s in scales]
        keep = (*sources, result_matrix)
        if bias is not None:
            operands.append(_bias_operand(bias))
            weights.append(1.0)
            keep += (bias,)
        clamp = _clamp_of(*self._neuron[:3]) if len(operands) > 1 else None
        if len(operands) == 1:
            _neuron_pass(command_buffer, self, keep, extent,
                         (CNNNeuronType.LINEAR, weights[0], 0.0, 0.0), operands[0], out)
        else:
            lo, hi = clamp or (-np.inf, np.inf)
            operands, sum_extent = [out] + operands, extent
            if self._transpose:   # walk the sources' columns: read in place, the result strided
                operands = [(a, fmt, bs, cs, rs, c) for a, fmt, bs, rs, cs, c in operands]
                sum_extent = (size, columns, rows, 1)
            command = _native.SumCommand(sum_extent, weights, lo, hi)
            for k, operand in enumerate(operands):
                command.set_operand(k, *operand)
            _record(command_buffer, command, self, keep)
        if self._neuron[0] != CNNNeuronType.NONE and clamp is None:
            self._neuron_command(command_buffer, result_matrix, (start, size), rows, columns, co)


class _MatrixUnary(_NeuronMixin, Kernel):
    """What MatrixFullyConnected and MatrixNeuron share: feature vectors are the rows of the
    input from source_matrix_origin, results go to result_matrix_origin."""

    def __init__(self, device):
        super().__init__(device)
        self.source_number_of_feature_vectors = None   # all the rows from the origin
        self.source_input_feature_channels = None      # all the columns from the origin
        self.alpha = 1.0
        self.source_matrix_origin = self.result_matrix_origin = Origin()
        self.batch_start = 0
        self.batch_size = None

    def _geometry(self, input_matrix):
        if not isinstance(input_matrix, Matrix):
            raise TypeError(f"input_matrix must be a Matrix, got {type(input_matrix).__name__}")
        so = _origin(self.source_matrix_origin, "source_matrix_origin")
        rows = (input_matrix.rows - so.x if self.source_number_of_feature_vectors is None
                else _count(self.source_number_of_feature_vectors,
                            "source_number_of_feature_vectors"))
        inputs = (input_matrix.columns - so.y if self.source_input_feature_channels is None
                  else _count(self.source_input_feature_channels,
                              "source_input_feature_channels"))
        if rows < 1 or inputs < 1:
            raise ValidationError(f"source_matrix_origin {so} is outside input_matrix")
        _check_holds(input_matrix, so, rows, inputs, "input_matrix")
        return so, _origin(self.result_matrix_origin, "result_matrix_origin"), rows, inputs


class MatrixFullyConnected(_MatrixUnary):
    """MPSMatrixFullyConnected: y = neuron(alpha * x W + bias) for every row x of the input;
    W is input_feature_channels x output_feature_channels. ReLU / ReLUN / clamps run inside
    the GEMM; other neurons run on the result right after."""

    def __init__(self, device):
        super().__init__(device)
        self.source_output_feature_channels = None   # all the columns of the weights

    def encode(self, command_buffer, input_matrix, weight_matrix, bias_vector, result_matrix):
        so, co, rows, inputs = self._geometry(input_matrix)
        if not isinstance(weight_matrix, Matrix):
            raise TypeError(f"weight_matrix must be a Matrix, got {type(weight_matrix).__name__}")
        outputs = (weight_matrix.columns if self.source_output_feature_channels is None
                   else _count(self.source_output_feature_channels,
                               "source_output_feature_channels"))
        _check_holds(weight_matrix, Origin(), inputs, outputs, "weight_matrix")
        _check_holds(result_matrix, co, rows, outputs, "result_matrix")
        _check_no_overlap(result_matrix, (input_matrix, weight_matrix), "MatrixFullyConnected")
        start, size = _batch(self, (input_matrix.matrices, result_matrix.matrices))
        bias = None if bias_vector is None else bias_vector._values(0, outputs, "bias_vector")
        t, a, b, _ = self._neuron
        clamp = _clamp_of(t, a, b)
        lo, hi = clamp if clamp else (-np.inf, np.inf)
        command = _native.GemmCommand(size, rows, outputs, inputs, float(self.alpha), 0.0,
                                      bias, lo, hi)
        command.set_operand(0, *input_matrix._operand(start, so.x, so.y))
        w = weight_matrix._operand(0, 0, 0)
        command.set_operand(1, *w[:4], 0)   # the same weights for every batch item
        command.set_operand(2, *result_matrix._operand(start, co.x, co.y))
        _record(command_buffer, command, self, (input_matrix, weight_matrix, result_matrix))
        if clamp is None:
            self._neuron_command(command_buffer, result_matrix, (start, size), rows, outputs, co)


class MatrixNeuron(_MatrixUnary):
    """MPSMatrixNeuron: y = neuron(alpha * x + bias) for every row x of the input."""

    def encode(self, command_buffer, input_matrix, bias_vector, result_matrix):
        so, co, rows, columns = self._geometry(input_matrix)
        _check_holds(result_matrix, co, rows, columns, "result_matrix")
        start, size = _batch(self, (input_matrix.matrices, result_matrix.matrices))
        extent = (size, rows, columns, 1)
        a, fmt, rs, cs, bs = input_matrix._operand(start, so.x, so.y)
        dst = result_matrix._operand(start, co.x, co.y)
        dst_strides = (dst[4], dst[2], dst[3], 0)
        if (a, bs, rs) != (dst[0], dst[4], dst[2]) or fmt != dst[1]:
            _check_no_overlap(result_matrix, (input_matrix,), "MatrixNeuron")
        # read (and checked) before anything is recorded: a refused encode records nothing
        bias = None if bias_vector is None else bias_vector._values(0, columns, "bias_vector")
        # One pass where it can be: alpha * x + bias with a clamp neuron in it, or the neuron
        # alone reading x when alpha is 1 and there is no bias; else a pass per step.
        x, out = (a, fmt, bs, rs, cs, 0), (dst[0], dst[1], *dst_strides)
        t = self._neuron[0]
        clamp = _clamp_of(*self._neuron[:3])
        if bias is not None:
            _bias_pass(command_buffer, self, (input_matrix, bias, result_matrix), extent, bias, x,
                       out, self.alpha, clamp)
            if clamp is not None:
                return
        elif self.alpha == 1.0 and t != CNNNeuronType.NONE:
            _neuron_pass(command_buffer, self, (input_matrix, result_matrix), extent, self._neuron,
                         x, out)
            return
        else:
            _neuron_pass(command_buffer, self, (input_matrix, result_matrix), extent,
                         (CNNNeuronType.LINEAR, float(self.alpha), 0.0, 0.0), x, out)
        if t != CNNNeuronType.NONE:
            self._neuron_command(command_buffer, result_matrix, (start, size), rows, columns, co)
