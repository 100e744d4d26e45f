"""Heaps: automatic and placement, used_size, aliasable resources."""
import gc

import numpy as np
import pytest

import mpskernels as mk

SHARED = mk.StorageMode.SHARED


def desc(*shape, dtype=mk.TensorDataType.FLOAT32):
    return mk.TensorDescriptor(mk.TensorExtents.from_shape(shape), data_type=dtype)


def test_automatic_heap_places_and_frees(device):
    heap = device.make_heap(mk.HeapDescriptor(size=1024, storage_mode=SHARED))
    assert heap.size == 1024 and heap.used_size == 0
    a = heap.make_tensor(desc(10))          # 40 bytes -> one 64-byte granule
    b = heap.make_buffer(100)               # 128
    assert (a.heap_offset, b.heap_offset) == (0, 64) and heap.used_size == 192
    a.to_numpy()[:] = 1
    b.contents()[:] = 2
    assert a.to_numpy().sum() == 10 and b.contents()[0] == 2
    del a
    gc.collect()
    assert heap.used_size == 128
    c = heap.make_tensor(desc(16))          # reuses the freed range
    assert c.heap_offset == 0
    with pytest.raises(mk.ValidationError, match="no free range of 1024 bytes"):
        heap.make_buffer(1000)
    assert heap.max_available_size() == 1024 - 192
    with pytest.raises(mk.ValidationError, match="AUTOMATIC heap chooses"):
        heap.make_buffer(8, offset=0)


def test_aliasable_resources_share_memory(device):
    heap = device.make_heap(mk.HeapDescriptor(size=256, storage_mode=SHARED))
    a = heap.make_tensor(desc(64))
    a.make_aliasable()
    assert a.is_aliasable() and heap.used_size == 0
    b = heap.make_tensor(desc(64))
    assert b.heap_offset == a.heap_offset
    b.to_numpy()[:] = 5
    np.testing.assert_array_equal(a.to_numpy(), 5)   # what b writes shows through a
    with pytest.raises(mk.ValidationError, match="only resources made by a heap"):
        device.make_buffer(16).make_aliasable()


def test_placement_heap(device):
    heap = device.make_heap(mk.HeapDescriptor(size=512, storage_mode=SHARED, type=mk.HeapType.PLACEMENT))
    t = heap.make_tensor(desc(4, 16), offset=256)
    assert t.heap_offset == 256 and heap.used_size == 256
    with pytest.raises(mk.ValidationError, match="needs the offset"):
        heap.make_tensor(desc(4))
    with pytest.raises(mk.ValidationError, match="not a multiple of 64"):
        heap.make_tensor(desc(4), offset=10)
    with pytest.raises(mk.ValidationError, match="past the end"):
        heap.make_buffer(300, offset=256)


def test_bad_heap_descriptors(device):
    with pytest.raises(mk.ValidationError, match="size is 0"):
        device.make_heap(mk.HeapDescriptor())
    with pytest.raises(TypeError):
        device.make_heap(1024)
    with pytest.raises(mk.ValidationError, match="sparse"):
        device.make_heap(mk.HeapDescriptor(size=64, type=mk.HeapType.SPARSE))


def test_buffer_tensor(device):
    buf = device.make_buffer(256)
    t = buf.make_tensor(desc(2, 8), offset=64)
    t.to_numpy()[:] = 3
    assert buf.contents().view(np.float32)[16:32].tolist() == [3.0] * 16
    assert t.buffer is buf and t.buffer_offset == 64 and t.strides.values == (1, 8)
    with pytest.raises(mk.ValidationError, match="past the 256 bytes"):
        buf.make_tensor(desc(2, 8), offset=200)
    with pytest.raises(mk.ValidationError, match="multiple of the element size"):
        buf.make_tensor(desc(2), offset=2)
