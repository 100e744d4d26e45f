"""Tensors (MTLTensor, MTLTensorDescriptor, MTLTensorExtents), MPS_REFERENCE.md §9.2.

Apple's order throughout: dimension 0 is the innermost (fastest varying), so a NumPy shape
(N, H, W, C) is the extents (C, W, H, N); TensorExtents.from_shape and .shape convert.
Strides count elements, not bytes. A tensor is a strided window on plain memory: its own
(device.make_tensor), a buffer's, a heap's, or a NumPy array's (Tensor.from_numpy, no copy
when the array's layout obeys the stride rules)."""
import numpy as np

from mpskernels.enums import (CPUCacheMode, HazardTrackingMode, ImageFeatureChannelFormat,
                              StorageMode, TensorDataType, TensorError, TensorUsage)
from mpskernels.errors import TensorCreationError, ValidationError
from mpskernels.heap import Buffer, Resource, aligned_bytes, check_cpu_access

MAX_RANK = 16

# data type -> (NumPy storage dtype, the elementwise kernels' format or None)
_TYPES = {
    TensorDataType.FLOAT32: (np.dtype(np.float32), ImageFeatureChannelFormat.FLOAT32),
    TensorDataType.FLOAT16: (np.dtype(np.float16), ImageFeatureChannelFormat.FLOAT16),
    TensorDataType.BFLOAT16: (np.dtype(np.uint16), ImageFeatureChannelFormat.BFLOAT16),
    TensorDataType.INT8: (np.dtype(np.int8), None),
    TensorDataType.UINT8: (np.dtype(np.uint8), None),
    TensorDataType.INT16: (np.dtype(np.int16), None),
    TensorDataType.UINT16: (np.dtype(np.uint16), None),
    TensorDataType.INT32: (np.dtype(np.int32), None),
    TensorDataType.UINT32: (np.dtype(np.uint32), None),
}
_FROM_NUMPY = {dtype: t for t, (dtype, _) in _TYPES.items() if t != TensorDataType.BFLOAT16}


def data_type_of(value):
    """A TensorDataType from a TensorDataType, its value, or a NumPy dtype."""
    try:
        t = TensorDataType(value)
    except (ValueError, TypeError):
        try:
            t = _FROM_NUMPY[np.dtype(value)]
        except (TypeError, KeyError):
            raise ValidationError(f"{value!r} is not a tensor data type; use one of "
                                  f"{', '.join(t.name for t in _TYPES)}") from None
    if t not in _TYPES:
        raise ValidationError(f"{t!r} is not a data type a tensor can hold")
    return t


def element_size(data_type):
    return _TYPES[TensorDataType(data_type)][0].itemsize


class TensorExtents:
    """MTLTensorExtents: `rank` values, values[0] the innermost dimension. -1 marks a free
    dimension (only in pipeline reflection and set_input_dimensions)."""

    __slots__ = ("_values",)

    def __init__(self, rank=0, values=None):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
            raise ValidationError(f"a tensor's rank must be an integer in 0..{MAX_RANK}, got {rank!r}")
        values = () if values is None else tuple(values)
        if len(values) != rank:
            raise ValidationError(f"TensorExtents of rank {rank} needs {rank} values, got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < -1:
                raise ValidationError(f"extents must be integers >= -1 (-1: free), got {values}")
        self._values = tuple(int(v) for v in values)

    @classmethod
    def from_shape(cls, shape):
        """From a NumPy shape (outermost first)."""
        shape = tuple(shape)
        return cls(len(shape), shape[::-1])

    @property
    def rank(self):
        return len(self._values)

    @property
    def values(self):
        return self._values

    @property
    def shape(self):
        """As a NumPy shape (outermost first)."""
        return self._values[::-1]

    def extent_at_dimension_index(self, index):
        return self._values[index] if 0 <= index < len(self._values) else -1

    def __len__(self):
        return len(self._values)

    def __iter__(self):
        return iter(self._values)

    def __getitem__(self, index):
        return self._values[index]

    def __eq__(self, other):
        return isinstance(other, TensorExtents) and self._values == other._values

    def __hash__(self):
        return hash(self._values)

    def __repr__(self):
        return f"TensorExtents({self.rank}, {list(self._values)})"


def _extents(name, value):
    if value is None or isinstance(value, TensorExtents):
        return value
    raise TypeError(f"{name} must be a TensorExtents (Apple's order, dimension 0 innermost; "
                    f"TensorExtents.from_shape(numpy_shape) converts), got {value!r}")


def packed_strides(dims, row_pitch_of=None):
    """Packed element strides; with row_pitch_of = element size, dimension 1's stride is
    padded to 64 bytes (what MACHINE_LEARNING usage needs)."""
    strides, step = [], 1
    for i, d in enumerate(dims):
        strides.append(step)
        step *= d
        if i == 0 and row_pitch_of:
            step = -(-step * row_pitch_of // 64) * 64 // row_pitch_of
    return tuple(strides)


def check_strides(strides, dims, esize, machine_learning, what):
    """The stride rules of §9.2; raises ValidationError naming the broken one."""
    if len(strides) != len(dims):
        raise ValidationError(f"{what}: {len(strides)} strides for rank {len(dims)}")
    if dims and strides[0] != 1:
        raise ValidationError(f"{what}: strides[0] must be 1 (dimension 0 is contiguous), got {strides[0]}")
    for i in range(1, len(dims)):
        if strides[i] < strides[i - 1] * dims[i - 1]:
            raise ValidationError(
                f"{what}: strides[{i}] = {strides[i]} is less than strides[{i - 1}] * "
                f"dimensions[{i - 1}] = {strides[i - 1] * dims[i - 1]}; dimensions would overlap")
    if machine_learning and len(dims) > 1:
        if strides[1] * esize % 64:
            raise ValidationError(
                f"{what}: with TensorUsage.MACHINE_LEARNING, strides[1] ({strides[1]} elements, "
                f"{strides[1] * esize} bytes) must be a multiple of 64 bytes")
        for i in range(2, len(dims)):
            if strides[i] != strides[i - 1] * dims[i - 1]:
                raise ValidationError(
                    f"{what}: with TensorUsage.MACHINE_LEARNING only strides[1] may be padded; "
                    f"strides[{i}] must be strides[{i - 1}] * dimensions[{i - 1}] = "
                    f"{strides[i - 1] * dims[i - 1]}, got {strides[i]}")


class TensorDescriptor:
    """MTLTensorDescriptor. dimensions and strides are TensorExtents (dimension 0 innermost);
    strides (elements) default to packed."""

    def __init__(self, dimensions=None, strides=None, data_type=TensorDataType.FLOAT32,
                 usage=TensorUsage.COMPUTE | TensorUsage.RENDER, storage_mode=StorageMode.SHARED,
                 cpu_cache_mode=CPUCacheMode.DEFAULT_CACHE,
                 hazard_tracking_mode=HazardTrackingMode.DEFAULT):
        self.dimensions = TensorExtents(1, [1]) if dimensions is None else dimensions
        self.strides = strides
        self.data_type = data_type
        self.usage = usage
        self.storage_mode = storage_mode
        self.cpu_cache_mode = cpu_cache_mode
        self.hazard_tracking_mode = hazard_tracking_mode

    @property
    def dimensions(self):
        return self._dimensions

    @dimensions.setter
    def dimensions(self, value):
        self._dimensions = _extents("dimensions", value)

    @property
    def strides(self):
        return self._strides

    @strides.setter
    def strides(self, value):
        self._strides = _extents("strides", value)

    def __repr__(self):
        return (f"TensorDescriptor(dimensions={self.dimensions!r}, strides={self.strides!r}, "
                f"data_type={TensorDataType(self.data_type).name})")

    def _checked(self, what):
        """(dims, strides, data type, usage, storage mode), or TensorCreationError."""
        try:
            data_type = data_type_of(self.data_type)
            dims = self.dimensions.values
            if any(d < 1 for d in dims):
                raise ValidationError(f"every dimension must be at least 1, got {list(dims)}")
            usage = TensorUsage(self.usage)
            storage = StorageMode(self.storage_mode)
            if storage == StorageMode.MEMORYLESS:
                raise ValidationError("a tensor cannot be MEMORYLESS")
            ml = bool(usage & TensorUsage.MACHINE_LEARNING)
            esize = element_size(data_type)
            strides = (packed_strides(dims, esize if ml else None) if self.strides is None
                       else self.strides.values)
            check_strides(strides, dims, esize, ml, "TensorDescriptor")
        except (ValidationError, ValueError) as e:
            raise TensorCreationError(f"{what}: invalid descriptor: {e}", TensorError.INVALID_DESCRIPTOR) from None
        return dims, strides, data_type, usage, storage


def _span(dims, strides, esize):
    return (sum((d - 1) * s for d, s in zip(dims, strides)) + 1) * esize


class Tensor(Resource):
    """MTLTensor: dimensions, data_type, usage; strides and buffer when buffer-backed."""

    def __init__(self, *args, **kwargs):
        raise TypeError("make tensors with device.make_tensor(descriptor), buffer.make_tensor, "
                        "heap.make_tensor or Tensor.from_numpy(device, array)")

    @classmethod
    def _make(cls, device, descriptor, what, memory_for, storage=None, heap=None, buffer=None):
        """memory_for(span bytes) -> (uint8 memory, offset in the heap or buffer)."""
        if not isinstance(descriptor, TensorDescriptor):
            raise TypeError(f"{what} takes a TensorDescriptor, got {type(descriptor).__name__}")
        dims, strides, data_type, usage, storage_mode = descriptor._checked(what)
        esize = element_size(data_type)
        memory, offset = memory_for(_span(dims, strides, esize))
        t = object.__new__(cls)
        t._init_resource(device, memory, storage if storage is not None else storage_mode,
                         heap, offset)
        t.dimensions = TensorExtents(len(dims), dims)
        t.data_type = data_type
        t.usage = usage
        t._elements = strides
        t._dtype, t._format = _TYPES[data_type]
        t.buffer = buffer
        t.buffer_offset = offset if buffer is not None else 0
        t._root = t          # tensors are operands of the elementwise/conv commands
        return t

    @classmethod
    def _on_device(cls, device, descriptor):
        return cls._make(device, descriptor, "make_tensor", lambda n: (aligned_bytes(n), 0))

    @classmethod
    def _on_buffer(cls, buffer, descriptor, offset):
        def memory_for(n):
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValidationError(f"buffer.make_tensor: offset must be a non-negative integer, got {offset!r}")
            esize = element_size(data_type_of(descriptor.data_type))
            if offset % esize:
                raise ValidationError(f"buffer.make_tensor: offset {offset} is not a multiple of the "
                                      f"element size {esize}")
            if offset + n > buffer.length:
                raise ValidationError(f"buffer.make_tensor: the tensor spans {n} bytes from offset "
                                      f"{offset}, past the {buffer.length} bytes of {buffer!r}")
            return buffer._memory[offset:offset + n], offset
        return cls._make(buffer.device, descriptor, "buffer.make_tensor", memory_for,
                         storage=buffer.storage_mode, buffer=buffer)

    @classmethod
    def _in_heap(cls, heap, descriptor, offset):
        def memory_for(n):
            at = heap._place(-(-n // 64) * 64, offset, "heap.make_tensor")
            return heap._memory[at:at + n], at
        return heap._adopt(cls._make(heap.device, descriptor, "heap.make_tensor", memory_for,
                                     storage=heap.storage_mode, heap=heap))

    @classmethod
    def from_numpy(cls, device, array, data_type=None, usage=TensorUsage.COMPUTE | TensorUsage.MACHINE_LEARNING):
        """A tensor of the array's shape. Shares the array's memory (no copy) when the array
        is writable, its dtype is the tensor's and its strides obey the stride rules; else a
        copy (always for BFLOAT16, converted from float)."""
        array = np.asarray(array)
        data_type = data_type_of(array.dtype if data_type is None else data_type)
        dtype = _TYPES[data_type][0]
        dims = array.shape[::-1]
        descriptor = TensorDescriptor(TensorExtents(len(dims), dims), data_type=data_type, usage=usage)
        strides = _zero_copy_strides(array, dtype, data_type, usage)
        if strides is not None:
            descriptor.strides = TensorExtents(len(dims), strides)
            buffer = Buffer(device, _byte_window(array, _span(dims, strides, dtype.itemsize)))
            return buffer.make_tensor(descriptor)
        tensor = cls._on_device(device, descriptor)
        tensor._write(array)
        return tensor

    # ---- properties ----------------------------------------------------------------------

    @property
    def strides(self):
        """The element strides (TensorExtents) of a buffer-backed tensor, else None."""
        return TensorExtents(len(self._elements), self._elements) if self.buffer is not None else None

    @property
    def shape(self):
        return self.dimensions.shape

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return f"<Tensor{name} shape {self.shape} {self.data_type.name}>"

    def _view(self):
        """The whole tensor as a NumPy array (numpy order) of its storage dtype, no copy."""
        return _strided(self._memory, self._dtype, self.dimensions.values, self._elements)

    # ---- CPU access ----------------------------------------------------------------------

    def to_numpy(self):
        """The tensor as a NumPy array (numpy order): a view of its memory (no copy) except
        for BFLOAT16, which is converted to float32."""
        check_cpu_access(self, "to_numpy()")
        view = self._view()
        if self.data_type == TensorDataType.BFLOAT16:
            return (view.astype(np.uint32) << 16).view(np.float32)
        return view

    def _write(self, array):
        view = self._view()
        if self.data_type == TensorDataType.BFLOAT16:
            bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16   # nearest even
            nan = np.isnan(np.asarray(array, dtype=np.float32))
            array = np.where(nan, 0x7FC0, rounded).astype(np.uint16)
        np.copyto(view, np.broadcast_to(np.asarray(array), view.shape), casting="unsafe")

    def _slice(self, slice_origin, slice_dimensions, what):
        """The view of the slice, numpy order; checks it is inside the tensor."""
        rank = self.dimensions.rank
        origin = _extents("slice_origin", slice_origin) or TensorExtents(rank, [0] * rank)
        size = _extents("slice_dimensions", slice_dimensions) or self.dimensions
        if origin.rank != rank or size.rank != rank:
            raise ValidationError(f"{what}: slice_origin and slice_dimensions need rank {rank}")
        for i, (o, n, d) in enumerate(zip(origin, size, self.dimensions)):
            if o < 0 or n < 1 or o + n > d:
                raise ValidationError(
                    f"{what}: the slice is out of bounds in dimension {i}: origin {o}, size {n}, "
                    f"but {self!r} has extent {d} there")
        index = tuple(slice(o, o + n) for o, n in zip(origin.values[::-1], size.values[::-1]))
        return self._view()[index], size.values

    def _user_view(self, data, strides, dims, what, writable):
        """The caller's bytes as an array of the slice's shape with `strides` (elements)."""
        strides = packed_strides(dims) if strides is None else _extents("strides", strides).values
        check_strides(strides, dims, self._dtype.itemsize, False, f"{what} strides")
        try:
            memory = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        except (TypeError, ValueError):
            raise TypeError(f"{what}: bytes must be a contiguous buffer (bytearray, NumPy array, "
                            f"memoryview), got {type(data).__name__}") from None
        needed = _span(dims, strides, self._dtype.itemsize)
        if memory.size < needed:
            raise ValidationError(f"{what}: the slice needs {needed} bytes with these strides; "
                                  f"the given buffer holds {memory.size}")
        if writable and not memory.flags.writeable:
            raise ValidationError(f"{what}: the destination buffer is read-only")
        return _strided(memory[:needed], self._dtype, dims, strides)

    def get_bytes(self, bytes, strides=None, slice_origin=None, slice_dimensions=None):
        """Copy a slice (default: all) into `bytes` (a writable buffer), laid out with element
        `strides` (default packed). Raw storage: BFLOAT16 as its 16-bit patterns."""
        check_cpu_access(self, "get_bytes")
        view, dims = self._slice(slice_origin, slice_dimensions, "get_bytes")
        np.copyto(self._user_view(bytes, strides, dims, "get_bytes", True), view)

    def replace_slice(self, slice_origin, slice_dimensions, bytes, strides=None):
        """Copy `bytes` (laid out with element `strides`, default packed) into a slice."""
        check_cpu_access(self, "replace_slice")
        view, dims = self._slice(slice_origin, slice_dimensions, "replace_slice")
        np.copyto(view, self._user_view(bytes, strides, dims, "replace_slice", False))


def _zero_copy_strides(array, dtype, data_type, usage):
    """Apple-order element strides if the array can be wrapped as it is, else None."""
    if (array.dtype != dtype or data_type == TensorDataType.BFLOAT16 or not array.flags.writeable
            or array.size == 0 or array.ctypes.data % dtype.itemsize):
        return None
    dims = array.shape[::-1]
    strides, step = [], 1
    for d, s in zip(dims, array.strides[::-1]):
        if d == 1:
            s = step * dtype.itemsize   # any stride works for a single element: take packed
        if s % dtype.itemsize or s <= 0:
            return None
        strides.append(s // dtype.itemsize)
        step = strides[-1] * d
    try:
        check_strides(strides, dims, dtype.itemsize, bool(TensorUsage(usage) & TensorUsage.MACHINE_LEARNING), "")
    except ValidationError:
        return None
    return tuple(strides)


class _Window:
    """Exposes raw memory to NumPy and keeps its owner alive."""

    def __init__(self, owner, address, nbytes):
        self.owner = owner
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                    "data": (address, False), "version": 3}


def _byte_window(array, nbytes):
    """The nbytes of memory starting at array's first element, as uint8 (no copy)."""
    return np.asarray(_Window(array, array.ctypes.data, nbytes))


def _strided(memory, dtype, dims, strides):
    """uint8 memory as an array of `dtype`, numpy order, Apple-order element dims/strides."""
    return np.ndarray(tuple(dims[::-1]), dtype=dtype, buffer=memory,
                      strides=tuple(s * dtype.itemsize for s in strides[::-1]))
