"""Device (MTLDevice), CommandQueue (MTLCommandQueue) and the process-wide thread settings."""
import os
import threading

from mpskernels import _native
from mpskernels.command_buffer import CommandBuffer
from mpskernels.enums import StorageMode
from mpskernels.errors import ValidationError
from mpskernels.heap import Buffer, Heap, aligned_bytes
from mpskernels.image import make_texture
from mpskernels.tensor import Tensor

_lock = threading.Lock()
_default_num_threads = None   # set by set_num_threads()
_system_default = None


def _env_num_threads():
    value = os.environ.get("MPSKERNELS_NUM_THREADS")
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"MPSKERNELS_NUM_THREADS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"MPSKERNELS_NUM_THREADS must be a positive integer, got {value!r}")
    return n


def default_num_threads():
    """set_num_threads() if called, else MPSKERNELS_NUM_THREADS, else the CPUs this process may use."""
    return _default_num_threads or _env_num_threads() or _native.affinity_cpu_count()


def _check_threads(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be a positive integer, got {n!r}")
    return n


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "CPU"


class Device:
    """The CPU as a Metal device: owns the thread pool and the cache of arena blocks.

    num_threads: threads a kernel may use (default: default_num_threads()).
    poison_temporaries: fill a temporary image's memory with NaN the moment its read_count
    reaches 0, so a kernel that reads it afterwards shows the bug (default: the
    MPSKERNELS_POISON environment variable).
    validate_passes: the pass validation layer (Metal 4 encoders): a pass that touches memory
    an earlier pass writes, with no barrier or fence between them, raises HazardError
    (default on; MPSKERNELS_VALIDATE_PASSES=0 turns it off)."""

    def __init__(self, num_threads=None, poison_temporaries=None, validate_passes=None):
        n = default_num_threads() if num_threads is None else _check_threads(num_threads)
        self._pool = _native.Pool(n)
        self._blocks = _native.BlockCache()
        if poison_temporaries is None:
            poison_temporaries = os.environ.get("MPSKERNELS_POISON", "") not in ("", "0")
        self.poison_temporaries = bool(poison_temporaries)
        if validate_passes is None:
            validate_passes = os.environ.get("MPSKERNELS_VALIDATE_PASSES", "1") != "0"
        self.validate_passes = bool(validate_passes)
        self.name = _cpu_name()

    def __repr__(self):
        return f"<Device {self.name!r} threads={self.num_threads}>"

    @property
    def num_threads(self):
        return self._pool.num_threads

    @num_threads.setter
    def num_threads(self, n):
        self._pool.num_threads = _check_threads(n)

    def make_command_queue(self):
        return CommandQueue(self)

    def make_texture(self, descriptor):
        """A texture (MTLTexture) of a TextureDescriptor's 2-D size, format and slices."""
        return make_texture(self, descriptor)

    def make_buffer(self, length, options=StorageMode.SHARED):
        """A zeroed buffer (MTLBuffer) of `length` bytes; options: its StorageMode."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValidationError(f"make_buffer: length must be a positive integer, got {length!r}")
        return Buffer(self, aligned_bytes(length), options)

    def make_heap(self, descriptor):
        """A heap (MTLHeap) of descriptor.size bytes to place buffers and tensors in."""
        return Heap(self, descriptor)

    def make_tensor(self, descriptor):
        """A zeroed tensor (MTLTensor) with its own memory; raises TensorCreationError."""
        return Tensor._on_device(self, descriptor)

    def make_argument_table(self, descriptor):
        from mpskernels.ml import ArgumentTable
        return ArgumentTable(self, descriptor)

    def make_fence(self):
        from mpskernels.ml import Fence
        return Fence(self)

    def make_library(self, path):
        """A Library (mpskernels.ml) from a .mpkg package, or an .onnx model (needs onnx)."""
        from mpskernels.ml import Library
        from mpskernels.ml_package import load_networks
        return Library(self, load_networks(path))

    def make_compiler(self):
        from mpskernels.ml import Compiler
        return Compiler(self)

    @property
    def arena_cache_bytes(self):
        """Bytes of arena blocks held by this device, in use or idle."""
        return self._blocks.total_bytes

    def trim(self):
        """Give idle arena blocks back to the system; returns the bytes freed."""
        return self._blocks.trim()

    def supports_family(self, family):  # every feature is emulated
        return True


def create_system_default_device():
    """The process-wide default device (created on first call)."""
    global _system_default
    with _lock:
        if _system_default is None:
            _system_default = Device()
        return _system_default


def set_num_threads(n):
    """Set the thread count of the default device and of devices created later without one."""
    global _default_num_threads
    _default_num_threads = _check_threads(n)
    if _system_default is not None:
        _system_default.num_threads = n


def get_num_threads():
    return (_system_default.num_threads if _system_default is not None
            else default_num_threads())


class CommandQueue:
    """Makes command buffers; runs them in enqueue order on its own worker thread."""

    def __init__(self, device):
        self.device = device
        self.label = None
        self._native = _native.Queue()
        self._handler_thread = None  # thread running this queue's handlers, if any

    def __repr__(self):
        return f"<CommandQueue label={self.label!r}>"

    def make_command_buffer(self):
        return CommandBuffer(self)
