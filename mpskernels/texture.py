"""TextureDescriptor and Texture (MTLTextureDescriptor / MTLTexture): MPS's view of an image as
a 2-D texture or texture array whose slices hold up to 4 feature channels each.

A texture here is a window on an image's storage, not a second copy: slice s of a texture
whose image has S slices per image is image s // S, channels [k*(s % S), k*(s % S) + k),
with k the pixel format's components (1, 2 or 4). `device.make_texture` makes a texture over
a one-image store holding every slice's channels side by side, so `Image.from_texture` can
regroup its slices into images of any slice count that divides the array length."""
import numpy as np

from mpskernels.enums import ImageFeatureChannelFormat as F, PixelFormat, StorageMode, TextureType, TextureUsage
from mpskernels.errors import ValidationError
from mpskernels.geometry import as_region

# pixel format -> (channel format, components per slice)
PIXEL_FORMAT_CHANNELS = {
    PixelFormat.R8_UNORM: (F.UNORM8, 1), PixelFormat.RG8_UNORM: (F.UNORM8, 2),
    PixelFormat.RGBA8_UNORM: (F.UNORM8, 4), PixelFormat.R16_UNORM: (F.UNORM16, 1),
    PixelFormat.RG16_UNORM: (F.UNORM16, 2), PixelFormat.RGBA16_UNORM: (F.UNORM16, 4),
    PixelFormat.R16_FLOAT: (F.FLOAT16, 1), PixelFormat.RG16_FLOAT: (F.FLOAT16, 2),
    PixelFormat.RGBA16_FLOAT: (F.FLOAT16, 4), PixelFormat.R32_FLOAT: (F.FLOAT32, 1),
    PixelFormat.RG32_FLOAT: (F.FLOAT32, 2), PixelFormat.RGBA32_FLOAT: (F.FLOAT32, 4),
}


def pixel_format_channels(pixel_format):
    """(channel format, components per slice) of a pixel format an image can use."""
    try:
        return PIXEL_FORMAT_CHANNELS[PixelFormat(pixel_format)]
    except (ValueError, KeyError):
        names = ", ".join(p.name for p in PIXEL_FORMAT_CHANNELS)
        raise ValidationError(f"pixel format {pixel_format!r} cannot back an image; use one of {names}") from None


class TextureDescriptor:
    """MTLTextureDescriptor, for the 2-D textures and texture arrays images use."""

    def __init__(self, pixel_format=PixelFormat.RGBA8_UNORM, width=1, height=1,
                 texture_type=TextureType.TYPE_2D, array_length=1, usage=TextureUsage.SHADER_READ,
                 storage_mode=StorageMode.SHARED):
        self.pixel_format = pixel_format
        self.width, self.height = width, height
        self.texture_type = texture_type
        self.array_length = array_length
        self.usage = usage
        self.storage_mode = storage_mode
        self.depth = 1
        self.mipmap_level_count = 1
        self.sample_count = 1

    @classmethod
    def texture_2d_descriptor(cls, pixel_format, width, height, mipmapped=False):
        if mipmapped:
            raise ValidationError("mipmapped textures are not supported: images have one level")
        return cls(pixel_format, width, height)

    def __repr__(self):
        return (f"TextureDescriptor({getattr(self.pixel_format, 'name', self.pixel_format)}, "
                f"{self.width}x{self.height}, {getattr(self.texture_type, 'name', self.texture_type)}, "
                f"array_length={self.array_length})")

    def _checked(self, what):
        """(channel format, components, texture type, array length), or ValidationError."""
        fmt, k = pixel_format_channels(self.pixel_format)
        try:
            kind = TextureType(self.texture_type)
        except ValueError:
            raise ValidationError(f"{what}: texture_type must be TYPE_2D or TYPE_2D_ARRAY, "
                                  f"got {self.texture_type!r}") from None
        length = self.array_length
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValidationError(f"{what}: array_length must be a positive integer, got {length!r}")
        if kind == TextureType.TYPE_2D and length != 1:
            raise ValidationError(f"{what}: a TYPE_2D texture has array_length 1, got {length}; "
                                  f"use TYPE_2D_ARRAY for more slices")
        if (self.depth, self.mipmap_level_count, self.sample_count) != (1, 1, 1):
            raise ValidationError(f"{what}: depth, mipmap_level_count and sample_count must be 1, got "
                                  f"{self.depth}, {self.mipmap_level_count}, {self.sample_count}")
        return fmt, k, kind, int(length)


class Texture:
    """MTLTexture: slices of an image's storage (see the module docstring)."""

    def __init__(self, image, components, slices_per_image, texture_type, pixel_format,
                 storage_mode, element_type):
        self.device = image.device
        self._image = image                # the storage: an Image (or TemporaryImage)
        self._dtype = element_type         # of get_bytes / replace: read_bytes' element type
        self._k = components
        self._s = slices_per_image
        self.texture_type = texture_type
        self.pixel_format = pixel_format
        self.storage_mode = storage_mode
        self.usage = image.usage
        self.width, self.height = image.width, image.height
        self.array_length = image.number_of_images * slices_per_image
        self.depth = self.mipmap_level_count = self.sample_count = 1
        self.label = None

    def __repr__(self):
        return (f"<Texture {self.pixel_format.name} {self.width}x{self.height} "
                f"{self.texture_type.name} array_length={self.array_length}>")

    def _slice(self, region, slice_index, mipmap_level):
        """(image index, first channel, channels stored, region) of one slice, checked."""
        if self.storage_mode == StorageMode.PRIVATE:
            raise ValidationError(f"{self!r} has private storage: the CPU cannot read or write it")
        if mipmap_level != 0:
            raise ValidationError(f"mipmap_level must be 0 (textures have one level), got {mipmap_level}")
        if not 0 <= slice_index < self.array_length:
            raise ValidationError(f"slice {slice_index} is outside the {self.array_length} slices of {self!r}")
        region = as_region(region if region is not None else ((0, 0, 0), (self.width, self.height, 1)))
        (x, y, z), (w, h, d) = region
        if z != 0 or d != 1 or w < 1 or h < 1 or x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValidationError(f"region {tuple(region.origin)}+{tuple(region.size)} is outside the "
                                  f"{self.width}x{self.height} slices of {self!r} (depth must be 1)")
        n, c0 = divmod(slice_index, self._s)
        c0 *= self._k
        return n, c0, min(self._k, self._image.feature_channels - c0), region

    def get_bytes(self, region=None, slice=0, mipmap_level=0):
        """The slice's pixels in `region` as a new (height, width, components) array of the
        pixel format's element type. Components past the image's channels read as 0."""
        n, c0, count, region = self._slice(region, slice, mipmap_level)
        w, h = region.size.width, region.size.height
        out = np.zeros((h, w, self._k), dtype=self._dtype)
        self._image._copy(False, out, 0, n, ((region.origin.x, region.origin.y, 0), (w, h, 1)),
                          (c0, count), self._k * out.itemsize, None, None)
        return out

    def replace(self, region, data, slice=0, mipmap_level=0):
        """Write (height, width, components) pixels of the pixel format's element type into
        `region` of a slice (components past the image's channels are ignored)."""
        n, c0, count, region = self._slice(region, slice, mipmap_level)
        w, h = region.size.width, region.size.height
        dtype = self._dtype
        data = np.asarray(data)
        if data.dtype != dtype or data.size != h * w * self._k:
            raise ValidationError(f"replace on {self!r} needs {h}x{w}x{self._k} {np.dtype(dtype).name} "
                                  f"values for region {w}x{h}, got {data.shape} {data.dtype}")
        data = np.ascontiguousarray(data).reshape(h, w, self._k)
        self._image._copy(True, data, 0, n, ((region.origin.x, region.origin.y, 0), (w, h, 1)),
                          (c0, count), self._k * data.itemsize, None, None)

