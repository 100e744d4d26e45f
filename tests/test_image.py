"""Image storage, read_bytes / write_bytes (MPS_REFERENCE.md §3.2), NumPy conversion, views."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import DataLayout, Image, ImageDescriptor, ValidationError
from mpskernels import ImageFeatureChannelFormat as F

HWC = DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS
CHW = DataLayout.FEATURE_CHANNELS_X_HEIGHT_X_WIDTH
DTYPES = {F.FLOAT32: np.float32, F.FLOAT16: np.float16, F.UNORM8: np.uint8, F.UNORM16: np.uint16}


@pytest.fixture(scope="module")
def device():
    return mk.Device(num_threads=2)


def random(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("fmt", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 4, 3, 17), (1, 9, 2, 33)])
def test_numpy_round_trip(device, fmt, shape):
    x = random(shape, DTYPES[fmt])
    image = Image.from_numpy(device, x)
    assert image.feature_channel_format == fmt
    want = x if x.ndim == 4 else x[None]
    assert np.array_equal(image.to_numpy(), want)
    planar = Image.from_numpy(device, np.ascontiguousarray(want.transpose(0, 3, 1, 2)), CHW)
    assert np.array_equal(planar.to_numpy(), want)
    assert np.array_equal(planar.to_numpy(CHW), want.transpose(0, 3, 1, 2))


def test_from_numpy_converts(device):
    x = np.linspace(-0.5, 1.5, 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    u8 = Image.from_numpy(device, x, channel_format=F.UNORM8).to_numpy()[0]
    assert np.array_equal(u8, np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))
    h = Image.from_numpy(device, x, channel_format=F.FLOAT16).to_numpy()[0]
    assert np.array_equal(h, x.astype(np.float16))
    bf = Image.from_numpy(device, x, channel_format=F.BFLOAT16)
    got = bf.to_numpy()[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x, rtol=2 ** -8)
    assert np.array_equal(got.view(np.uint32) & 0xFFFF, np.zeros_like(got, dtype=np.uint32))
    f64 = Image.from_numpy(device, x.astype(np.float64))
    assert f64.feature_channel_format == F.FLOAT32
    strided = Image.from_numpy(device, x[:, ::2, ::-1])
    assert np.array_equal(strided.to_numpy()[0], x[:, ::2, ::-1])


def test_read_write_bytes_regions_channels_and_strides(device):
    x = random((3, 6, 7, 10), np.float32)
    image = Image.from_numpy(device, x)
    # whole image 1 in both layouts
    assert np.array_equal(image.read_bytes(None, HWC, 1)[0], x[1])
    assert np.array_equal(image.read_bytes(None, CHW, 2)[0], x[2].transpose(2, 0, 1))
    # region, feature channel range, two images from image_index + origin.z
    got = image.read_bytes(None, HWC, 0, region=((2, 1, 1), (4, 3, 2)), feature_channel_info=(4, 5))
    assert np.array_equal(got, x[1:3, 1:4, 2:6, 4:9])
    # row padding in the user's buffer
    buf = np.zeros(2 * 3 * 40, dtype=np.float32)
    image.read_bytes(buf, CHW, 1, region=((1, 2, 0), (4, 3, 1)), feature_channel_info=(0, 2),
                     bytes_per_row=40 * 4)
    rows = buf.reshape(2, 3, 40)[:, :, :4]
    assert np.array_equal(rows, x[1, 2:5, 1:5, 0:2].transpose(2, 0, 1))
    # write a patch, read it back; the rest is untouched
    patch = random((2, 3, 3), np.float32, seed=5)
    image.write_bytes(patch, HWC, 2, region=(1, 2, 3, 2), feature_channel_info=(7, 3))
    want = x.copy()
    want[2, 2:4, 1:4, 7:10] = patch.reshape(2, 3, 3)[:2]
    assert np.array_equal(image.to_numpy(), want)


def test_write_bytes_with_column_stride(device):
    image = Image(device, ImageDescriptor(F.FLOAT32, 4, 2, 3))
    data = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)   # 2 spare values per pixel
    image.write_bytes(data, HWC, bytes_per_column=20)
    assert np.array_equal(image.to_numpy()[0], data[..., :3])


def test_unorm_and_bf16_read_bytes_are_raw(device):
    x = random((2, 3, 4), np.uint8)
    assert np.array_equal(Image.from_numpy(device, x).read_bytes()[0], x)
    bf = Image.from_numpy(device, np.array([[[1.0, -2.0]]], np.float32), channel_format=F.BFLOAT16)
    assert bf.read_bytes().dtype == np.uint16
    assert list(bf.read_bytes().reshape(-1)) == [0x3F80, 0xC000]


@pytest.mark.parametrize("call", [
    lambda im: im.read_bytes(None, HWC, 3),
    lambda im: im.read_bytes(None, HWC, region=(0, 0, 9, 1)),
    lambda im: im.read_bytes(None, HWC, feature_channel_info=(4, 3)),
    lambda im: im.read_bytes(np.zeros(3, np.float32)),
    lambda im: im.read_bytes(bytes(10 ** 4)),
    lambda im: im.write_bytes(np.zeros(3, np.float32)),
    lambda im: im.read_bytes(None, HWC, bytes_per_row=6),
])
def test_bad_read_write_raises(device, call):
    image = Image(device, ImageDescriptor(F.FLOAT32, 8, 4, 5, 2))
    with pytest.raises(ValidationError):
        call(image)


@pytest.mark.parametrize("kwargs", [
    dict(channel_format=F.NONE), dict(channel_format=99), dict(width=0), dict(height=-1),
    dict(feature_channels=1.5), dict(number_of_images=0), dict(width=2 ** 31),
    dict(width=2 ** 20, height=2 ** 20, feature_channels=2 ** 10),
])
def test_bad_descriptor_raises(device, kwargs):
    d = dict(channel_format=F.FLOAT32, width=4, height=4, feature_channels=3)
    d.update(kwargs)
    with pytest.raises(ValidationError):
        Image(device, ImageDescriptor(**d))


def test_from_numpy_bad_arrays(device):
    with pytest.raises(ValidationError, match="3-D or 4-D"):
        Image.from_numpy(device, np.zeros((2, 2), np.float32))
    with pytest.raises(ValidationError, match="int64"):
        Image.from_numpy(device, np.zeros((2, 2, 2), np.int64))


def test_properties(device):
    image = Image(device, ImageDescriptor(F.FLOAT16, 5, 3, 7, 2))
    assert image.pixel_format == mk.PixelFormat.RGBA16_FLOAT
    assert image.texture_type == mk.TextureType.TYPE_2D_ARRAY
    assert image.precision == 11 and image.pixel_size == 16 * 2
    assert image.resource_size() == 2 * 3 * 5 * 16 * 2
    assert image.set_purgeable_state(mk.PurgeableState.KEEP_CURRENT) == mk.PurgeableState.ALLOCATION_DEFERRED
    one = Image(device, ImageDescriptor(F.FLOAT32, 1, 1, 2))
    assert one.texture_type == mk.TextureType.TYPE_2D and one.pixel_format == mk.PixelFormat.RG32_FLOAT
    assert Image(device, ImageDescriptor(F.BFLOAT16, 1, 1, 4)).pixel_format == mk.PixelFormat.RGBA16_UNORM


@pytest.mark.parametrize("channels, stride", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 16), (16, 16), (17, 32)])
def test_storage_per_pixel(device, channels, stride):
    """Up to 4 channels an image stores what MPS's one texture would (R, RG, RGBA: 1, 2 or 4
    elements a pixel); more channels are padded to a multiple of 16 (one AVX-512 register)."""
    image = Image(device, ImageDescriptor(F.FLOAT32, 5, 3, channels, 2))
    assert image.pixel_size == stride * 4
    assert image.resource_size() == 2 * 3 * 5 * stride * 4
    x = np.arange(2 * 3 * 5 * channels, dtype=np.float32).reshape(2, 3, 5, channels)
    np.testing.assert_array_equal(Image.from_numpy(device, x).to_numpy(), x)

def test_views_share_storage(device):
    x = random((3, 4, 5, 6), np.float32)
    image = Image.from_numpy(device, x)
    batch = image.batch_representation()
    assert len(batch) == 3 and all(b.parent is image for b in batch)
    assert np.array_equal(batch[1].to_numpy()[0], x[1])
    sub = image.sub_image((2, 100))          # length cut to fit
    assert sub.feature_channels == 4 and sub.resource_size() == 0
    assert np.array_equal(sub.to_numpy(), x[..., 2:])
    sub.write_bytes(np.zeros((4, 5, 4), np.float32), HWC, 1)
    assert np.all(image.to_numpy()[1, ..., 2:] == 0) and np.array_equal(image.to_numpy()[1, ..., :2], x[1, ..., :2])
    assert len(image.batch_representation((1, 2))) == 2
    with pytest.raises(ValidationError):
        image.batch_representation((2, 2))
    with pytest.raises(ValidationError):
        image.sub_image((6, 1))


def test_batch_helpers(device):
    cb = device.make_command_queue().make_command_buffer()
    d = ImageDescriptor(F.FLOAT32, 2, 2, 2)
    a, b = mk.TemporaryImage(cb, d), mk.TemporaryImage(cb, d)
    p = Image(device, d)
    assert mk.image_batch_increment_read_count([a, a, b, p], 2) == 3
    assert a.read_count == 3 and b.read_count == 3
    assert mk.image_batch_resource_size([a, a, p]) == 2 * p.resource_size()
    assert mk.image_batch_iterate([a, b, a], lambda im, i: None) == -(2 ** 63)
    assert mk.image_batch_iterate([a, b], lambda im, i: 7 if im is b else None) == 7
    mk.image_batch_increment_read_count([a, b], -3)
    assert a.read_count == 0 and b.read_count == 0
