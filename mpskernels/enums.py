"""Apple's enums and option sets, with Apple's numeric values (MPS_REFERENCE.md §11.2)."""
from enum import IntEnum, IntFlag


class CommandBufferStatus(IntEnum):
    NOT_ENQUEUED = 0
    ENQUEUED = 1
    COMMITTED = 2
    SCHEDULED = 3
    COMPLETED = 4
    ERROR = 5


class CommandBufferError(IntEnum):
    NONE = 0
    INTERNAL = 1
    TIMEOUT = 2
    PAGE_FAULT = 3
    BLACKLISTED = 4
    NOT_PERMITTED = 7
    OUT_OF_MEMORY = 8
    INVALID_RESOURCE = 9
    MEMORYLESS = 10
    DEVICE_REMOVED = 11


class StorageMode(IntEnum):
    SHARED = 0
    MANAGED = 1
    PRIVATE = 2
    MEMORYLESS = 3


class CPUCacheMode(IntEnum):
    DEFAULT_CACHE = 0
    WRITE_COMBINED = 1


class TextureUsage(IntFlag):
    UNKNOWN = 0
    SHADER_READ = 1
    SHADER_WRITE = 2
    RENDER_TARGET = 4
    PIXEL_FORMAT_VIEW = 0x10


class TextureType(IntEnum):
    TYPE_2D = 2
    TYPE_2D_ARRAY = 3


class PixelFormat(IntEnum):
    """The Metal pixel formats an image of a given channel format and channel count reports."""
    INVALID = 0
    R8_UNORM = 10
    R16_UNORM = 20
    R16_FLOAT = 25
    RG8_UNORM = 30
    R32_FLOAT = 55
    RG16_UNORM = 60
    RG16_FLOAT = 65
    RGBA8_UNORM = 70
    RG32_FLOAT = 105
    RGBA16_UNORM = 110
    RGBA16_FLOAT = 115
    RGBA32_FLOAT = 125


class KernelOptions(IntFlag):
    NONE = 0
    SKIP_API_VALIDATION = 1 << 0
    ALLOW_REDUCED_PRECISION = 1 << 1
    DISABLE_INTERNAL_TILING = 1 << 2
    INSERT_DEBUG_GROUPS = 1 << 3
    VERBOSE = 1 << 4


class ImageEdgeMode(IntEnum):
    ZERO = 0
    CLAMP = 1
    MIRROR = 2
    MIRROR_WITH_EDGE = 3
    CONSTANT = 4


class ImageFeatureChannelFormat(IntEnum):
    NONE = 0
    UNORM8 = 1
    UNORM16 = 2
    FLOAT16 = 3
    FLOAT32 = 4
    BFLOAT16 = 5  # mpskernels extension (Apple's reserved value); computed in fp32
    COUNT = 6


class DataType(IntEnum):
    INVALID = 0
    FLOAT32 = 0x10000020
    FLOAT16 = 0x10000010
    BFLOAT16 = 0x90000010  # alternate-encoding bit | float | 16 bits
    INT8 = 0x20000008
    INT16 = 0x20000010
    INT32 = 0x20000020
    INT64 = 0x20000040
    UINT8 = 8
    UINT16 = 16
    UINT32 = 32
    UINT64 = 64
    UNORM1 = 0x40000001
    UNORM8 = 0x40000008


class DataLayout(IntEnum):
    HEIGHT_X_WIDTH_X_FEATURE_CHANNELS = 0
    FEATURE_CHANNELS_X_HEIGHT_X_WIDTH = 1


class PurgeableState(IntEnum):
    KEEP_CURRENT = 1
    NON_VOLATILE = 2
    VOLATILE = 3
    EMPTY = 4
    ALLOCATION_DEFERRED = 0


class NNPaddingMethod(IntFlag):
    """Padding policy bits. Several members are 0; test them with the helpers below."""
    ALIGN_CENTERED = 0
    ALIGN_TOP_LEFT = 1
    ALIGN_BOTTOM_RIGHT = 2
    ALIGN_MASK = 3
    ADD_REMAINDER_TO_TOP_LEFT = 0
    ADD_REMAINDER_TO_TOP_RIGHT = 4
    ADD_REMAINDER_TO_BOTTOM_LEFT = 8
    ADD_REMAINDER_TO_BOTTOM_RIGHT = 12
    ADD_REMAINDER_TO_MASK = 12
    SIZE_VALID_ONLY = 0
    SIZE_SAME = 16
    SIZE_FULL = 32
    SIZE_RESERVED = 48
    SIZE_MASK = 0x7F0
    CUSTOM_WHITELIST_FOR_NODE_FUSION = 1 << 13
    CUSTOM = 1 << 14
    EXCLUDE_EDGES = 1 << 15

    @property
    def align(self):
        return int(self) & 3

    @property
    def remainder(self):
        return int(self) & 12

    @property
    def size(self):
        return int(self) & 0x7F0


class CNNNeuronType(IntEnum):
    NONE = 0
    RELU = 1
    LINEAR = 2
    SIGMOID = 3
    HARD_SIGMOID = 4
    TANH = 5
    ABSOLUTE = 6
    SOFT_PLUS = 7
    SOFT_SIGN = 8
    ELU = 9
    PRELU = 10
    RELUN = 11
    POWER = 12
    EXPONENTIAL = 13
    LOGARITHM = 14
    GELU = 15
    COUNT = 16


# ---- Metal 4 tensors, heaps and passes (MPS_REFERENCE.md §9) --------------------------------

class TensorDataType(IntEnum):
    """MTLTensorDataType: the values of the matching MTLDataType."""
    NONE = 0
    FLOAT32 = 3
    FLOAT16 = 16
    BFLOAT16 = 121
    INT8 = 45
    UINT8 = 49
    INT16 = 37
    UINT16 = 41
    INT32 = 29
    UINT32 = 33


class TensorUsage(IntFlag):
    COMPUTE = 1
    RENDER = 2
    MACHINE_LEARNING = 4


class TensorError(IntEnum):
    NONE = 0
    INTERNAL_ERROR = 1
    INVALID_DESCRIPTOR = 2


class HazardTrackingMode(IntEnum):
    DEFAULT = 0
    UNTRACKED = 1
    TRACKED = 2


class HeapType(IntEnum):
    AUTOMATIC = 0
    PLACEMENT = 1
    SPARSE = 2


class Stages(IntFlag):
    """MTLStages: the GPU stages a barrier orders. Our passes run in DISPATCH (compute),
    BLIT and MACHINE_LEARNING."""
    VERTEX = 1 << 0
    FRAGMENT = 1 << 1
    TILE = 1 << 2
    OBJECT = 1 << 3
    MESH = 1 << 4
    RESOURCE_STATE = 1 << 26
    DISPATCH = 1 << 27
    BLIT = 1 << 28
    ACCELERATION_STRUCTURE = 1 << 29
    MACHINE_LEARNING = 1 << 30
    ALL = (1 << 63) - 1   # Int.max


class VisibilityOptions(IntFlag):
    NONE = 0
    DEVICE = 1
    RESOURCE_ALIAS = 2


class BindingAccess(IntEnum):
    """MTLBindingAccess."""
    READ_ONLY = 0
    READ_WRITE = 1
    WRITE_ONLY = 2
