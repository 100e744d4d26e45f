"""Heaps and buffers (MTLHeap, MTLHeapDescriptor, MTLBuffer): plain memory that tensors and
buffers are placed in. An automatic heap places each new resource at the lowest free 64-byte
aligned offset; a placement heap takes the offset from the caller. A resource made aliasable
gives its bytes back to the automatic allocator while it still exists (it may then share
memory with later resources, as on Metal)."""
import itertools
import weakref

import numpy as np

from mpskernels.enums import CPUCacheMode, HazardTrackingMode, HeapType, StorageMode
from mpskernels.errors import ValidationError

ALIGNMENT = 64   # of every heap placement (MK_ALIGNMENT); one cache line, one AVX-512 vector
_ids = itertools.count(1)
_live = weakref.WeakValueDictionary()   # gpu_resource_id -> resource


def resource_by_id(resource_id):
    return _live.get(resource_id)


def aligned_bytes(nbytes):
    """Zeroed, 64-byte aligned uint8 memory of nbytes (pages untouched until written)."""
    raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def _align(n):
    return -(-n // ALIGNMENT) * ALIGNMENT


def _size(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def check_cpu_access(resource, what):
    if resource.storage_mode == StorageMode.PRIVATE:
        raise ValidationError(f"{what} on {resource!r}: its storage mode is PRIVATE, which the CPU "
                              f"cannot access; make it (or its heap) with StorageMode.SHARED")


class Resource:
    """What buffers and tensors share: their memory, the heap they live in, aliasing."""

    def _init_resource(self, device, memory, storage_mode, heap=None, heap_offset=0):
        self.device = device
        self.label = None
        self.storage_mode = StorageMode(storage_mode)
        self.heap = heap
        self.heap_offset = heap_offset if heap is not None else 0
        self.gpu_resource_id = next(_ids)
        _live[self.gpu_resource_id] = self
        self._memory = memory           # uint8 array: this resource's bytes
        self._aliasable = False

    @property
    def allocated_size(self):
        return _align(self._memory.size)

    def _address(self):
        return self._memory.ctypes.data

    def make_aliasable(self):
        """Let later resources of the heap take this one's memory (it stays usable, but what
        they write shows through). Only for resources placed in a heap."""
        if self.heap is None:
            raise ValidationError(f"make_aliasable on {self!r}: only resources made by a heap "
                                  f"can be aliasable")
        self._aliasable = True

    def is_aliasable(self):
        return self._aliasable


class Buffer(Resource):
    """MTLBuffer: `length` bytes; contents() is a NumPy uint8 view of them."""

    def __init__(self, device, memory, storage_mode=StorageMode.SHARED, heap=None, heap_offset=0):
        self._init_resource(device, memory, storage_mode, heap, heap_offset)

    @property
    def length(self):
        return self._memory.size

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return f"<Buffer{name} {self.length} bytes {self.storage_mode.name}>"

    def contents(self):
        check_cpu_access(self, "contents()")
        return self._memory

    def make_tensor(self, descriptor, offset=0):
        """A tensor viewing this buffer's bytes from `offset` (a multiple of the element
        size), laid out by descriptor.strides (packed when None)."""
        from mpskernels.tensor import Tensor
        return Tensor._on_buffer(self, descriptor, offset)


class HeapDescriptor:
    """MTLHeapDescriptor. size: bytes; type AUTOMATIC (the heap chooses offsets) or
    PLACEMENT (make_buffer / make_tensor take an offset)."""

    def __init__(self, size=0, storage_mode=StorageMode.PRIVATE, type=HeapType.AUTOMATIC,
                 cpu_cache_mode=CPUCacheMode.DEFAULT_CACHE,
                 hazard_tracking_mode=HazardTrackingMode.DEFAULT):
        self.size = size
        self.storage_mode = storage_mode
        self.type = type
        self.cpu_cache_mode = cpu_cache_mode
        self.hazard_tracking_mode = hazard_tracking_mode

    def __repr__(self):
        return (f"HeapDescriptor(size={self.size}, storage_mode={StorageMode(self.storage_mode).name}, "
                f"type={HeapType(self.type).name})")


class Heap:
    """MTLHeap: one block of `size` bytes that buffers and tensors are placed in."""

    def __init__(self, device, descriptor):
        if not isinstance(descriptor, HeapDescriptor):
            raise TypeError(f"make_heap takes a HeapDescriptor, got {type(descriptor).__name__}")
        size = _size("HeapDescriptor.size", descriptor.size)
        if size == 0:
            raise ValidationError("HeapDescriptor.size is 0: give the heap a size in bytes")
        try:
            self.type = HeapType(descriptor.type)
            self.storage_mode = StorageMode(descriptor.storage_mode)
        except ValueError as e:
            raise ValidationError(f"bad HeapDescriptor: {e}") from None
        if self.type == HeapType.SPARSE:
            raise ValidationError("sparse heaps are not supported: use AUTOMATIC or PLACEMENT")
        if self.storage_mode == StorageMode.MEMORYLESS:
            raise ValidationError("a heap cannot be MEMORYLESS")
        self.device = device
        self.label = None
        self.cpu_cache_mode = descriptor.cpu_cache_mode
        self.hazard_tracking_mode = descriptor.hazard_tracking_mode
        self._memory = aligned_bytes(_align(size))[:size]
        self._resources = weakref.WeakSet()

    @property
    def size(self):
        return self._memory.size

    def __repr__(self):
        name = f" {self.label!r}" if self.label else ""
        return f"<Heap{name} {self.type.name} {self.size} bytes, {self.used_size} used>"

    def _address(self):
        return self._memory.ctypes.data

    def _taken(self):
        """(offset, end) of every live resource that is not aliasable, sorted."""
        return sorted((r.heap_offset, r.heap_offset + r.allocated_size)
                      for r in self._resources if not r._aliasable)

    @property
    def used_size(self):
        """Bytes held by live resources that are not aliasable (64-byte granules)."""
        return sum(end - start for start, end in self._taken())

    @property
    def current_allocated_size(self):
        return self.size

    def max_available_size(self, alignment=ALIGNMENT):
        """The largest resource an automatic heap could place now."""
        gaps, at = [], 0
        for start, end in self._taken() + [(self.size, self.size)]:
            gaps.append(start - _align(at))
            at = max(at, end)
        return max(0, max(gaps))

    def _place(self, nbytes, offset, what):
        if self.type == HeapType.AUTOMATIC:
            if offset is not None:
                raise ValidationError(f"{what}: an AUTOMATIC heap chooses offsets itself; pass no "
                                      f"offset (or make the heap with HeapType.PLACEMENT)")
            at = 0
            for start, end in self._taken():
                if at + nbytes <= start:
                    break
                at = max(at, end)
            if at + nbytes > self.size:
                raise ValidationError(
                    f"{what}: {self!r} has no free range of {nbytes} bytes (largest: "
                    f"{self.max_available_size()}); make a resource aliasable or use a larger heap")
            return at
        if offset is None:
            raise ValidationError(f"{what}: a PLACEMENT heap needs the offset to place it at")
        offset = _size("offset", offset)
        if offset % ALIGNMENT:
            raise ValidationError(f"{what}: offset {offset} is not a multiple of {ALIGNMENT}")
        if offset + nbytes > self.size:
            raise ValidationError(f"{what}: {nbytes} bytes at offset {offset} run past the end of "
                                  f"{self!r}")
        return offset

    def _adopt(self, resource):
        self._resources.add(resource)
        return resource

    def make_buffer(self, length, options=None, offset=None):
        """A buffer of `length` bytes in this heap (at `offset` for a placement heap)."""
        length = _size("length", length)
        if length == 0:
            raise ValidationError("make_buffer: length must be at least 1 byte")
        at = self._place(_align(length), offset, f"make_buffer({length})")
        return self._adopt(Buffer(self.device, self._memory[at:at + length], self.storage_mode, self, at))

    def make_tensor(self, descriptor, offset=None):
        """A tensor in this heap (at `offset` for a placement heap)."""
        from mpskernels.tensor import Tensor
        return Tensor._in_heap(self, descriptor, offset)
