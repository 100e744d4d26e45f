"""CommandBuffer (MTLCommandBuffer): records kernels; commit() plans the arena and hands the
commands to the queue's worker; the kernels run in C with the GIL released. The per-call path
(the recorded lists, commit, wait, the state checks) is CommandBufferCore in
mpskernels/_command_buffer.pxi; the rest is here."""
import functools
import threading
import warnings
from dataclasses import dataclass

from mpskernels import _native
from mpskernels.enums import CommandBufferError, CommandBufferStatus
from mpskernels.errors import CommandBufferExecutionError, CommandBufferStateError


@dataclass(frozen=True)
class MemoryStats:
    """Arena figures of one command buffer, set at commit."""
    peak_bytes: int          # arena size: the high-water mark of temporary-image memory
    requested_bytes: int     # what the temporaries would need with no aliasing
    lower_bound_bytes: int   # the largest sum of temporaries alive at one time
    allocations: int         # temporaries placed in the arena
    system_allocations: int  # new blocks taken from the system (0 once the device is warm)


_NO_STATS = MemoryStats(0, 0, 0, 0, 0)


class CommandBuffer(_native.CommandBufferCore):
    """MTLCommandBuffer, made by CommandQueue.make_command_buffer()."""

    # Defaults that most buffers keep, on the class: a buffer is made for every kernel call,
    # and each attribute set costs (most when a large kernel has just evicted the caches).
    label = None
    memory_stats = _NO_STATS
    retained_references = True
    _pass_log = None      # the pass encoder's dispatches, for the hazard check (ml.py)
    _relocations = None   # while a pipeline records: [(set address, address)] (ml.py)

    def __repr__(self):
        return f"<CommandBuffer label={self.label!r} status={self.status.name}>"

    # ---- status -------------------------------------------------------------------------

    @property
    def status(self):
        return CommandBufferStatus(self._status_code)

    @property
    def error(self):
        if self._status_code != CommandBufferStatus.ERROR:
            return None
        index = self._failed_command
        command = self._commands[index]
        out_of_memory = self._out_of_memory
        reason = "out of memory" if out_of_memory else "invalid arguments"
        code = CommandBufferError.OUT_OF_MEMORY if out_of_memory else CommandBufferError.INTERNAL
        return CommandBufferExecutionError(
            f"command {index} of {self._name()} ({command.description!s}) failed: {reason}; "
            f"the commands after it did not run", code)

    def _name(self):
        return f"command buffer {self.label!r}" if self.label else "the command buffer"

    # ---- recording (called by kernels) ------------------------------------------------------

    def _add(self, command, operands, description):
        """Record `command`; operands are (image, byte offset, strides) in operand order;
        description (a kernel, or a string) names it if it fails."""
        time = len(self._commands)
        for k, (image, byte_offset, (sn, sy, sx, sc)) in enumerate(operands):
            root = image._root
            if root._is_temporary:
                root._touch(time)
                self._bindings.append((command, k, root, byte_offset))
                address = 0
            else:
                address = root._address() + byte_offset
                self._retained.add(root)   # C holds the raw address: keep the storage alive
                if self._relocations is not None:
                    self._relocations.append((functools.partial(command.bind, k), address))
            command.set_operand(k, address, image._format, sn, sy, sx, sc)
        command.description = description
        self._commands.append(command)

    def _take_storage(self, root):
        self._roots.append(root)

    def _release(self, root):
        """A root temporary's read_count reached 0: its bytes are free after the last command
        recorded so far. With poisoning on, a NaN fill marks them so a stale read shows."""
        if root._first is None:   # never used: it never took storage
            return
        if self.device.poison_temporaries:
            fill = _native.ElementwiseCommand.fill(
                (root.number_of_images, root.height, root.width, root._cs), float("nan"))
            self._add(fill, [(root, 0, root._strides)], f"poison of released {root!r}")
        root._last = len(self._commands) - 1

    # ---- Metal 4 passes (mpskernels/ml.py) ---------------------------------------------------

    def make_compute_command_encoder(self):
        """A compute pass whose tensor operations run our kernels on tensors."""
        from mpskernels.ml import ComputeCommandEncoder
        return ComputeCommandEncoder(self)

    def make_machine_learning_command_encoder(self):
        """A machine-learning pass: runs a MachineLearningPipelineState's network."""
        from mpskernels.ml import MachineLearningCommandEncoder
        return MachineLearningCommandEncoder(self)

    # ---- handlers -------------------------------------------------------------------------

    def add_scheduled_handler(self, handler):
        if self._status_code >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(
                f"add_scheduled_handler on {self._name()} after commit: add handlers before commit()")
        self._scheduled_handlers = (*self._scheduled_handlers, handler)

    def add_completed_handler(self, handler):
        if self._status_code >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(
                f"add_completed_handler on {self._name()} after commit: add handlers before commit()")
        self._completed_handlers = (*self._completed_handlers, handler)

    def _on_event(self, event):
        """On the executing thread, with the GIL: 0 = scheduled, 1 = completed."""
        queue = self.command_queue
        previous = queue._handler_thread
        queue._handler_thread = threading.get_ident()
        try:
            if event == 0:
                handlers = self._scheduled_handlers
            else:
                for image in self._leftover:
                    if image._read_count > 0:
                        warnings.warn(
                            f"{image!r} still had read_count {image._read_count} when {self._name()} "
                            f"completed: set read_count to the number of kernels that read it, or "
                            f"to 0 when done, so its memory returns promptly", ResourceWarning)
                handlers = self._completed_handlers
            for handler in handlers:
                try:
                    handler(self)
                except Exception as exc:  # a user's handler must not kill the worker
                    warnings.warn(f"{'scheduled' if event == 0 else 'completed'} handler "
                                  f"{handler!r} raised {exc!r}", RuntimeWarning)
        finally:
            queue._handler_thread = previous

    # ---- life cycle (enqueue, commit and the waits: CommandBufferCore) ------------------------

    def _plan_arena(self):
        roots = self._roots
        end = len(self._commands) - 1
        sizes = [r._nbytes for r in roots]
        firsts = [r._first for r in roots]
        lasts = [end if r._last is None else r._last for r in roots]
        offsets, stats = _native.plan_arena(sizes, firsts, lasts)
        block = self.device._blocks.acquire(stats["peak_bytes"])
        base = block.address
        for root, offset in zip(roots, offsets):
            root._arena_address = base + int(offset)
        for command, k, root, byte_offset in self._bindings:
            command.bind(k, root._arena_address + byte_offset)
        self.memory_stats = MemoryStats(allocations=len(roots), system_allocations=int(block.fresh),
                                        **stats)
        return block
