"""Concurrency: four Python threads encode and commit their own command buffers on one shared
device (one shared queue, or a queue each) with shared kernel objects. Every result must be
right, nothing may deadlock (every join has a timeout), and every completed handler must run
exactly once; every family of the registry (tests/families.py) gives, from four threads at
once, the bits it gives alone. scripts/sanitize.sh tsan runs this file under ThreadSanitizer."""
import threading

import numpy as np
import pytest

import mpskernels as mk
from families import examples as all_examples, run_example

THREADS = 4
TIMEOUT = 120      # seconds for the whole test: far beyond what it needs, short of CI's limit
F32 = mk.ImageFeatureChannelFormat.FLOAT32


def run_threads(target, count=THREADS):
    errors = []

    def guarded(index):
        try:
            target(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((index, exc))

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish in time"
    if errors:
        raise errors[0][1]


class Network:
    """relu -> temporary -> (temporary + source) -> destination, with kernels shared by all."""

    def __init__(self, device):
        self.relu = mk.CNNNeuronReLU(device, a=0.25)
        self.add = mk.CNNAdd(device)
        self.sigmoid = mk.CNNNeuronSigmoid(device)

    def encode(self, cb, source, destination):
        hidden = self.relu.encode(cb, source)            # shared kernel, image-returning encode
        hidden.read_count = 2
        squashed = self.sigmoid.encode(cb, hidden)
        self.add.encode(cb, hidden, squashed, destination)

    @staticmethod
    def reference(x):
        h = np.where(x >= 0, x, np.float32(0.25) * x).astype(np.float64)
        return h + 1 / (1 + np.exp(-h))


@pytest.mark.parametrize("queues", ["shared", "separate"])
@pytest.mark.parametrize("wait_each", [True, False])
def test_threads_share_device_and_kernels(queues, wait_each):
    device = mk.Device(num_threads=2)
    network = Network(device)
    shared = device.make_command_queue()
    finished, lock = [], threading.Lock()
    per_thread = 25

    def on_completed(cb):
        cb.handled = getattr(cb, "handled", 0) + 1

    def work(index):
        rng = np.random.default_rng(index)
        queue = shared if queues == "shared" else device.make_command_queue()
        pending = []
        for i in range(per_thread):
            shape = (1 + i % 2, 9 + index, 20 + i % 5, 3 + 16 * (i % 3))
            x = rng.standard_normal(shape).astype(np.float32)
            source = mk.Image.from_numpy(device, x)
            n, h, w, c = shape
            destination = mk.Image(device, mk.ImageDescriptor(F32, w, h, c, n))
            cb = queue.make_command_buffer()
            cb.add_completed_handler(on_completed)
            network.encode(cb, source, destination)
            cb.commit()
            pending.append((cb, x, destination))
            if wait_each:
                cb.wait_until_completed()
        for cb, x, destination in pending:
            cb.wait_until_completed()
            assert cb.status == mk.CommandBufferStatus.COMPLETED, cb.error
            np.testing.assert_allclose(destination.to_numpy(), Network.reference(x), rtol=1e-5, atol=1e-6)
            assert cb.handled == 1, f"the completed handler ran {cb.handled} times"
        with lock:
            finished.extend(cb for cb, _, _ in pending)

    run_threads(work)
    assert len(finished) == THREADS * per_thread
    assert all(cb.handled == 1 for cb in finished)


def test_commit_order_on_a_shared_queue():
    """Buffers enqueued from several threads run in enqueue order, each exactly once."""
    device = mk.Device(num_threads=2)
    queue = device.make_command_queue()
    order, lock = [], threading.Lock()
    source = mk.Image.from_numpy(device, np.ones((4, 4, 4), np.float32))
    relu = mk.CNNNeuronReLU(device, a=0.0)
    buffers = []

    def work(index):
        for i in range(40):
            with lock:              # enqueue order = the order in `buffers`
                cb = queue.make_command_buffer()
                cb.enqueue()
                buffers.append(cb)
            cb.add_completed_handler(lambda b: order.append(b))
            relu.encode(cb, source, mk.Image(device, source.descriptor()))
            cb.commit()

    run_threads(work)
    buffers[-1].wait_until_completed()
    for cb in buffers:
        cb.wait_until_completed()
    assert order == buffers


def test_thread_count_changes_while_kernels_run():
    """set num_threads on a device while other threads' buffers run on its pool."""
    device = mk.Device(num_threads=2)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 64)).astype(np.float32)
    source = mk.Image.from_numpy(device, x)
    relu = mk.CNNNeuronReLU(device, a=0.0)
    stop = threading.Event()

    def work(index):
        if index == 0:
            n = 0
            while not stop.wait(0.0005):
                device.num_threads = 1 + n % 3
                n += 1
            return
        try:
            queue = device.make_command_queue()
            for _ in range(30):
                destination = mk.Image(device, source.descriptor())
                cb = queue.make_command_buffer()
                relu.encode(cb, source, destination)
                cb.commit()
                cb.wait_until_completed()
                assert np.array_equal(destination.to_numpy(), np.maximum(x, 0))
        finally:
            stop.set()

    run_threads(work, 3)


@pytest.mark.parametrize("drop", ["source", "destination"])
def test_committed_buffer_keeps_its_images_alive(drop):
    """Regression: a committed buffer read and wrote images through raw addresses without
    holding them, so an image the caller dropped before the buffer ran was freed under it
    (use after free; found by test_threads_share_device_and_kernels)."""
    device = mk.Device(num_threads=1)
    queue = device.make_command_queue()
    blocker = queue.make_command_buffer()
    blocker.enqueue()                      # buffers behind it wait until it is committed
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 32)).astype(np.float32)
    images = {"source": mk.Image.from_numpy(device, x)}
    images["destination"] = mk.Image(device, images["source"].descriptor())
    cb = queue.make_command_buffer()
    mk.CNNNeuronReLU(device, a=0.0).encode(cb, images["source"], images["destination"])
    copy = mk.Image(device, images["source"].descriptor())
    mk.CNNNeuronLinear(device, a=1.0, b=0.0).encode(cb, images["destination"], copy)
    cb.commit()
    del images[drop]
    import gc
    gc.collect()
    clobber = [np.full(32 * 32 * 32 + 16, 7.0, np.float32) for _ in range(8)]  # reuse freed memory
    blocker.commit()
    cb.wait_until_completed()
    assert np.array_equal(copy.to_numpy(), np.maximum(x, 0)), "the buffer used a freed image"
    del clobber


def test_every_family_from_four_threads():
    """Every example of the registry from four threads at once on one device, each example's
    kernels (or pipeline state) shared by all: every result bitwise what the example gives
    run alone (results depend on neither thread counts nor timing). Two threads share a
    queue, two make their own."""
    device = mk.Device(num_threads=2)
    shared = device.make_command_queue()
    examples = all_examples()
    kernels = [e.kernels(device) for e in examples]
    alone = [run_example(device, e, k).tobytes() for e, k in zip(examples, kernels)]

    def work(index):
        queue = shared if index % 2 else device.make_command_queue()
        for i in np.random.default_rng(index).permutation(len(examples)):
            got = run_example(device, examples[i], kernels[i], queue)
            assert got.tobytes() == alone[i], f"{examples[i].name}: thread {index} got other bits"

    run_threads(work)
