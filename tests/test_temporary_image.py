"""TemporaryImage: read counts, aliasing in the arena, poisoning, and every misuse raising."""
import gc
import warnings

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import (CNNAdd, CNNNeuronReLU, Image, ImageDescriptor, TemporaryImage,
                        TemporaryImageError, ValidationError)

F32 = mk.ImageFeatureChannelFormat.FLOAT32


def desc(w=8, h=6, c=5, n=1, fmt=F32):
    return ImageDescriptor(fmt, w, h, c, n)


@pytest.fixture
def device():
    return mk.Device(num_threads=2)


def run(cb):
    cb.commit()
    cb.wait_until_completed()
    assert cb.status == mk.CommandBufferStatus.COMPLETED, cb.error


def test_32_chained_relus_alias_two_images(device):
    """The issue's acceptance case: exact result, arena of 2 images, 31 requested."""
    x = np.random.default_rng(0).standard_normal((1, 112, 112, 64)).astype(np.float32)
    src = Image.from_numpy(device, x)
    dst = Image(device, desc(112, 112, 64))
    relu = CNNNeuronReLU(device, a=0.0)
    cb = device.make_command_queue().make_command_buffer()
    image = src
    for _ in range(31):
        t = TemporaryImage(cb, desc(112, 112, 64))
        relu.encode(cb, image, t)
        assert image is src or image.read_count == 0
        image = t
    relu.encode(cb, image, dst)
    run(cb)
    assert np.array_equal(dst.to_numpy(), np.maximum(x, 0))
    one = src.resource_size()
    assert one == 112 * 112 * 64 * 4
    stats = cb.memory_stats
    assert stats.peak_bytes <= 2 * one + 2 * 64
    assert stats.requested_bytes >= 31 * one
    assert stats.lower_bound_bytes == 2 * one
    assert stats.allocations == 31


def test_arena_is_warm_after_first_buffer(device):
    queue = device.make_command_queue()
    relu = CNNNeuronReLU(device, a=0.0)
    src = Image.from_numpy(device, np.ones((16, 16, 8), np.float32))
    dst = Image(device, desc(16, 16, 8))
    for i in range(3):
        cb = queue.make_command_buffer()
        t = relu.encode(cb, src)            # image-returning: a temporary
        relu.encode(cb, t, dst)
        run(cb)
        assert cb.memory_stats.system_allocations == (1 if i == 0 else 0)
    assert device.arena_cache_bytes > 0
    assert device.trim() > 0
    assert device.arena_cache_bytes == 0


def test_read_count_rules(device):
    cb = device.make_command_queue().make_command_buffer()
    relu = CNNNeuronReLU(device, a=0.0)
    src = Image.from_numpy(device, np.ones((4, 4, 3), np.float32))
    t = TemporaryImage(cb, desc(4, 4, 3))
    t.label = "features"
    assert t.read_count == 1
    relu.encode(cb, src, t)                 # writes do not change read_count
    relu.encode(cb, src, t)
    assert t.read_count == 1
    t.read_count = 2
    out1, out2 = TemporaryImage(cb, desc(4, 4, 3)), TemporaryImage(cb, desc(4, 4, 3))
    relu.encode(cb, t, out1)
    assert t.read_count == 1
    relu.encode(cb, t, out2)
    assert t.read_count == 0
    with pytest.raises(TemporaryImageError, match=r"'features'.*read_count reached 0"):
        relu.encode(cb, t, out1)            # read at 0
    with pytest.raises(TemporaryImageError, match=r"'features'.*read_count reached 0"):
        relu.encode(cb, src, t)             # write at 0
    with pytest.raises(TemporaryImageError, match=r"'features'.*already 0"):
        t.read_count = 3                    # change at 0
    out1.read_count = 0
    out2.read_count = 0
    run(cb)


def test_cpu_access_and_other_buffer_raise(device):
    queue = device.make_command_queue()
    cb, other = queue.make_command_buffer(), queue.make_command_buffer()
    t = TemporaryImage(cb, desc())
    t.label = "scratch"
    for call in (lambda: t.read_bytes(), lambda: t.write_bytes(b"\0" * 4096), lambda: t.to_numpy()):
        with pytest.raises(TemporaryImageError, match=r"'scratch'.*private storage"):
            call()
    relu = CNNNeuronReLU(device, a=0.0)
    src = Image.from_numpy(device, np.ones((6, 8, 5), np.float32))
    with pytest.raises(TemporaryImageError, match=r"'scratch'.*another command buffer"):
        relu.encode(other, src, t)
    t.read_count = 0
    run(cb)
    with pytest.raises(mk.CommandBufferStateError):
        TemporaryImage(cb, desc())          # cannot make one on a committed buffer


def test_leftover_read_count_warns(device):
    cb = device.make_command_queue().make_command_buffer()
    src = Image.from_numpy(device, np.ones((6, 8, 5), np.float32))
    t = TemporaryImage(cb, desc())
    t.label = "forgotten"
    CNNNeuronReLU(device, a=0.0).encode(cb, src, t)
    with pytest.warns(ResourceWarning, match="'forgotten'.*read_count 1"):
        run(cb)
    # read_count brought to 0: no warning
    cb = device.make_command_queue().make_command_buffer()
    t = TemporaryImage(cb, desc())
    t.read_count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(cb)


def test_views_hold_a_read_on_the_parent(device):
    cb = device.make_command_queue().make_command_buffer()
    relu = CNNNeuronReLU(device, a=0.0)
    x = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    src = Image.from_numpy(device, x)
    parent = TemporaryImage(cb, desc(5, 4, 6, 3))
    relu.encode(cb, src, parent)
    children = parent.batch_representation()
    assert parent.read_count == 4 and all(c.read_count == 1 for c in children)
    outs = [Image(device, desc(5, 4, 6)) for _ in children]
    for child, out in zip(children, outs):
        relu.encode(cb, child, out)
    assert parent.read_count == 1
    half = parent.sub_image((2, 3))
    assert half.feature_channels == 3 and parent.read_count == 2
    half_out = Image(device, desc(5, 4, 3, 3))
    relu.encode(cb, half, half_out)
    parent.read_count = 0
    run(cb)
    for i, out in enumerate(outs):
        assert np.array_equal(out.to_numpy()[0], np.maximum(x[i], 0))
    assert np.array_equal(half_out.to_numpy(), np.maximum(x[..., 2:5], 0))


def test_prefetch_storage_is_only_a_hint(device):
    cb = device.make_command_queue().make_command_buffer()
    TemporaryImage.prefetch_storage(cb, [desc(64, 64, 32)] * 2)
    assert device.arena_cache_bytes >= 2 * 64 * 64 * 32 * 4
    src = Image.from_numpy(device, np.ones((64, 64, 32), np.float32))
    t = CNNNeuronReLU(device, a=0.0).encode(cb, src)
    t.read_count = 0
    run(cb)
    assert cb.memory_stats.system_allocations == 0


def test_default_allocators(device):
    cb = device.make_command_queue().make_command_buffer()
    t = TemporaryImage.default_allocator().image(cb, desc(), None)
    i = Image.default_allocator().image(cb, desc(), None)
    assert isinstance(t, TemporaryImage) and type(i) is Image
    assert isinstance(TemporaryImage.default_allocator(), mk.ImageAllocator)
    t.read_count = 0
    run(cb)


def random_graph(device, seed, poison):
    """A random DAG of ReLU/Linear/Add over temporaries with exact read counts; returns
    (library result, numpy result)."""
    rng = np.random.default_rng(seed)
    device.poison_temporaries = poison
    h, w, c = int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.integers(1, 40))
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    cb = device.make_command_queue().make_command_buffer()
    src = Image.from_numpy(device, x)
    nodes = [(src, x)]          # (image, numpy value)
    readers = [0]
    ops = []
    for _ in range(int(rng.integers(3, 25))):
        if rng.random() < 0.4 and len(nodes) > 1:
            i, j = rng.choice(len(nodes), 2, replace=False)
            ops.append(("add", int(i), int(j)))
            readers[i] += 1
            readers[j] += 1
        else:
            i = int(rng.integers(len(nodes)))
            ops.append(("relu" if rng.random() < 0.5 else "linear", i))
            readers[i] += 1
        nodes.append(None)
        readers.append(0)
    last = len(nodes) - 1
    readers[last] += 1                           # the final copy into a persistent image
    images = [src]
    values = [x]
    relu, linear, add = CNNNeuronReLU(device, a=0.1), mk.CNNNeuronLinear(device, a=0.5, b=-0.25), CNNAdd(device)
    for k, op in enumerate(ops, start=1):
        t = TemporaryImage(cb, desc(w, h, c))
        t.read_count = max(readers[k], 1)        # an unread node gets 0 once written, below
        if op[0] == "add":
            add.encode(cb, images[op[1]], images[op[2]], t)
            values.append(values[op[1]] + values[op[2]])
        elif op[0] == "relu":
            relu.encode(cb, images[op[1]], t)
            v = values[op[1]]
            values.append(np.where(v >= 0, v, np.float32(0.1) * v))
        else:
            linear.encode(cb, images[op[1]], t)
            values.append(np.float32(0.5) * values[op[1]] + np.float32(-0.25))
        if readers[k] == 0:
            t.read_count = 0
        images.append(t)
    out = Image(device, desc(w, h, c))
    mk.CNNNeuronLinear(device, a=1.0, b=0.0).encode(cb, images[last], out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)   # read counts are exact: no leftovers
        run(cb)
    assert all(t.read_count == 0 for t in images[1:])
    return out.to_numpy()[0], values[last]


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_random_graph_matches_numpy(device, seed, poison):
    got, want = random_graph(device, seed, poison)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_poison_fills_released_memory_with_nan(device):
    """With poisoning on, a temporary's bytes hold NaN from the moment its read_count hits 0,
    so a kernel that wrongly reads them later produces NaN instead of plausible stale data."""
    import ctypes
    device.poison_temporaries = True
    cb = device.make_command_queue().make_command_buffer()
    src = Image.from_numpy(device, np.ones((4, 4, 16), np.float32))
    relu = CNNNeuronReLU(device, a=0.0)
    a = relu.encode(cb, src)
    out = Image(device, desc(4, 4, 16))
    relu.encode(cb, a, out)                 # the last read of `a`: released, then poisoned
    run(cb)
    assert np.array_equal(out.to_numpy(), np.ones((1, 4, 4, 16), np.float32))
    # the arena block is idle in the device's cache, not freed: look at what `a` left there
    raw = (ctypes.c_float * (4 * 4 * 16)).from_address(a._arena_address)
    assert np.isnan(np.frombuffer(raw, dtype=np.float32)).all()


def test_temporaries_do_not_leak(device):
    queue = device.make_command_queue()
    relu = CNNNeuronReLU(device, a=0.0)
    src = Image.from_numpy(device, np.ones((8, 8, 8), np.float32))
    dst = Image(device, desc(8, 8, 8))
    gc.collect()
    for _ in range(50):
        cb = queue.make_command_buffer()
        relu.encode(cb, relu.encode(cb, src), dst)
        run(cb)
    gc.collect()
    assert device.arena_cache_bytes <= 2 * 8 * 8 * 16 * 4 + 128
