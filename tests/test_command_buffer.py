"""CommandBuffer life cycle, ordering, handlers, errors, threads and the GIL."""
import threading
import time

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import CommandBufferStateError, CommandBufferStatus as S, Image, ImageDescriptor

F32 = mk.ImageFeatureChannelFormat.FLOAT32


@pytest.fixture
def device():
    return mk.Device(num_threads=2)


def images(device, shape=(16, 16, 8)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return x, Image.from_numpy(device, x), Image(device, ImageDescriptor(F32, shape[1], shape[0], shape[2]))


def test_status_life_cycle_and_handlers(device):
    x, src, dst = images(device)
    queue = device.make_command_queue()
    cb = queue.make_command_buffer()
    cb.label = "first"
    assert cb.status == S.NOT_ENQUEUED and cb.error is None
    seen = []
    cb.add_scheduled_handler(lambda b: seen.append(("scheduled", b.status)))
    cb.add_completed_handler(lambda b: seen.append(("completed", b.status)))
    cb.add_completed_handler(lambda b: seen.append(("completed2", b is cb)))
    mk.CNNNeuronReLU(device, a=0.0).encode(cb, src, dst)
    cb.enqueue()
    assert cb.status == S.ENQUEUED
    cb.commit()
    assert cb.status >= S.COMMITTED
    cb.wait_until_scheduled()
    assert cb.status >= S.SCHEDULED
    cb.wait_until_completed()
    assert cb.status == S.COMPLETED
    assert seen == [("scheduled", S.SCHEDULED), ("completed", S.COMPLETED), ("completed2", True)]
    assert np.array_equal(dst.to_numpy()[0], np.maximum(x, 0))


def test_misuse_raises(device):
    x, src, dst = images(device)
    cb = device.make_command_queue().make_command_buffer()
    cb.label = "done"
    relu = mk.CNNNeuronReLU(device, a=0.0)
    with pytest.raises(CommandBufferStateError, match="never committed"):
        cb.wait_until_completed()
    with pytest.raises(CommandBufferStateError, match="never committed"):
        cb.wait_until_scheduled()
    cb.commit()
    with pytest.raises(CommandBufferStateError, match="'done'.*already committed"):
        cb.commit()
    with pytest.raises(CommandBufferStateError, match="already committed"):
        relu.encode(cb, src, dst)
    with pytest.raises(CommandBufferStateError, match="after commit"):
        cb.add_completed_handler(lambda b: None)
    with pytest.raises(CommandBufferStateError, match="after commit"):
        cb.add_scheduled_handler(lambda b: None)
    cb.wait_until_completed()
    cb.wait_until_completed()                # waiting again returns at once


def test_buffers_run_in_enqueue_order(device):
    queue = device.make_command_queue()
    order = []
    first, second = queue.make_command_buffer(), queue.make_command_buffer()
    second.enqueue()
    first.enqueue()
    for name, cb in (("second", second), ("first", first)):
        cb.add_completed_handler(lambda b, name=name: order.append(name))
    first.commit()                          # enqueued after `second`: must wait for it
    time.sleep(0.05)
    assert order == [] and first.status == S.COMMITTED
    second.commit()
    first.wait_until_completed()
    assert order == ["second", "first"]


def test_dropped_enqueued_buffer_does_not_block_the_queue(device):
    queue = device.make_command_queue()
    abandoned = queue.make_command_buffer()
    abandoned.enqueue()
    del abandoned
    import gc
    gc.collect()
    cb = queue.make_command_buffer()
    cb.commit()
    cb.wait_until_completed()
    assert cb.status == S.COMPLETED


def test_commit_is_asynchronous_and_fire_and_forget_is_safe(device):
    """Committed buffers run even if the caller drops them; Python keeps encoding meanwhile."""
    x, src, _ = images(device, (64, 64, 32))
    queue = device.make_command_queue()
    relu = mk.CNNNeuronReLU(device, a=0.0)
    outs = []
    for _ in range(20):
        out = Image(device, ImageDescriptor(F32, 64, 64, 32))
        cb = queue.make_command_buffer()
        relu.encode(cb, src, out)
        cb.commit()                          # no wait, no reference kept
        outs.append(out)
    last = queue.make_command_buffer()
    last.commit()
    last.wait_until_completed()              # in-order queue: everything before is done
    for out in outs:
        assert np.array_equal(out.to_numpy()[0], np.maximum(x, 0))


def test_worker_runs_a_buffer_nobody_waits_for(device):
    """commit() alone is enough: the queue's worker runs the buffer (after its short grace
    period, in which a waiting thread would have run it itself)."""
    x, src, _ = images(device, (8, 8, 4))
    out = Image(device, ImageDescriptor(F32, 8, 8, 4))
    cb = device.make_command_queue().make_command_buffer()
    mk.CNNNeuronReLU(device, a=0.0).encode(cb, src, out)
    ran = threading.Event()
    threads = []
    cb.add_completed_handler(lambda b: (threads.append(threading.get_ident()), ran.set()))
    cb.commit()
    assert ran.wait(timeout=10), "the worker never ran a committed buffer"
    assert len(threads) == 1 and threads[0] != threading.get_ident()   # the worker ran it
    cb.wait_until_completed()
    assert cb.status == S.COMPLETED
    assert np.array_equal(out.to_numpy()[0], np.maximum(x, 0))


def test_wait_inside_own_handler_raises(device):
    queue = device.make_command_queue()
    cb, later = queue.make_command_buffer(), queue.make_command_buffer()
    caught = []

    def handler(buffer):
        try:
            later.wait_until_completed()
        except CommandBufferStateError as exc:
            caught.append(exc)

    cb.add_completed_handler(handler)
    cb.enqueue()
    later.enqueue()
    later.commit()                           # runs after cb: cb's handler would wait forever
    cb.commit()
    later.wait_until_completed()
    assert caught and "deadlock" in str(caught[0])


def test_failing_handler_warns_and_buffer_completes(device):
    cb = device.make_command_queue().make_command_buffer()
    cb.add_completed_handler(lambda b: 1 / 0)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        cb.commit()
        cb.wait_until_completed()
    assert cb.status == S.COMPLETED


def test_gil_is_free_while_a_buffer_runs(device):
    """A Python thread keeps counting while a long buffer runs on the worker."""
    x, src, _ = images(device, (256, 256, 64))
    relu = mk.CNNNeuronTanH(device, a=1.0, b=1.0)
    cb = device.make_command_queue().make_command_buffer()
    outs = [Image(device, ImageDescriptor(F32, 256, 256, 64)) for _ in range(2)]
    for i in range(40):
        relu.encode(cb, src, outs[i % 2])
    count = [0]
    stop = threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=counter)
    thread.start()
    time.sleep(0.01)
    start = count[0]
    t0 = time.perf_counter()
    cb.commit()
    cb.wait_until_completed()
    elapsed = time.perf_counter() - t0
    counted = count[0] - start
    stop.set()
    thread.join()
    assert elapsed > 0.005, "the buffer ran too fast to tell"
    # a thread that had to wait for the GIL would count (almost) nothing meanwhile
    assert counted > 1000 * elapsed, (counted, elapsed)


def test_threads_setting(device, monkeypatch):
    assert mk.Device(num_threads=1).num_threads == 1
    d = mk.Device(num_threads=3)
    d.num_threads = 2
    assert d.num_threads == 2
    with pytest.raises(ValueError):
        mk.Device(num_threads=0)
    monkeypatch.setenv("MPSKERNELS_NUM_THREADS", "3")
    assert mk.Device().num_threads == 3
    monkeypatch.setenv("MPSKERNELS_NUM_THREADS", "lots")
    with pytest.raises(ValueError, match="MPSKERNELS_NUM_THREADS"):
        mk.Device()
    monkeypatch.delenv("MPSKERNELS_NUM_THREADS")
    assert mk.Device().num_threads == mk._native.affinity_cpu_count()
    before = mk.get_num_threads()
    mk.set_num_threads(1)
    try:
        assert mk.create_system_default_device().num_threads == 1
        assert mk.Device().num_threads == 1
    finally:
        mk.set_num_threads(before)


def test_cpu_info():
    info = mk.cpu_info()
    assert info["isa"] in ("generic", "avx2", "avx512")
    assert info["num_threads"] >= 1 and isinstance(info["features"], dict)


def test_max_isa_environment_caps_the_choice(tmp_path):
    import subprocess
    import sys
    # run outside the checkout so the installed package is imported, not the source folder
    for cap in ("generic", "avx2"):
        out = subprocess.run(
            [sys.executable, "-c", "import mpskernels; print(mpskernels.cpu_info()['isa'])"],
            capture_output=True, text=True, env={**__import__("os").environ, "MPSKERNELS_MAX_ISA": cap},
            check=True, cwd=tmp_path)
        isa = out.stdout.strip()
        assert isa == cap or (cap == "avx2" and isa == "generic")
    bad = subprocess.run([sys.executable, "-c", "import mpskernels"], capture_output=True, text=True,
                         env={**__import__("os").environ, "MPSKERNELS_MAX_ISA": "sse9"}, cwd=tmp_path)
    assert bad.returncode != 0 and "MPSKERNELS_MAX_ISA" in bad.stderr


def test_concurrent_encoders_share_a_device(device):
    relu = mk.CNNNeuronReLU(device, a=0.0)
    shared_queue = device.make_command_queue()
    errors = []

    def worker(seed, own_queue):
        try:
            rng = np.random.default_rng(seed)
            queue = device.make_command_queue() if own_queue else shared_queue
            for _ in range(20):
                x = rng.standard_normal((9, 7, 19)).astype(np.float32)
                src = Image.from_numpy(device, x)
                dst = Image(device, ImageDescriptor(F32, 7, 9, 19))
                cb = queue.make_command_buffer()
                done = []
                cb.add_completed_handler(lambda b: done.append(1))
                relu.encode(cb, relu.encode(cb, src), dst)
                cb.commit()
                cb.wait_until_completed()
                assert done == [1]
                assert np.array_equal(dst.to_numpy()[0], np.maximum(x, 0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, i % 2 == 0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
