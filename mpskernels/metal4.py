"""Metal 4 spellings (MTL4CommandQueue, MTL4CommandAllocator, queue.commit([buffers])) over the
one CommandBuffer type: a Metal 4 command buffer here *is* an mpskernels CommandBuffer, so MPS
kernels, compute passes and machine-learning passes all encode into it."""
from mpskernels.command_buffer import CommandBuffer
from mpskernels.errors import ValidationError


class CommandAllocator:
    """MTL4CommandAllocator. Our command buffers own their command lists, so the allocator
    holds no memory; it exists so that Metal 4 code reads the same."""

    def __init__(self, device):
        self.device = device
        self.label = None

    @property
    def allocated_size(self):
        return 0

    def reset(self):
        pass


class CommandQueue:
    """MTL4CommandQueue: make_command_buffer(), then commit([buffers]) in order."""

    def __init__(self, device):
        self.device = device
        self.label = None
        self._queue = device.make_command_queue()

    def make_command_buffer(self, allocator=None):
        if allocator is not None and not isinstance(allocator, CommandAllocator):
            raise TypeError(f"allocator must be a CommandAllocator, got {type(allocator).__name__}")
        return CommandBuffer(self._queue)

    def commit(self, command_buffers):
        """Commit the buffers in list order (each runs after the one before it)."""
        command_buffers = list(command_buffers)
        for cb in command_buffers:
            if not isinstance(cb, CommandBuffer) or cb.command_queue is not self._queue:
                raise ValidationError(f"{cb!r} was not made by this queue's make_command_buffer()")
        for cb in command_buffers:
            cb.commit()


__all__ = ["CommandAllocator", "CommandQueue"]
