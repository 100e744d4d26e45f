"""ImageDescriptor, Image (MPSImage), TemporaryImage (MPSTemporaryImage) and allocators.

Storage: every image is NHWC with the channel stride padded to 16 elements (the CPU analogue
of MPS's 4-channel texture slices, sized for one AVX-512 register of fp32), 64-byte aligned;
images of 1-4 channels take 1, 2 or 4 elements a pixel (`_channel_stride`). Channels past
`feature_channels` are zero in persistent images; in temporaries they are undefined, so
kernels never read them. Conversion to the user's layout happens only in
read_bytes / write_bytes / from_numpy / to_numpy."""
import abc
from collections import namedtuple

import numpy as np

from mpskernels import _native
from mpskernels.enums import (DataLayout, ImageFeatureChannelFormat, PixelFormat,
                              PurgeableState, StorageMode, TextureType, TextureUsage, CPUCacheMode)
from mpskernels.errors import TemporaryImageError, ValidationError
from mpskernels.geometry import as_region
from mpskernels.texture import Texture, TextureDescriptor

CHANNEL_ALIGNMENT = 16
_MAX_DIM = (1 << 31) - 1
_MAX_BYTES = 1 << 48


def _channel_stride(channels):
    """Elements from one pixel to the next: up to 4 channels what MPS's one texture holds (R,
    RG, RGBA: 1, 2 or 4), so small images (inputs, masks, one-channel results) take no more
    memory than on the GPU; more channels padded to a multiple of 16 (one AVX-512 register)."""
    if channels <= 4:
        return (1, 2, 4, 4)[channels - 1]
    return -(-channels // CHANNEL_ALIGNMENT) * CHANNEL_ALIGNMENT


F = ImageFeatureChannelFormat
# format -> (bytes per element, numpy dtype of read_bytes, numpy dtype of to_numpy, precision bits)
_FORMATS = {
    F.UNORM8: (1, np.uint8, np.uint8, 8),
    F.UNORM16: (2, np.uint16, np.uint16, 16),
    F.FLOAT16: (2, np.float16, np.float16, 11),
    F.FLOAT32: (4, np.float32, np.float32, 24),
    F.BFLOAT16: (2, np.uint16, np.float32, 8),   # to_numpy widens bf16 to float32 exactly
}
_FORMAT_OF_DTYPE = {np.dtype(np.float32): F.FLOAT32, np.dtype(np.float16): F.FLOAT16,
                    np.dtype(np.uint8): F.UNORM8, np.dtype(np.uint16): F.UNORM16}
_PIXEL_FORMATS = {  # (format, 1 | 2 | 4 components) -> Metal pixel format
    (F.UNORM8, 1): PixelFormat.R8_UNORM, (F.UNORM8, 2): PixelFormat.RG8_UNORM,
    (F.UNORM8, 4): PixelFormat.RGBA8_UNORM, (F.UNORM16, 1): PixelFormat.R16_UNORM,
    (F.UNORM16, 2): PixelFormat.RG16_UNORM, (F.UNORM16, 4): PixelFormat.RGBA16_UNORM,
    (F.FLOAT16, 1): PixelFormat.R16_FLOAT, (F.FLOAT16, 2): PixelFormat.RG16_FLOAT,
    (F.FLOAT16, 4): PixelFormat.RGBA16_FLOAT, (F.FLOAT32, 1): PixelFormat.R32_FLOAT,
    (F.FLOAT32, 2): PixelFormat.RG32_FLOAT, (F.FLOAT32, 4): PixelFormat.RGBA32_FLOAT,
    # Apple stores bfloat16 in RGBA16Unorm-style textures and warns the pixel format misleads.
    (F.BFLOAT16, 1): PixelFormat.R16_UNORM, (F.BFLOAT16, 2): PixelFormat.RG16_UNORM,
    (F.BFLOAT16, 4): PixelFormat.RGBA16_UNORM,
}

ImageReadWriteParams = namedtuple("ImageReadWriteParams",
                                  "feature_channel_offset number_of_feature_channels_to_read_write")


def _positive(name, value, limit=_MAX_DIM):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= limit:
        raise ValidationError(f"{name} must be an integer in 1..{limit}, got {value!r}")
    return int(value)


def _channel_format(value):
    try:
        fmt = ImageFeatureChannelFormat(value)
    except ValueError:
        fmt = None
    if fmt not in _FORMATS:
        raise ValidationError(
            f"channel_format must be one of UNORM8, UNORM16, FLOAT16, FLOAT32, BFLOAT16, got {value!r}")
    return fmt


class ImageDescriptor:
    """MPSImageDescriptor: the size and format of an image (checked when an image is made)."""

    def __init__(self, channel_format=ImageFeatureChannelFormat.NONE, width=1, height=1,
                 feature_channels=1, number_of_images=1,
                 usage=TextureUsage.SHADER_READ | TextureUsage.SHADER_WRITE):
        self.channel_format = channel_format
        self.width = width
        self.height = height
        self.feature_channels = feature_channels
        self.number_of_images = number_of_images
        self.usage = usage
        self.storage_mode = StorageMode.SHARED
        self.cpu_cache_mode = CPUCacheMode.DEFAULT_CACHE

    @property
    def pixel_format(self):
        components = 4 if self.feature_channels >= 3 else self.feature_channels
        return _PIXEL_FORMATS.get((self.channel_format, components), PixelFormat.INVALID)

    def copy(self):
        d = ImageDescriptor(self.channel_format, self.width, self.height, self.feature_channels,
                            self.number_of_images, self.usage)
        d.storage_mode, d.cpu_cache_mode = self.storage_mode, self.cpu_cache_mode
        return d

    def _key(self):
        return (self.channel_format, self.width, self.height, self.feature_channels,
                self.number_of_images)

    def __eq__(self, other):
        return isinstance(other, ImageDescriptor) and self._key() == other._key()

    def __repr__(self):
        f = self.channel_format
        return (f"ImageDescriptor({getattr(f, 'name', f)}, width={self.width}, height={self.height}, "
                f"feature_channels={self.feature_channels}, number_of_images={self.number_of_images})")


class _Geometry:
    """What Image and TemporaryImage share: size, format, and where a pixel lives."""

    _is_temporary = False

    def _init_geometry(self, device, descriptor):
        if not isinstance(descriptor, ImageDescriptor):
            raise ValidationError(f"expected an ImageDescriptor, got {type(descriptor).__name__}")
        self.device = device
        self._format = _channel_format(descriptor.channel_format)
        self.width = _positive("width", descriptor.width)
        self.height = _positive("height", descriptor.height)
        self.feature_channels = _positive("feature_channels", descriptor.feature_channels)
        self.number_of_images = _positive("number_of_images", descriptor.number_of_images)
        self.usage = descriptor.usage
        self.label = None
        self.parent = None
        self._root = self
        self._n0 = 0  # first image and first channel of this view inside the root's storage
        self._c0 = 0
        self._texture = None
        self._esize = _FORMATS[self._format][0]
        self._cs = _channel_stride(self.feature_channels)
        self._nbytes = self.number_of_images * self.height * self.width * self._cs * self._esize
        row = self.width * self._cs
        self._strides = (self.height * row, row, self._cs, 1)  # elements: image, row, column, channel
        if self._nbytes > _MAX_BYTES:
            raise ValidationError(f"{self!r} would need {self._nbytes} bytes, more than this library allows")

    def _init_view(self, parent, n0, count, c0, channels):
        root = parent._root
        self.device = parent.device
        self._format, self._esize = parent._format, parent._esize
        self.width, self.height = parent.width, parent.height
        self.feature_channels, self.number_of_images = channels, count
        self.usage = parent.usage
        self.label = None
        self.parent = parent
        self._root = root
        self._n0, self._c0 = parent._n0 + n0, parent._c0 + c0
        self._cs = root._cs
        self._strides = parent._strides   # a texture-wrapped image may regroup its root's pixels
        self._nbytes = 0
        self._texture = None

    # ---- properties of MPSImage ---------------------------------------------------------

    @property
    def feature_channel_format(self):
        return self._format

    @property
    def pixel_format(self):
        components = 4 if self.feature_channels >= 3 else self.feature_channels
        return _PIXEL_FORMATS[(self._format, components)]

    @property
    def precision(self):
        return _FORMATS[self._format][3]

    @property
    def pixel_size(self):
        """Bytes from one pixel to the next in storage, padding included."""
        return self._cs * self._esize

    @property
    def texture_type(self):
        if self.feature_channels <= 4 and self.number_of_images == 1:
            return TextureType.TYPE_2D
        return TextureType.TYPE_2D_ARRAY

    @property
    def storage_mode(self):
        return StorageMode.PRIVATE if self._is_temporary else StorageMode.SHARED

    def resource_size(self):
        """Bytes of backing store (0 for views: sub_image, batch_representation, from_texture)."""
        return self._nbytes

    @property
    def texture(self):
        """The image as a texture (array) of 4-channel slices (1 or 2 channels: R, RG), sharing
        its storage. Reading it allocates a persistent image's storage, as in MPS."""
        if self._texture is None:
            k = 4 if self.feature_channels >= 3 else self.feature_channels
            mode = StorageMode.PRIVATE if self._is_temporary else StorageMode.SHARED
            if not self._is_temporary:
                self._address()
            self._texture = Texture(self, k, -(-self.feature_channels // k), self.texture_type,
                                    self.pixel_format, mode, _FORMATS[self._format][1])
        return self._texture

    def descriptor(self):
        return ImageDescriptor(self._format, self.width, self.height, self.feature_channels,
                               self.number_of_images, self.usage)

    def __repr__(self):
        kind = type(self).__name__
        name = f" {self.label!r}" if self.label else ""
        return (f"<{kind}{name} {self.number_of_images}x{self.height}x{self.width}x"
                f"{self.feature_channels} {self._format.name}>")

    # ---- where pixels live -----------------------------------------------------------------

    def _byte_offset(self, n, y, x, c):
        sn, sy, sx, _ = self._strides
        return ((self._n0 + n) * sn + y * sy + x * sx + self._c0 + c) * self._esize

    def _overlaps(self, other):
        """Whether two views share any storage element (conservatively, when one regroups
        the storage as a texture-wrapped image does)."""
        if self._root is not other._root:
            return False
        if self._strides != other._strides:
            return True
        return (self._n0 < other._n0 + other.number_of_images
                and other._n0 < self._n0 + self.number_of_images
                and self._c0 < other._c0 + other.feature_channels
                and other._c0 < self._c0 + self.feature_channels)

    # ---- views (they share storage) ----------------------------------------------------------

    def batch_representation(self, sub_range=None):
        """One image per batch entry, sharing this image's storage."""
        if sub_range is None:
            sub_range = range(self.number_of_images)
        elif not isinstance(sub_range, range):
            start, length = sub_range
            sub_range = range(start, start + length)
        if sub_range.step != 1 or sub_range.start < 0 or sub_range.stop > self.number_of_images:
            raise ValidationError(f"batch range {sub_range} is outside 0..{self.number_of_images} of {self!r}")
        return [self._view(i, 1, 0, self.feature_channels) for i in sub_range]

    def sub_image(self, feature_channel_range):
        """A view of channels [location, location + length); the length is cut to fit.
        Unlike MPS, any location and length work (no multiple-of-4 rule on the CPU)."""
        if isinstance(feature_channel_range, range):
            location, length = feature_channel_range.start, len(feature_channel_range)
        else:
            location, length = feature_channel_range
        if not 0 <= location < self.feature_channels or length < 1:
            raise ValidationError(
                f"feature channel range ({location}, {length}) is outside {self!r}")
        return self._view(0, self.number_of_images, location,
                          min(length, self.feature_channels - location))


class Image(_Geometry):
    """MPSImage: a persistent image (CPU-visible, allocated at first use)."""

    def __init__(self, device, image_descriptor):
        self._init_geometry(device, image_descriptor)
        self._storage = None
        self._addr = 0

    def _view(self, n0, count, c0, channels):
        view = Image.__new__(Image)
        view._init_view(self, n0, count, c0, channels)
        return view

    @classmethod
    def from_texture(cls, texture, feature_channels):
        """MPSImage(texture:featureChannels:): an image over a texture's storage (no copy).
        Each image takes ceil(feature_channels / components) slices, so the number of images
        is array_length / that; pass 3 for RGB data in an RGBA texture."""
        if not isinstance(texture, Texture):
            raise TypeError(f"from_texture needs a Texture, got {type(texture).__name__}")
        base = texture._image
        if base._is_temporary:
            raise ValidationError(
                f"{texture!r} belongs to {base!r}, whose memory lives in its command buffer's "
                f"arena: only kernels on that command buffer may use it, through the image itself")
        channels = _positive("feature_channels", feature_channels)
        k, group = texture._k, texture._s
        if texture.texture_type == TextureType.TYPE_2D and channels > 4:
            raise ValidationError(f"a TYPE_2D texture holds at most 4 feature channels, got "
                                  f"{channels}; use a TYPE_2D_ARRAY texture")
        slices = -(-channels // k)
        if texture.array_length % slices:
            raise ValidationError(
                f"{channels} feature channels take {slices} slices of {k} per image, which does not "
                f"divide the {texture.array_length} slices of {texture!r}")
        sn, sy, sx, sc = base._strides
        if slices == group:
            strides, n0, c0 = base._strides, base._n0, base._c0
        elif base.number_of_images == 1 and group % slices == 0:
            # one store holds every slice side by side: regroup it into images of `slices`
            strides, n0, c0 = (k * slices, sy, sx, sc), 0, base._c0 + base._n0 * sn
        else:
            raise ValidationError(
                f"the slices of {texture!r} belong to images of {group} slices each; wrap it "
                f"with {k * (group - 1) + 1}..{k * group} feature channels")
        image = Image.__new__(Image)
        image._init_view(base, 0, texture.array_length // slices, 0, channels)
        image._strides, image._n0, image._c0 = strides, n0, c0
        image.parent = None
        image._texture = texture if slices == group and channels == base.feature_channels else None
        return image

    def _address(self):
        """Address of the root storage, allocated (zeroed) on first use."""
        root = self._root
        if root._storage is None:
            raw = np.zeros(root._nbytes + 64, dtype=np.uint8)
            start = (-raw.ctypes.data) % 64
            root._storage = raw[start:start + root._nbytes]
            root._addr = root._storage.ctypes.data
        return root._addr

    def _check_use(self, command_buffer, reading):
        if self.device is not command_buffer.device:
            raise ValidationError(f"{self!r} belongs to another device than the command buffer")

    def set_purgeable_state(self, state):
        if self._root._storage is None:
            return PurgeableState.ALLOCATION_DEFERRED
        return PurgeableState.NON_VOLATILE

    def synchronize(self, command_buffer):
        """Nothing to do: CPU memory is always coherent."""

    @staticmethod
    def default_allocator():
        return _IMAGE_ALLOCATOR

    # ---- CPU access ---------------------------------------------------------------------------

    def _user_layout(self, data_layout, image_index, region, feature_channel_info, write):
        layout = DataLayout(data_layout)
        region = as_region(region) if region is not None else as_region(((0, 0, 0), (self.width, self.height, 1)))
        (x, y, z), (w, h, depth) = region
        first = image_index + z
        if not (0 <= image_index and x + w <= self.width and y + h <= self.height
                and first + depth <= self.number_of_images and w > 0 and h > 0 and depth > 0):
            raise ValidationError(
                f"region {tuple(region.origin)}+{tuple(region.size)} at image_index {image_index} "
                f"is outside {self!r}")
        if feature_channel_info is None:
            c0, count = 0, self.feature_channels
        else:
            c0, count = feature_channel_info
            if count == 0 and c0 == 0:
                count = self.feature_channels
        if not (0 <= c0 and count > 0 and c0 + count <= self.feature_channels):
            raise ValidationError(
                f"feature channels [{c0}, {c0 + count}) are outside the {self.feature_channels} of {self!r}")
        return layout, first, depth, y, x, h, w, c0, count

    def _user_strides(self, layout, h, w, count, bytes_per_column, bytes_per_row, bytes_per_image):
        """Element strides (image, row, column, channel) of a user buffer, defaults tight."""
        e = self._esize
        hwc = layout == DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS
        col = bytes_per_column if bytes_per_column is not None else (count * e if hwc else e)
        row = bytes_per_row if bytes_per_row is not None else w * col
        plane = h * row
        img = bytes_per_image if bytes_per_image is not None else (plane if hwc else count * plane)
        for name, value in (("bytes_per_column", col), ("bytes_per_row", row), ("bytes_per_image", img)):
            if value < 0 or value % e:
                raise ValidationError(f"{name}={value} must be a non-negative multiple of the "
                                      f"element size {e} of {self._format.name}")
        strides = (img // e, row // e, col // e, 1 if hwc else plane // e)
        return strides

    def _copy(self, write, buffer, data_layout, image_index, region, feature_channel_info,
              bytes_per_column, bytes_per_row, bytes_per_image):
        layout, first, depth, y, x, h, w, c0, count = self._user_layout(
            data_layout, image_index, region, feature_channel_info, write)
        strides = self._user_strides(layout, h, w, count, bytes_per_column, bytes_per_row, bytes_per_image)
        shape = (depth, h, w, count) if layout == 0 else (depth, count, h, w)
        dtype = _FORMATS[self._format][1]
        if buffer is None:
            if write:
                raise ValidationError("write_bytes needs a buffer")
            buffer = np.empty(shape, dtype=dtype)
        view = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) \
            else buffer.reshape(-1).view(np.uint8)
        if not write and view.flags.writeable is False:
            raise ValidationError("read_bytes needs a writable buffer")
        last = sum((n - 1) * s for n, s in zip((depth, h, w, count), strides)) * self._esize + self._esize
        if view.nbytes < last:
            raise ValidationError(f"the buffer has {view.nbytes} bytes; {last} are needed for "
                                  f"{depth}x{h}x{w}x{count} {self._format.name} elements with these strides")
        user = (view.ctypes.data, int(self._format)) + strides
        image = (self._address() + self._byte_offset(first, y, x, c0), int(self._format)) + self._strides
        src, dst = (user, image) if write else (image, user)
        command = _native.ElementwiseCommand.copy((depth, h, w, count))
        command.set_operand(0, *src)
        command.set_operand(1, *dst)
        command.description = "write_bytes" if write else "read_bytes"
        command.run(self.device._pool)
        return buffer

    def read_bytes(self, buffer=None, data_layout=DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS,
                   image_index=0, *, region=None, feature_channel_info=None,
                   bytes_per_row=None, bytes_per_image=None):
        """Copy pixels out, in the image's own element type (no conversion). Fills `buffer`
        (any writable buffer) or returns a new NumPy array shaped (depth, h, w, c) or
        (depth, c, h, w). The images read are image_index + region.origin.z onwards."""
        return self._copy(False, buffer, data_layout, image_index, region, feature_channel_info,
                          None, bytes_per_row, bytes_per_image)

    def write_bytes(self, buffer, data_layout=DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS,
                    image_index=0, *, region=None, feature_channel_info=None,
                    bytes_per_column=None, bytes_per_row=None, bytes_per_image=None):
        """Copy pixels in from `buffer`, in the image's own element type (no conversion)."""
        self._copy(True, buffer, data_layout, image_index, region, feature_channel_info,
                   bytes_per_column, bytes_per_row, bytes_per_image)

    @classmethod
    def from_numpy(cls, device, array, data_layout=DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS,
                   channel_format=None):
        """An image from an (H,W,C) or (N,H,W,C) array — (C,H,W) / (N,C,H,W) with
        FEATURE_CHANNELS_X_HEIGHT_X_WIDTH. The format follows the dtype (float32, float16,
        uint8 → UNORM8, uint16 → UNORM16; float64 is stored as FLOAT32) unless channel_format
        says otherwise, in which case values are converted (unorm ⇄ [0, 1] floats)."""
        array = np.asarray(array)
        if array.ndim not in (3, 4):
            raise ValidationError(f"from_numpy needs a 3-D or 4-D array, got shape {array.shape}")
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if array.dtype not in _FORMAT_OF_DTYPE:
            raise ValidationError(f"from_numpy takes float32, float16, float64, uint8 or uint16 "
                                  f"arrays, got {array.dtype}")
        if array.ndim == 3:
            array = array[None]
        layout = DataLayout(data_layout)
        if layout == DataLayout.FEATURE_CHANNELS_X_HEIGHT_X_WIDTH:
            array = array.transpose(0, 2, 3, 1)
        n, h, w, c = array.shape
        fmt = _FORMAT_OF_DTYPE[array.dtype] if channel_format is None else channel_format
        image = cls(device, ImageDescriptor(fmt, w, h, c, n))
        image._convert_from(array)
        return image

    def _convert_from(self, array):
        """Copy an (N,H,W,C) array in, converting from its dtype's format."""
        if any(s % array.itemsize for s in array.strides):
            array = np.ascontiguousarray(array)
        command = _native.ElementwiseCommand.copy(array.shape)
        command.set_operand(0, array.ctypes.data, int(_FORMAT_OF_DTYPE[array.dtype]),
                            *(s // array.itemsize for s in array.strides))
        command.set_operand(1, self._address() + self._byte_offset(0, 0, 0, 0), int(self._format),
                            *self._strides)
        command.keep = array
        command.description = "from_numpy"
        command.run(self.device._pool)

    def to_numpy(self, data_layout=DataLayout.HEIGHT_X_WIDTH_X_FEATURE_CHANNELS):
        """A new (N,H,W,C) array — (N,C,H,W) with FEATURE_CHANNELS_X_HEIGHT_X_WIDTH — in the
        image's element type (BFLOAT16 images come back as float32, exactly)."""
        dtype = _FORMATS[self._format][2]
        out_format = F.FLOAT32 if self._format == F.BFLOAT16 else self._format
        shape = (self.number_of_images, self.height, self.width, self.feature_channels)
        layout = DataLayout(data_layout)
        if layout == DataLayout.FEATURE_CHANNELS_X_HEIGHT_X_WIDTH:
            out = np.empty((shape[0], shape[3], shape[1], shape[2]), dtype=dtype)
            target = out.transpose(0, 2, 3, 1)
        else:
            out = target = np.empty(shape, dtype=dtype)
        command = _native.ElementwiseCommand.copy(shape)
        command.set_operand(0, self._address() + self._byte_offset(0, 0, 0, 0), int(self._format),
                            *self._strides)
        command.set_operand(1, target.ctypes.data, int(out_format),
                            *(s // target.itemsize for s in target.strides))
        command.description = "to_numpy"
        command.run(self.device._pool)
        return out


class TemporaryImage(_Geometry):
    """MPSTemporaryImage: GPU-only (here: kernel-only) memory aliased inside one command buffer.

    read_count starts at 1; every kernel that reads the image takes 1 off; at 0 its memory goes
    back to the command buffer's arena, where a temporary used later may get the same bytes.
    Storage is placed at commit, when every lifetime is known (see ARCHITECTURE.md)."""

    _is_temporary = True

    def __init__(self, command_buffer, image_descriptor):
        command_buffer._check_encodable()
        self._init_geometry(command_buffer.device, image_descriptor)
        self._init_temporary(command_buffer, holder=None)

    def _init_temporary(self, command_buffer, holder):
        self._cb = command_buffer
        self._read_count = 1
        self._holder = holder        # the parent whose read count this view holds
        self._first = None           # index of the first command that touches the storage
        self._last = None            # index of the last one (set when read_count reaches 0)
        self._arena_address = None
        command_buffer._temporaries.append(self)

    @classmethod
    def from_texture_descriptor(cls, command_buffer, texture_descriptor, feature_channels=None):
        """MPSTemporaryImage(commandBuffer:textureDescriptor:[featureChannels:]). Without
        feature_channels, every slice holds one image's channels side by side (one image of
        components x array_length channels); with it, each image takes
        ceil(feature_channels / components) slices."""
        if not isinstance(texture_descriptor, TextureDescriptor):
            raise TypeError(f"expected a TextureDescriptor, got {type(texture_descriptor).__name__}")
        fmt, k, kind, length = texture_descriptor._checked("TemporaryImage.from_texture_descriptor")
        usage = int(texture_descriptor.usage)
        if not usage & (TextureUsage.SHADER_READ | TextureUsage.SHADER_WRITE):
            raise ValidationError("a temporary image's texture usage must include SHADER_READ or SHADER_WRITE")
        if texture_descriptor.storage_mode != StorageMode.PRIVATE:
            raise ValidationError(f"a temporary image's texture must have PRIVATE storage, got "
                                  f"{StorageMode(texture_descriptor.storage_mode).name}")
        if feature_channels is None:
            channels, images = k * length, 1
        else:
            channels = _positive("feature_channels", feature_channels)
            slices = -(-channels // k)
            if length % slices:
                raise ValidationError(f"{channels} feature channels take {slices} slices of {k} per "
                                      f"image, which does not divide array_length {length}")
            images = length // slices
        return cls(command_buffer, ImageDescriptor(fmt, texture_descriptor.width, texture_descriptor.height,
                                                   channels, images, usage))

    @classmethod
    def prefetch_storage(cls, command_buffer, image_descriptor_list):
        """A hint: warm the device's arena cache for temporaries of these sizes."""
        total = 0
        for descriptor in image_descriptor_list:
            probe = _Geometry()
            probe._init_geometry(command_buffer.device, descriptor)
            total += -(-probe._nbytes // 64) * 64
        if total:
            command_buffer.device._blocks.acquire(total).release()

    @staticmethod
    def default_allocator():
        return _TEMPORARY_ALLOCATOR

    def _view(self, n0, count, c0, channels):
        self._check_live("make a view of")
        view = TemporaryImage.__new__(TemporaryImage)
        view._init_view(self, n0, count, c0, channels)
        view._init_temporary(self._cb, holder=self)
        self._read_count += 1          # the view holds one read on its parent
        return view

    @property
    def read_count(self):
        return self._read_count

    @read_count.setter
    def read_count(self, value):
        if self._read_count == 0:
            raise TemporaryImageError(
                f"{self!r}: read_count is already 0 and its memory is released; it cannot be "
                f"changed any more (raise it before the last read instead)")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValidationError(f"read_count must be a non-negative integer, got {value!r}")
        self._read_count = int(value)
        if self._read_count == 0:
            self._released()

    def _decrement(self):
        if self._read_count == 0:   # already released (read_count set to 0): a view's
            return                  # release must not take it below 0
        self._read_count -= 1
        if self._read_count == 0:
            self._released()

    def _released(self):
        if self._holder is not None:
            self._holder._decrement()
        else:
            self._cb._release(self)

    def _check_live(self, action):
        if self._read_count == 0 or self._root._read_count == 0:
            raise TemporaryImageError(
                f"cannot {action} {self!r}: its read_count reached 0, so its memory was returned "
                f"to the arena; raise read_count beforehand if more kernels read it")

    def _check_use(self, command_buffer, reading):
        if self._cb is not command_buffer:
            raise TemporaryImageError(
                f"{self!r} belongs to another command buffer: a temporary image may only be used "
                f"on the command buffer it was made for")
        self._check_live("read" if reading else "write")

    def _touch(self, time):
        if self._first is None:
            self._first = time
            self._cb._take_storage(self)

    def _cpu_access(self, *args, **kwargs):
        raise TemporaryImageError(
            f"{self!r} has private storage: the CPU cannot read or write a temporary image; "
            f"copy it into an Image with a kernel, or use Image for data the CPU needs")

    read_bytes = write_bytes = to_numpy = _cpu_access

    def synchronize(self, command_buffer):
        """Nothing to do for private storage."""


# ---- allocators ----------------------------------------------------------------------------

class ImageAllocator(abc.ABC):
    """MPSImageAllocator: makes the image an image-returning encode writes to."""

    @abc.abstractmethod
    def image(self, command_buffer, image_descriptor, kernel):
        ...

    def image_batch(self, command_buffer, image_descriptor, kernel, count):
        return [self.image(command_buffer, image_descriptor, kernel) for _ in range(count)]


class _ImageAllocator(ImageAllocator):
    def image(self, command_buffer, image_descriptor, kernel):
        return Image(command_buffer.device, image_descriptor)

    def __repr__(self):
        return "Image.default_allocator()"


class _TemporaryImageAllocator(ImageAllocator):
    def image(self, command_buffer, image_descriptor, kernel):
        return TemporaryImage(command_buffer, image_descriptor)

    def __repr__(self):
        return "TemporaryImage.default_allocator()"


_IMAGE_ALLOCATOR = _ImageAllocator()
_TEMPORARY_ALLOCATOR = _TemporaryImageAllocator()


# ---- batch helpers (MPSImageBatch*) ----------------------------------------------------------

def _unique(batch):
    seen, out = set(), []
    for image in batch:
        if id(image) not in seen:
            seen.add(id(image))
            out.append(image)
    return out


def image_batch_increment_read_count(batch, amount):
    """Add `amount` to each unique temporary's read_count (skipping those already at 0);
    returns the number of unique images."""
    unique = _unique(batch)
    for image in unique:
        if image._is_temporary and image.read_count > 0:
            image.read_count = max(image.read_count + amount, 0)
    return len(unique)


def image_batch_synchronize(batch, command_buffer):
    for image in _unique(batch):
        image.synchronize(command_buffer)


def image_batch_resource_size(batch):
    return sum(image.resource_size() for image in _unique(batch))


def image_batch_iterate(batch, fn):
    """Call fn(image, index) on each unique image; a result other than None or -2**63
    (NSIntegerMin) stops the walk and is returned. Returns -2**63 if none stopped it."""
    for index, image in enumerate(_unique(batch)):
        result = fn(image, index)
        if result is not None and result > -(2 ** 63):
            return result
    return -(2 ** 63)


def make_texture(device, descriptor):
    """Device.make_texture: a texture whose slices lie side by side in one image's pixels."""
    if not isinstance(descriptor, TextureDescriptor):
        raise TypeError(f"make_texture needs a TextureDescriptor, got {type(descriptor).__name__}")
    fmt, k, kind, length = descriptor._checked("make_texture")
    store = Image(device, ImageDescriptor(fmt, descriptor.width, descriptor.height, k * length, 1,
                                          descriptor.usage))
    store._address()
    return Texture(store, k, length, kind, PixelFormat(descriptor.pixel_format),
                   StorageMode(descriptor.storage_mode), _FORMATS[fmt][1])
