"""The elementwise driver on short runs (src/elementwise/elementwise.c, ew_geom.block): images
of a few channels, whose pixels hold padding (3 channels stored 4 a pixel, 5 in 16, 17 in 32),
are gathered and scattered in blocks of whole pixels. Every test poisons the whole storage
(or the user's buffer), runs a copy / neuron / arithmetic, and compares every byte with what
was expected: the written channels hold the exact results, padding, neighbouring channels
of shared storage and gaps of user buffers keep the poison."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import ImageFeatureChannelFormat as FMT

POISON = 0xA5
CHANNELS = [1, 2, 3, 4, 5, 17]
DTYPES = {FMT.FLOAT32: np.float32, FMT.FLOAT16: np.float16, FMT.UNORM8: np.uint8}
# (batch, height, width): odd sizes with a batch; 1x61x97 is cut into several chunks whose
# bounds fall inside a pixel's run
SHAPES = [(2, 5, 7), (1, 61, 97)]


def poisoned(device, fmt, n, h, w, c):
    image = mk.Image(device, mk.ImageDescriptor(fmt, w, h, c, n))
    image._address()
    image._root._storage[:] = POISON
    return image


def storage(image):
    """The root's storage as (N, H, W, channel stride) elements of the image's format."""
    root = image._root
    return root._storage.view(DTYPES[root._format]).reshape(
        root.number_of_images, root.height, root.width, root._cs).copy()


def values(rng, fmt, shape, lo=-4.0):
    """Values exact in fmt, so that the results below are exact too."""
    if fmt == FMT.UNORM8:
        return rng.integers(0, 256, shape).astype(np.uint8)
    return (rng.integers(int(lo * 8), 33, shape) / 8).astype(DTYPES[fmt])


def as_float(fmt, a):
    return a.astype(np.float32) / np.float32(255) if fmt == FMT.UNORM8 else a.astype(np.float32)


def encode(fmt, r):
    """float32 results in fmt's storage, rounded as the kernels round (half to even)."""
    if fmt == FMT.UNORM8:
        return np.rint(np.clip(r, 0, 1).astype(np.float32) * np.float32(255)).astype(np.uint8)
    return r.astype(DTYPES[fmt])


def destination(device, fmt, view, n, h, w, c):
    """(root, image to encode into, its first channel in the root, destination offset)."""
    if view == "whole":
        root = poisoned(device, fmt, n, h, w, c)
        return root, root, 0, 0
    if view == "sub_image":
        root = poisoned(device, fmt, n, h, w, c + 3)
        return root, root.sub_image((2, c)), 2, 0
    root = poisoned(device, fmt, n, h, w, c + 2)  # destination_feature_channel_offset
    return root, root, 1, 1


def source(device, fmt, x, view):
    """An image holding x: itself, or channels 1.. of a wider one (a different pixel stride)."""
    if view == "whole":
        return mk.Image.from_numpy(device, x)
    wide = np.concatenate([x[..., :1], x, x[..., :2]], axis=3)
    return mk.Image.from_numpy(device, wide).sub_image((1, x.shape[3]))


def run(device, encode_fn):
    cb = device.make_command_queue().make_command_buffer()
    encode_fn(cb)
    cb.commit()
    cb.wait_until_completed()
    assert cb.error is None, cb.error


VIEWS = ["whole", "sub_image", "offset"]


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "chunks"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("fmt", list(DTYPES), ids=lambda f: f.name)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("prelu", [False, True], ids=["leaky_relu", "prelu"])
def test_neuron_writes_only_its_channels(prelu, channels, fmt, view, shape, isa, device, rng):
    n, h, w = shape
    x = values(rng, fmt, (n, h, w, channels))
    root, dst, c0, offset = destination(device, fmt, view, n, h, w, channels)
    slopes = (np.arange(channels) % 5 - 2).astype(np.float32) / 4
    if prelu:
        kernel = mk.CNNNeuron(device, mk.NNNeuronDescriptor.cnn_neuron_prelu_descriptor(slopes))
    else:
        kernel = mk.CNNNeuronReLU(device, a=0.5)
        slopes = np.full(channels, 0.5, np.float32)
    kernel.destination_feature_channel_offset = offset
    expected = storage(root)
    src = source(device, fmt, x, view)
    run(device, lambda cb: kernel.encode(cb, src, dst))
    v = as_float(fmt, x)
    expected[..., c0:c0 + channels] = encode(fmt, np.where(v >= 0, v, slopes * v))
    assert np.array_equal(storage(root).view(np.uint8), expected.view(np.uint8))


BROADCAST = {"same": lambda n, h, w, c: (n, h, w, c), "per_channel": lambda n, h, w, c: (n, 1, 1, c),
             "scalar": lambda n, h, w, c: (n, 1, 1, 1)}


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "chunks"])
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("fmt", list(DTYPES), ids=lambda f: f.name)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("secondary", list(BROADCAST))
def test_arithmetic_writes_only_its_channels(secondary, channels, fmt, view, shape, isa, device,
                                             rng):
    n, h, w = shape
    x = values(rng, fmt, (n, h, w, channels))
    y = values(rng, FMT.FLOAT32, BROADCAST[secondary](n, h, w, channels))
    root, dst, c0, offset = destination(device, fmt, view, n, h, w, channels)
    kernel = mk.CNNAdd(device)
    kernel.destination_feature_channel_offset = offset
    if secondary != "same":
        kernel.secondary_stride_in_pixels_x = kernel.secondary_stride_in_pixels_y = 0
    if secondary == "scalar":
        kernel.secondary_stride_in_feature_channels = 0
    expected = storage(root)
    a, b = source(device, fmt, x, view), mk.Image.from_numpy(device, y)
    run(device, lambda cb: kernel.encode(cb, a, b, dst))
    expected[..., c0:c0 + channels] = encode(fmt, as_float(fmt, x) + y)
    assert np.array_equal(storage(root).view(np.uint8), expected.view(np.uint8))


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "chunks"])
@pytest.mark.parametrize("fmt", list(DTYPES), ids=lambda f: f.name)
@pytest.mark.parametrize("channels", CHANNELS)
def test_copies_write_only_their_channels(channels, fmt, shape, isa, device, rng):
    """write_bytes into channels [1, 1 + c) of a wider image, read_bytes into a buffer with
    gaps between rows, from_numpy / to_numpy with and without a format conversion."""
    n, h, w = shape
    x = values(rng, fmt, (n, h, w, channels))
    root = poisoned(device, fmt, n, h, w, channels + 2)
    expected = storage(root)
    region = ((0, 0, 0), (w, h, n))
    root.write_bytes(x, region=region, feature_channel_info=(1, channels))
    expected[..., 1:1 + channels] = x
    assert np.array_equal(storage(root).view(np.uint8), expected.view(np.uint8))

    es = x.itemsize
    row = (w * channels + 3) * es
    buf = np.full(n * h * row, POISON, np.uint8)
    root.read_bytes(buf, region=region, feature_channel_info=(1, channels), bytes_per_row=row)
    want = np.full(n * h * row, POISON, np.uint8).view(x.dtype).reshape(n, h, -1)
    want[:, :, :w * channels] = x.reshape(n, h, -1)
    assert np.array_equal(buf, want.view(np.uint8).reshape(-1))

    image = mk.Image.from_numpy(device, x)
    assert np.array_equal(image.to_numpy(), x)
    s = storage(image)
    assert not s[..., channels:].view(np.uint8).any()  # padding stays zero
    for to in DTYPES:
        if to != fmt:
            converted = mk.Image.from_numpy(device, x, channel_format=to)
            s = storage(converted)
            assert np.array_equal(s[..., :channels], encode(to, as_float(fmt, x)))
            assert not s[..., channels:].view(np.uint8).any()
