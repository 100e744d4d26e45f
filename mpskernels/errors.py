"""Exceptions: where MPS asserts (or leaves misuse undefined), mpskernels raises one of these."""


class MPSKernelsError(Exception):
    """Base of every mpskernels exception."""


class ValidationError(MPSKernelsError, ValueError):
    """A bad argument: a shape, a channel count, a format, a region outside an image."""


class TemporaryImageError(MPSKernelsError, RuntimeError):
    """A TemporaryImage rule broken: read_count misuse, CPU access, wrong command buffer."""


class CommandBufferStateError(MPSKernelsError, RuntimeError):
    """An operation not allowed in the command buffer's current status."""


class CommandBufferExecutionError(MPSKernelsError, RuntimeError):
    """A command failed while the buffer ran; `code` is a CommandBufferError."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class TensorCreationError(ValidationError):
    """A tensor could not be made (MTLTensorDomain); `code` is a TensorError."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class HazardError(ValidationError):
    """The pass validation layer: a pass touches memory that an earlier pass writes (or reads,
    for a write) with no barrier or fence ordering the two, so on a device that overlaps
    passes the result would depend on timing."""
