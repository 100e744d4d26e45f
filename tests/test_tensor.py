"""Tensors: extents in Apple's order, the stride rules of §9.2, NumPy round trips (zero-copy
where the layout allows), slices."""
import numpy as np
import pytest

import mpskernels as mk

T = mk.TensorDataType
ML = mk.TensorUsage.COMPUTE | mk.TensorUsage.MACHINE_LEARNING


def test_data_type_values_are_apples():
    assert (T.FLOAT32, T.FLOAT16, T.BFLOAT16, T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32,
            T.UINT32) == (3, 16, 121, 45, 49, 37, 41, 29, 33)
    assert mk.TensorUsage.MACHINE_LEARNING == 4 and mk.Stages.MACHINE_LEARNING == 1 << 30


def test_extents_innermost_first():
    e = mk.TensorExtents.from_shape((2, 3, 5))
    assert e.rank == 3 and e.values == (5, 3, 2) and e.shape == (2, 3, 5)
    assert e.extent_at_dimension_index(0) == 5 and e.extent_at_dimension_index(3) == -1
    assert mk.TensorExtents().rank == 0
    with pytest.raises(mk.ValidationError, match="rank"):
        mk.TensorExtents(17, [1] * 17)
    with pytest.raises(mk.ValidationError, match="needs 2 values"):
        mk.TensorExtents(2, [1])


@pytest.mark.parametrize("strides, message", [
    ((2, 8), r"strides\[0\] must be 1"),
    ((1, 4), r"strides\[1\] = 4 is less than"),
    ((1, 8, 16), r"strides\[2\] = 16 is less than"),
])
def test_stride_rules(device, strides, message):
    d = mk.TensorDescriptor(mk.TensorExtents(len(strides), [5, 3, 2][:len(strides)]),
                            strides=mk.TensorExtents(len(strides), strides))
    with pytest.raises(mk.TensorCreationError, match=message) as e:
        device.make_buffer(1024).make_tensor(d)
    assert e.value.code == mk.TensorError.INVALID_DESCRIPTOR


def test_machine_learning_stride_rules(device):
    dims = mk.TensorExtents(3, [5, 3, 2])
    buf = device.make_buffer(4096)
    bad_pitch = mk.TensorDescriptor(dims, strides=mk.TensorExtents(3, [1, 8, 24]), usage=ML)
    with pytest.raises(mk.TensorCreationError, match="multiple of 64 bytes"):
        buf.make_tensor(bad_pitch)
    bad_outer = mk.TensorDescriptor(dims, strides=mk.TensorExtents(3, [1, 16, 64]), usage=ML)
    with pytest.raises(mk.TensorCreationError, match="only strides.1. may be padded"):
        buf.make_tensor(bad_outer)
    ok = buf.make_tensor(mk.TensorDescriptor(dims, strides=mk.TensorExtents(3, [1, 16, 48]), usage=ML))
    assert ok.strides.values == (1, 16, 48)
    # a device tensor picks strides that obey the rule: rows padded to 64 bytes
    t = device.make_tensor(mk.TensorDescriptor(dims, usage=ML))
    assert t.strides is None and t._elements == (1, 16, 48)


def test_descriptor_takes_extents_only():
    with pytest.raises(TypeError, match="from_shape"):
        mk.TensorDescriptor((2, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8, np.int16,
                                   np.uint16, np.int32, np.uint32])
def test_from_numpy_round_trip(device, dtype):
    a = (np.arange(2 * 3 * 16) % 100).astype(dtype).reshape(2, 3, 16)
    t = mk.Tensor.from_numpy(device, a)
    assert t.dimensions.values == (16, 3, 2) and t.data_type == mk.TensorDataType(T[np.dtype(dtype).name.upper()])
    np.testing.assert_array_equal(t.to_numpy(), a)


def test_from_numpy_zero_copy_when_layout_allows(device):
    a = np.zeros((4, 16), np.float32)              # 64-byte rows: shareable with ML usage
    t = mk.Tensor.from_numpy(device, a)
    assert np.shares_memory(t.to_numpy(), a) and t.buffer is not None
    a[1, 2] = 7
    assert t.to_numpy()[1, 2] == 7
    padded = np.zeros((4, 32), np.float32)[:, :5]  # padded rows, obeys the rules
    assert np.shares_memory(mk.Tensor.from_numpy(device, padded).to_numpy(), padded)
    odd = np.ones((3, 5), np.float32)             # 20-byte rows: copied for ML usage
    t = mk.Tensor.from_numpy(device, odd)
    assert not np.shares_memory(t.to_numpy(), odd)
    np.testing.assert_array_equal(t.to_numpy(), odd)
    assert np.shares_memory(mk.Tensor.from_numpy(device, odd, usage=mk.TensorUsage.COMPUTE).to_numpy(), odd)
    fortran = np.asfortranarray(np.ones((16, 16), np.float32))
    assert not np.shares_memory(mk.Tensor.from_numpy(device, fortran).to_numpy(), fortran)
    ro = np.zeros((4, 16), np.float32)
    ro.flags.writeable = False
    assert not np.shares_memory(mk.Tensor.from_numpy(device, ro).to_numpy(), ro)


def test_bfloat16_rounds_to_nearest_even(device):
    # 1.00390625 and 1.01171875 lie halfway between two bfloat16 values: the even one wins
    x = np.array([1.0, 1.00390625, 1.01171875, 1.0117188, -2.5, np.inf], np.float32)
    t = mk.Tensor.from_numpy(device, x, data_type=T.BFLOAT16)
    want = np.array([1.0, 1.0, 1.015625, 1.015625, -2.5, np.inf], np.float32)
    np.testing.assert_array_equal(t.to_numpy(), want)
    assert np.isnan(mk.Tensor.from_numpy(device, np.array([np.nan], np.float32), data_type=T.BFLOAT16).to_numpy()[0])


def test_slices(device):
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    t = mk.Tensor.from_numpy(device, a)
    out = np.zeros((2, 3, 4), np.float32)
    origin, size = mk.TensorExtents(3, [1, 2, 1]), mk.TensorExtents(3, [4, 3, 2])
    t.get_bytes(out, None, origin, size)
    np.testing.assert_array_equal(out, a[1:3, 2:5, 1:5])
    # strided user buffer: rows of 8 elements
    wide = np.zeros((2, 3, 8), np.float32)
    t.get_bytes(wide, mk.TensorExtents(3, [1, 8, 24]), origin, size)
    np.testing.assert_array_equal(wide[..., :4], a[1:3, 2:5, 1:5])
    t.replace_slice(origin, size, -out)
    np.testing.assert_array_equal(t.to_numpy()[1:3, 2:5, 1:5], -a[1:3, 2:5, 1:5])
    np.testing.assert_array_equal(t.to_numpy()[0], a[0])
    with pytest.raises(mk.ValidationError, match="out of bounds in dimension 2"):
        t.get_bytes(out, None, mk.TensorExtents(3, [0, 0, 3]), size)
    with pytest.raises(mk.ValidationError, match="needs 96 bytes"):
        t.get_bytes(np.zeros(3, np.float32), None, origin, size)
    with pytest.raises(mk.ValidationError, match="read-only"):
        t.get_bytes(bytes(96), None, origin, size)


def test_private_storage_refuses_cpu_access(device):
    heap = device.make_heap(mk.HeapDescriptor(size=4096))   # PRIVATE by default
    t = heap.make_tensor(mk.TensorDescriptor(mk.TensorExtents(1, [4])))
    with pytest.raises(mk.ValidationError, match="PRIVATE"):
        t.to_numpy()
