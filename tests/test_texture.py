"""Textures (MTLTexture) over image storage: Image.texture, Image.from_texture,
Device.make_texture, TemporaryImage.from_texture_descriptor; the slice rule of MPS_REFERENCE
§3.2: image n, channel c is slice n*S + c//4, component c%4, with S = ceil(channels / 4)."""
import numpy as np
import pytest

import mpskernels as mk
from mpskernels import (Image, ImageDescriptor, PixelFormat as P, StorageMode, TextureDescriptor,
                        TextureType as T, TextureUsage as U, ValidationError)

F32 = mk.ImageFeatureChannelFormat.FLOAT32


def slice_reference(x, s, k):
    """Slice s of the texture of (N, H, W, C) pixels x: (H, W, k), zero past the channels."""
    n, h, w, c = x.shape
    per_image = -(-c // k)
    image, first = divmod(s, per_image)
    out = np.zeros((h, w, k), x.dtype)
    chans = x[image, :, :, first * k:first * k + k]
    out[..., :chans.shape[-1]] = chans
    return out


@pytest.mark.parametrize("n,c", [(1, 1), (1, 2), (1, 3), (1, 4), (2, 4), (1, 6), (3, 17), (2, 40)])
def test_image_texture_slices_follow_the_mps_rule(device, n, c):
    x = np.random.default_rng(c).standard_normal((n, 5, 3, c)).astype(np.float32)
    image = Image.from_numpy(device, x)
    texture = image.texture
    k = 4 if c >= 3 else c
    assert texture.texture_type == (T.TYPE_2D if c <= 4 and n == 1 else T.TYPE_2D_ARRAY)
    assert texture.pixel_format == image.pixel_format
    assert texture.array_length == n * -(-c // k)
    assert (texture.width, texture.height) == (3, 5)
    assert texture is image.texture
    for s in range(texture.array_length):
        assert np.array_equal(texture.get_bytes(slice=s), slice_reference(x, s, k))
    # a region of one slice
    got = texture.get_bytes(region=((1, 2, 0), (2, 3, 1)), slice=texture.array_length - 1)
    assert np.array_equal(got, slice_reference(x, texture.array_length - 1, k)[2:5, 1:3])


def test_texture_replace_writes_the_image(device):
    image = Image(device, ImageDescriptor(mk.ImageFeatureChannelFormat.UNORM8, 4, 2, 6, 2))
    texture = image.texture                       # 2 slices per image, RGBA8
    values = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    texture.replace(None, values, slice=3)        # image 1, channels 4..5 (6, 7 are padding)
    got = image.to_numpy()
    assert np.array_equal(got[1, :, :, 4:6], values[..., :2])
    assert not got[0].any() and not got[1, :, :, :4].any()
    assert np.array_equal(texture.get_bytes(slice=3)[..., :2], values[..., :2])
    assert not texture.get_bytes(slice=3)[..., 2:].any()   # past the channels: 0


def test_from_texture_shares_storage_both_ways(device):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 6)).astype(np.float32)
    image = Image.from_numpy(device, x)
    wrapped = Image.from_texture(image.texture, 6)
    assert np.array_equal(wrapped.to_numpy(), x)
    assert wrapped.resource_size() == 0 and wrapped.parent is None
    wrapped.write_bytes(np.ones((1, 3, 4, 6), np.float32), image_index=1)
    assert np.array_equal(image.to_numpy()[1], np.ones((3, 4, 6)))
    rgb = Image.from_texture(Image.from_numpy(device, x[:1, ..., :3]).texture, 3)
    assert np.array_equal(rgb.to_numpy(), x[:1, ..., :3])


def test_made_texture_regroups_into_images_of_any_slice_count(device):
    descriptor = TextureDescriptor(P.RGBA32_FLOAT, 4, 3, T.TYPE_2D_ARRAY, array_length=4)
    texture = device.make_texture(descriptor)
    assert (texture.array_length, texture.texture_type, texture.storage_mode) == (4, T.TYPE_2D_ARRAY, StorageMode.SHARED)
    slices = np.random.default_rng(2).standard_normal((4, 3, 4, 4)).astype(np.float32)
    for s in range(4):
        texture.replace(((0, 0, 0), (4, 3, 1)), slices[s], slice=s)
    for channels, images in ((4, 4), (8, 2), (7, 2), (16, 1), (13, 1)):
        image = Image.from_texture(texture, channels)
        assert (image.number_of_images, image.feature_channels) == (images, channels)
        per = 16 // images
        expected = slices.transpose(1, 2, 0, 3).reshape(3, 4, 16)
        expected = np.stack([expected[..., i * per:i * per + channels] for i in range(images)])
        assert np.array_equal(image.to_numpy(), expected)


def test_kernels_write_through_a_wrapped_texture(device):
    texture = device.make_texture(TextureDescriptor(P.RGBA16_FLOAT, 5, 2, T.TYPE_2D_ARRAY, array_length=2))
    x = np.random.default_rng(3).standard_normal((1, 2, 5, 8)).astype(np.float16)
    source = Image.from_numpy(device, x)
    destination = Image.from_texture(texture, 8)
    cb = device.make_command_queue().make_command_buffer()
    mk.CNNNeuronAbsolute(device).encode(cb, source, destination)
    cb.commit()
    cb.wait_until_completed()
    assert np.array_equal(texture.get_bytes(slice=1), np.abs(x[0, ..., 4:8]))
    # two images over one texture with different slice groupings may alias: refused
    other = Image.from_texture(texture, 4)
    with pytest.raises(ValidationError, match="shares storage"):
        mk.CNNNeuronAbsolute(device).encode(device.make_command_queue().make_command_buffer(),
                                            other, destination)


def test_temporary_image_from_texture_descriptor(device):
    cb = device.make_command_queue().make_command_buffer()
    descriptor = TextureDescriptor(P.RGBA16_FLOAT, 6, 5, T.TYPE_2D_ARRAY, array_length=6,
                                   usage=U.SHADER_READ | U.SHADER_WRITE,
                                   storage_mode=StorageMode.PRIVATE)
    t = mk.TemporaryImage.from_texture_descriptor(cb, descriptor)
    assert (t.number_of_images, t.feature_channels, t.width, t.height) == (1, 24, 6, 5)
    assert t.feature_channel_format == mk.ImageFeatureChannelFormat.FLOAT16
    t2 = mk.TemporaryImage.from_texture_descriptor(cb, descriptor, feature_channels=7)
    assert (t2.number_of_images, t2.feature_channels) == (3, 7)
    assert t2.texture.storage_mode == StorageMode.PRIVATE
    with pytest.raises(ValidationError, match="private"):
        t2.texture.get_bytes()
    with pytest.raises(ValidationError, match="arena"):
        Image.from_texture(t2.texture, 7)
    with pytest.raises(ValidationError, match="does not divide"):
        mk.TemporaryImage.from_texture_descriptor(cb, descriptor, feature_channels=13)
    descriptor.storage_mode = StorageMode.SHARED
    with pytest.raises(ValidationError, match="PRIVATE"):
        mk.TemporaryImage.from_texture_descriptor(cb, descriptor)
    descriptor.storage_mode, descriptor.usage = StorageMode.PRIVATE, U.RENDER_TARGET
    with pytest.raises(ValidationError, match="SHADER_READ"):
        mk.TemporaryImage.from_texture_descriptor(cb, descriptor)
    for t in (t, t2):
        t.read_count = 0


def test_texture_misuse_raises(device):
    texture = device.make_texture(TextureDescriptor(P.RGBA8_UNORM, 4, 4, T.TYPE_2D_ARRAY, array_length=6))
    assert Image.from_texture(texture, 9).number_of_images == 2   # 3 slices per image
    with pytest.raises(ValidationError, match="does not divide"):
        Image.from_texture(texture, 20)                        # 5 slices do not divide 6
    two_d = device.make_texture(TextureDescriptor(P.RGBA8_UNORM, 4, 4))
    with pytest.raises(ValidationError, match="at most 4"):
        Image.from_texture(two_d, 5)
    grouped = Image(device, ImageDescriptor(F32, 2, 2, 8, 3)).texture    # 3 images of 2 slices
    with pytest.raises(ValidationError, match="images of 2 slices"):
        Image.from_texture(grouped, 4)
    with pytest.raises(TypeError):
        Image.from_texture(np.zeros((2, 2, 4)), 4)
    with pytest.raises(ValidationError, match="slice 6"):
        texture.get_bytes(slice=6)
    with pytest.raises(ValidationError, match="outside"):
        texture.get_bytes(region=((2, 0, 0), (3, 1, 1)))
    with pytest.raises(ValidationError, match="uint8"):
        texture.replace(None, np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValidationError, match="array_length 1"):
        device.make_texture(TextureDescriptor(P.RGBA8_UNORM, 4, 4, T.TYPE_2D, array_length=2))
    with pytest.raises(ValidationError, match="cannot back an image"):
        device.make_texture(TextureDescriptor(12345, 4, 4))
    with pytest.raises(ValidationError, match="mipmapped"):
        TextureDescriptor.texture_2d_descriptor(P.R8_UNORM, 4, 4, mipmapped=True)
