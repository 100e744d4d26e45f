"""mpskernels: Apple's Metal Performance Shaders model on the CPU.

Names follow MPS without the prefix (MPSTemporaryImage → TemporaryImage), methods in
snake_case, enum members in UPPER_SNAKE_CASE with Apple's values. See README.md."""
import os as _os

from mpskernels import _native
from mpskernels.arithmetic import CNNAdd, CNNArithmetic, CNNDivide, CNNMultiply, CNNSubtract
from mpskernels.command_buffer import CommandBuffer, MemoryStats
from mpskernels.convolution import *  # noqa: F401,F403  (the convolution family)
from mpskernels.device import (CommandQueue, Device, create_system_default_device,
                               get_num_threads, set_num_threads)
from mpskernels.enums import *  # noqa: F401,F403  (Apple's enums)
from mpskernels.errors import (CommandBufferExecutionError, CommandBufferStateError,
                               HazardError, MPSKernelsError, TemporaryImageError,
                               TensorCreationError, ValidationError)
from mpskernels.geometry import RECT_NO_CLIP, Offset, Origin, Region, Size
from mpskernels.image import (Image, ImageAllocator, ImageDescriptor, ImageReadWriteParams,
                              TemporaryImage, image_batch_increment_read_count,
                              image_batch_iterate, image_batch_resource_size,
                              image_batch_synchronize)
from mpskernels.texture import Texture, TextureDescriptor
from mpskernels.heap import Buffer, Heap, HeapDescriptor
from mpskernels.tensor import Tensor, TensorDescriptor, TensorExtents
from mpskernels.ml import (ArgumentTable, ArgumentTableDescriptor, Binding, Compiler,
                           ComputeCommandEncoder, Fence, FunctionDescriptor, Library,
                           LibraryFunctionDescriptor, MachineLearningCommandEncoder,
                           MachineLearningPipelineDescriptor, MachineLearningPipelineReflection,
                           MachineLearningPipelineState)
from mpskernels.matrix import (Matrix, MatrixDescriptor, MatrixFullyConnected,
                               MatrixMultiplication, MatrixNeuron, MatrixSum,
                               MatrixVectorMultiplication, Vector, VectorDescriptor)
from mpskernels.kernel import CNNBinaryKernel, CNNKernel, Kernel, NNDefaultPadding, NNPadding
from mpskernels.reduction import *  # noqa: F401,F403  (NNReduce*)
from mpskernels.neuron import (CNNNeuron, CNNNeuronAbsolute, CNNNeuronELU, CNNNeuronExponential,
                               CNNNeuronGeLU, CNNNeuronHardSigmoid, CNNNeuronLinear,
                               CNNNeuronLogarithm, CNNNeuronPower, CNNNeuronPReLU, CNNNeuronReLU,
                               CNNNeuronReLUN, CNNNeuronSigmoid, CNNNeuronSoftPlus,
                               CNNNeuronSoftSign, CNNNeuronTanH, NNNeuronDescriptor)
from mpskernels import ops  # noqa: F401  (one-off calls on NumPy arrays: mk.ops.conv2d, ...)

__version__ = "0.1.0"


def _select_isa_from_environment():
    cap = _os.environ.get("MPSKERNELS_MAX_ISA", "avx512").strip().lower() or "avx512"
    if cap not in _native.ISA_NAMES:
        raise ImportError(f"MPSKERNELS_MAX_ISA must be one of {', '.join(_native.ISA_NAMES)}, "
                          f"got {cap!r}")
    _native.select_isa(cap)


_select_isa_from_environment()


def cpu_info():
    """The CPU features found, the best ISA they allow, the ISA in use, and the thread count."""
    return {"features": _native.cpu_features(), "best_isa": _native.best_isa(),
            "isa": _native.active_isa(), "max_isa": _os.environ.get("MPSKERNELS_MAX_ISA"),
            "affinity_cpus": _native.affinity_cpu_count(), "num_threads": get_num_threads(),
            "name": create_system_default_device().name}


def supports_device(device):
    """MPSSupportsMTLDevice: every mpskernels Device is supported."""
    return isinstance(device, Device)
