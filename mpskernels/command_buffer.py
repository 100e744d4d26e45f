"""CommandBuffer (MTLCommandBuffer): records kernels; commit() plans the arena and hands the
commands to the queue's worker; the kernels run in C with the GIL released."""
import functools
import threading
import warnings
from dataclasses import dataclass

from mpskernels import _native
from mpskernels.enums import CommandBufferError, CommandBufferStatus
from mpskernels.errors import CommandBufferExecutionError, CommandBufferStateError

# Committed buffers not yet finished: the C worker holds raw pointers into their commands,
# so they must stay alive even if the user drops them (fire and forget). Pruned at commit.
_in_flight = set()
_in_flight_lock = threading.Lock()


@dataclass(frozen=True)
class MemoryStats:
    """Arena figures of one command buffer, set at commit."""
    peak_bytes: int          # arena size: the high-water mark of temporary-image memory
    requested_bytes: int     # what the temporaries would need with no aliasing
    lower_bound_bytes: int   # the largest sum of temporaries alive at one time
    allocations: int         # temporaries placed in the arena
    system_allocations: int  # new blocks taken from the system (0 once the device is warm)


_NO_STATS = MemoryStats(0, 0, 0, 0, 0)
_COMMITTED = int(CommandBufferStatus.COMMITTED)


class CommandBuffer:
    # Defaults that most buffers keep, on the class: a buffer is made for every kernel call,
    # and each attribute set costs (most when a large kernel has just evicted the caches).
    label = None
    memory_stats = _NO_STATS
    retained_references = True
    _scheduled_handlers = _completed_handlers = ()   # replaced by lists on the first add
    _leftover = ()
    _encoder = None       # the Metal 4 pass encoder being encoded, if any (ml.py)
    _pass_log = None      # its passes' dispatches, for the hazard check (ml.py)
    _relocations = None   # while a pipeline records: [(set address, address)] (ml.py)

    def __init__(self, queue):
        self.command_queue = queue
        self.device = queue.device
        self._native = _native.Buffer(queue._native)
        self._commands = []        # _native.Command objects, in order
        self._bindings = []        # (command, operand index, root temporary, byte offset)
        self._roots = []           # root temporaries that took storage, in first-use order
        self._temporaries = []     # every temporary made on this buffer (for the leak check)
        self._retained = set()     # persistent images the commands point into (MPS retains them)

    def __repr__(self):
        return f"<CommandBuffer label={self.label!r} status={self.status.name}>"

    # ---- status -------------------------------------------------------------------------

    @property
    def status(self):
        return CommandBufferStatus(self._native.status)

    @property
    def error(self):
        if self._native.status != CommandBufferStatus.ERROR:
            return None
        index = self._native.failed_command
        command = self._commands[index]
        out_of_memory = self._native.failure == 1
        reason = "out of memory" if out_of_memory else "invalid arguments"
        code = CommandBufferError.OUT_OF_MEMORY if out_of_memory else CommandBufferError.INTERNAL
        return CommandBufferExecutionError(
            f"command {index} of {self._name()} ({command.description!s}) failed: {reason}; "
            f"the commands after it did not run", code)

    def _name(self):
        return f"command buffer {self.label!r}" if self.label else "the command buffer"

    def _check_encodable(self):
        if self._native.status >= _COMMITTED:
            raise CommandBufferStateError(
                f"cannot encode onto {self._name()}: it is already committed "
                f"(status {self.status.name}); make a new command buffer")

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

    def _add_recorded(self, commands, images):
        """Record commands made by an earlier encode on these persistent images (kernel.py
        _Encoding._replay): their operands already hold the images' addresses."""
        for image in images:
            self._retained.add(image._root)
        self._commands.extend(commands)

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
        if self._native.status >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(
                f"add_scheduled_handler on {self._name()} after commit: add handlers before commit()")
        self._scheduled_handlers = [*self._scheduled_handlers, handler]

    def add_completed_handler(self, handler):
        if self._native.status >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(
                f"add_completed_handler on {self._name()} after commit: add handlers before commit()")
        self._completed_handlers = [*self._completed_handlers, handler]

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

    # ---- life cycle ------------------------------------------------------------------------

    def enqueue(self):
        if self._native.status >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(f"enqueue on {self._name()} after commit")
        self._native.enqueue()

    def commit(self):
        if self._native.status >= CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(f"{self._name()} is already committed: commit() may be called once")
        if self._encoder is not None:
            raise CommandBufferStateError(f"commit on {self._name()} while {self._encoder._name} is "
                                          f"still encoding: call its end_encoding() first")
        block = self._plan_arena() if self._roots else None
        if self._temporaries:
            self._leftover = tuple(t for t in self._temporaries if t._read_count > 0)
        needs_python = self._scheduled_handlers or self._completed_handlers or self._leftover
        with _in_flight_lock:
            if len(_in_flight) >= 16:   # prune what finished unwaited-for, now and then
                _in_flight.difference_update([cb for cb in _in_flight if cb._native.finished])
            _in_flight.add(self)
        self._native.commit(self._commands, self.device._pool, self.device._blocks, block,
                            self if needs_python else None)

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

    def _check_waitable(self, what):
        if self._native.status < CommandBufferStatus.COMMITTED:
            raise CommandBufferStateError(
                f"{what} on {self._name()}, which was never committed: it would never return; "
                f"call commit() first")
        handler_thread = self.command_queue._handler_thread   # None unless a handler runs
        if (handler_thread is not None and handler_thread == threading.get_ident()
                and not self._native.finished):
            raise CommandBufferStateError(
                f"{what} on {self._name()} from inside a handler of its own queue would deadlock")

    def wait_until_scheduled(self):
        self._check_waitable("wait_until_scheduled")
        self._native.wait_scheduled()

    def wait_until_completed(self):
        self._check_waitable("wait_until_completed")
        self._native.wait_completed()
        with _in_flight_lock:
            _in_flight.discard(self)
