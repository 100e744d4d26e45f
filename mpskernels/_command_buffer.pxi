# The per-call path of CommandBuffer (mpskernels/command_buffer.py subclasses CommandBufferCore):
# a buffer is made, encoded, committed and waited for at every kernel call, and after a kernel
# that read a few MB each Python-level step cost 3-5 us of cache misses. Here the C buffer, the
# lists the encoders fill and the state checks of make / commit / wait are one C object.
# Everything that is not on that path (handlers, the arena plan, pass encoders) stays in Python.

import threading

from mpskernels.errors import CommandBufferStateError

# Committed buffers not yet finished: the C worker holds raw pointers into their commands, so
# they must stay alive even if the user drops them (fire and forget). Pruned at commit. Only
# touched with the GIL held and without calling Python code in between: no lock needed.
cdef set _in_flight = set()

cdef enum:
    ST_COMMITTED = 2   # CommandBufferStatus.COMMITTED (src/runtime/queue.c)


@cython.no_gc_clear   # __dealloc__ may take the buffer off its queue: the GC must not drop it first
cdef class CommandBufferCore:
    cdef mk_buffer *buffer
    cdef Queue queue     # outlives the buffer
    cdef readonly object command_queue, device
    cdef public list _commands      # Command objects, in order
    cdef public list _bindings      # (command, operand index, root temporary, byte offset)
    cdef public list _roots         # root temporaries that took storage, in first-use order
    cdef public list _temporaries   # every temporary made on this buffer (for the leak check)
    cdef public set _retained       # persistent images the commands point into (MPS retains them)
    cdef public object _encoder     # the Metal 4 pass encoder being encoded, if any (ml.py)
    cdef public tuple _scheduled_handlers, _completed_handlers, _leftover

    def __cinit__(self, command_queue):
        self.command_queue = command_queue
        self.device = command_queue.device
        self.queue = command_queue._native
        self._commands = []
        self._bindings = []
        self._roots = []
        self._temporaries = []
        self._retained = set()
        self._scheduled_handlers = self._completed_handlers = self._leftover = ()
        self.buffer = mk_buffer_create(self.queue.queue)
        if self.buffer == NULL:
            raise MemoryError("cannot create a command buffer")

    def __dealloc__(self):
        # A committed buffer stays alive (in _in_flight) until the C buffer has finished.
        if self.buffer != NULL:
            if mk_buffer_status(self.buffer) == 1:   # enqueued, never committed
                mk_buffer_dequeue(self.buffer)
            mk_buffer_free(self.buffer)

    @property
    def _status_code(self):
        return mk_buffer_status(self.buffer)

    @property
    def _finished(self):
        return bool(mk_buffer_finished(self.buffer))

    @property
    def _failed_command(self):
        return mk_buffer_failed_command(self.buffer)

    @property
    def _out_of_memory(self):
        return mk_buffer_failure(self.buffer) == MK_ENOMEM

    def _check_encodable(self):
        if mk_buffer_status(self.buffer) >= ST_COMMITTED:
            raise CommandBufferStateError(
                f"cannot encode onto {self._name()}: it is already committed "
                f"(status {self.status.name}); make a new command buffer")

    def _replay(self, tuple recorded, tuple images):
        """Record again what a kernel's last encode recorded (kernel.py _Encoding._record),
        if that was on these same persistent images, they belong to this buffer's device and
        the buffer is still encodable; returns whether it did (else the kernel encodes anew,
        checking everything)."""
        if mk_buffer_status(self.buffer) >= ST_COMMITTED:
            return False
        refs, commands = recorded
        if len(refs) != len(images):
            return False
        for i in range(len(images)):
            image = images[i]
            if refs[i]() is not image or image.device is not self.device:
                return False
        self._add_recorded(commands, images)
        return True

    def _add_recorded(self, list commands, images):
        """Record commands made by an earlier encode on these persistent images: their
        operands already hold the images' addresses."""
        for image in images:
            self._retained.add(image._root)
        self._commands.extend(commands)

    def enqueue(self):
        if mk_buffer_status(self.buffer) >= ST_COMMITTED:
            raise CommandBufferStateError(f"enqueue on {self._name()} after commit")
        mk_buffer_enqueue(self.buffer)

    def commit(self):
        if mk_buffer_status(self.buffer) >= ST_COMMITTED:
            raise CommandBufferStateError(
                f"{self._name()} is already committed: commit() may be called once")
        if self._encoder is not None:
            raise CommandBufferStateError(
                f"commit on {self._name()} while {self._encoder._name} is still encoding: "
                f"call its end_encoding() first")
        cdef Block block = self._plan_arena() if self._roots else None
        if self._temporaries:
            self._leftover = tuple([t for t in self._temporaries if t._read_count > 0])
        if len(_in_flight) >= 16:   # prune what finished unwaited-for, now and then
            _in_flight.difference_update(
                [cb for cb in _in_flight if mk_buffer_finished((<CommandBufferCore>cb).buffer)])
        _in_flight.add(self)

        cdef list commands = self._commands
        cdef int32_t n = len(commands)
        cdef mk_command *cmds = <mk_command *>malloc(max(n, 1) * sizeof(mk_command))
        cdef Pool pool = self.device._pool
        cdef BlockCache cache
        cdef mk_status s
        if cmds == NULL:
            _in_flight.discard(self)
            raise MemoryError("cannot record the command list")
        for i in range(n):
            cmds[i] = (<Command>commands[i]).command
        if block is not None:
            cache = self.device._blocks
            mk_buffer_set_arena(self.buffer, cache.cache, block.block)
            block.block = NULL        # the buffer gives it back
        if self._scheduled_handlers or self._completed_handlers or self._leftover:
            # _on_event runs on the executing thread; _in_flight keeps self alive until then
            mk_buffer_set_notify(self.buffer, notify, <void *>self)
        s = mk_buffer_commit(self.buffer, cmds, n, pool.pool)
        free(cmds)
        if s != MK_OK:
            _in_flight.discard(self)
        check(s, "commit")

    cdef int _check_waitable(self, what) except -1:
        if mk_buffer_status(self.buffer) < ST_COMMITTED:
            raise CommandBufferStateError(
                f"{what} on {self._name()}, which was never committed: it would never return; "
                f"call commit() first")
        handler_thread = self.command_queue._handler_thread   # None unless a handler runs
        if (handler_thread is not None and handler_thread == threading.get_ident()
                and not mk_buffer_finished(self.buffer)):
            raise CommandBufferStateError(
                f"{what} on {self._name()} from inside a handler of its own queue would deadlock")
        return 0

    def wait_until_scheduled(self):
        self._check_waitable("wait_until_scheduled")
        with nogil:
            mk_buffer_wait_scheduled(self.buffer)

    def wait_until_completed(self):
        self._check_waitable("wait_until_completed")
        with nogil:
            mk_buffer_wait_completed(self.buffer)
        _in_flight.discard(self)
