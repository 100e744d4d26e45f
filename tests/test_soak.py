"""Soak: thousands of command buffers running a small network of temporaries and persistent
images. Resident memory must stay flat after warm-up (growth under 1%), results right
throughout, and device.trim() must give the arena's cache back.

CI runs 1,500 buffers; the full 10,000 on demand: pytest -m slow tests/test_soak.py
(or MPSKERNELS_SOAK_BUFFERS=n). The registry soak runs every family's examples
(tests/families.py) round after round on one device: 40 rounds in CI, 300 on demand."""
import ctypes
import gc
import os

import numpy as np
import pytest

import mpskernels as mk
from families import examples as all_examples, run_example

F32 = mk.ImageFeatureChannelFormat.FLOAT32
SHAPE = (1, 48, 48, 40)            # 48*48*48 channel slots * 4 B = 442 KB per temporary


def rss_bytes():
    gc.collect()      # buffers and their temporaries form cycles: count only live memory
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(buffers, report=None):
    device = mk.Device(num_threads=2)
    queue = device.make_command_queue()
    rng = np.random.default_rng(7)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    bias = rng.standard_normal((1, 1, 1, SHAPE[3])).astype(np.float32)
    source, vector = mk.Image.from_numpy(device, x), mk.Image.from_numpy(device, bias)
    n, h, w, c = SHAPE
    output = mk.Image(device, mk.ImageDescriptor(F32, w, h, c, n))
    relu, sigmoid = mk.CNNNeuronReLU(device, a=0.1), mk.CNNNeuronSigmoid(device)
    add, multiply = mk.CNNAdd(device), mk.CNNMultiply(device)
    add.secondary_stride_in_pixels_x = add.secondary_stride_in_pixels_y = 0   # + per-channel bias
    h1 = np.where(x >= 0, x, np.float32(0.1) * x).astype(np.float64) + bias
    expected = h1 * (1 / (1 + np.exp(-h1)))

    def one_buffer():
        cb = queue.make_command_buffer()
        a = relu.encode(cb, source)                   # temporaries, aliased in the arena
        b = add.encode(cb, a, vector)
        b.read_count = 2
        s = sigmoid.encode(cb, b)
        multiply.encode(cb, b, s, output)
        cb.commit()
        return cb

    warm_up = max(buffers // 5, 50)       # the interpreter's allocator settles by then
    rss, trace = [], []
    for i in range(buffers):
        cb = one_buffer()
        if i % 8 == 7 or i == buffers - 1:            # keep a few in flight between waits
            cb.wait_until_completed()
            assert cb.status == mk.CommandBufferStatus.COMPLETED, cb.error
        if i == warm_up or i == buffers - 1:
            np.testing.assert_allclose(output.to_numpy(), expected, rtol=2e-6, atol=1e-6)
            rss.append(rss_bytes())
        if i % 1000 == 0:
            trace.append(rss_bytes())
    cache = device.arena_cache_bytes
    before_trim = rss_bytes()
    freed = device.trim()
    after_trim = rss_bytes()
    figures = {"buffers": buffers, "rss_after_warm_up": rss[0], "rss_at_end": rss[1],
               "growth": (rss[1] - rss[0]) / rss[0], "arena_cache": cache, "trimmed": freed,
               "rss_drop_on_trim": before_trim - after_trim,
               "arena_after_trim": device.arena_cache_bytes, "rss_every_1000": trace}
    if report:
        report(figures)
    return figures


# Under a sanitizer (scripts/sanitize.sh) freed memory sits in a quarantine: the resident set
# says nothing there, so only correctness and the cache's own accounting are checked.
MEASURE_RSS = not os.environ.get("MPSKERNELS_SANITIZER")


def check(figures):
    assert figures["arena_cache"] > 0 and figures["trimmed"] == figures["arena_cache"], figures
    assert figures["arena_after_trim"] == 0, figures
    if MEASURE_RSS:
        assert figures["growth"] < 0.01, figures
        # large blocks are mapped directly, so freeing them shows in the resident set
        assert figures["rss_drop_on_trim"] >= figures["trimmed"] // 2, figures


def test_soak_short():
    check(soak(int(os.environ.get("MPSKERNELS_SOAK_BUFFERS", 1500))))


@pytest.mark.slow
def test_soak_full(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("10,000 buffers: run with -m slow")
    check(soak(10_000, report=lambda f: print("\nsoak:", f)))


def test_trim_gives_memory_back_after_large_frees():
    """Regression: after the process had freed a large malloc block, glibc raised its mmap
    threshold, arena blocks came from its heap, and trim() freed them into that heap without
    the resident set going down. Arena blocks of 64 KiB and more are now mapped directly."""
    big = np.ones(8 << 20, np.float32)          # 32 MiB: glibc's threshold grows to its maximum
    del big
    device = mk.Device(num_threads=1)
    queue = device.make_command_queue()
    source = mk.Image.from_numpy(device, np.ones((64, 64, 64), np.float32))
    relu = mk.CNNNeuronReLU(device, a=0.0)
    buffers = []
    for _ in range(4):
        cb = queue.make_command_buffer()
        relu.encode(cb, relu.encode(cb, source), mk.Image(device, source.descriptor()))
        cb.commit()
        buffers.append(cb)
    for cb in buffers:
        cb.wait_until_completed()
    before = rss_bytes()
    freed = device.trim()
    assert freed >= 64 * 64 * 64 * 4 and device.arena_cache_bytes == 0
    if MEASURE_RSS:
        assert before - rss_bytes() >= freed // 2


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def heap_in_use():
    """Bytes malloc has handed out and not had back (glibc's mallinfo2: every arena, mapped
    chunks included): our C's and NumPy's allocations, without the allocator's free lists.
    0 under ASan, whose allocator replaces glibc's."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def trimmed_rss_bytes():
    """The resident set once malloc has given its free pages back (malloc_trim): glibc keeps
    freed blocks of the heap until the top of the heap is free, so a plain reading swings by
    tens of MB between rounds (with the bytes in use constant)."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return rss_bytes()


def soak_registry(rounds, check_rss=False, report=None):
    """Every example of every family once per round (one command buffer each, kernels
    shared), on one device and queue. Each result must keep the bits of round 1; after
    warm-up (a quarter of the rounds) the heap in use must stay flat (growth under 1%), and
    with check_rss the resident set too."""
    device = mk.Device(num_threads=2)
    queue = device.make_command_queue()
    examples = all_examples()
    kernels = [e.kernels(device) for e in examples]
    first = [run_example(device, e, k, queue).tobytes() for e, k in zip(examples, kernels)]
    warm_up, heap, rss = max(rounds // 4, 2), [], []
    for r in range(1, rounds):
        for e, k, bits in zip(examples, kernels, first):
            assert run_example(device, e, k, queue).tobytes() == bits, f"{e.name}: round {r + 1} differs"
        if r in (warm_up, rounds - 1):
            rss.append(trimmed_rss_bytes())
            heap.append(heap_in_use())
    growth = lambda pair: (pair[1] - pair[0]) / max(pair[0], 1)   # noqa: E731 - 0 under ASan
    figures = {"rounds": rounds, "examples": len(examples), "heap_after_warm_up": heap[0],
               "heap_at_end": heap[1], "heap_growth": growth(heap),
               "rss_after_warm_up": rss[0], "rss_at_end": rss[1], "growth": growth(rss)}
    if report:
        report(figures)
    if MEASURE_RSS:
        assert figures["heap_growth"] < 0.01, figures
        assert not check_rss or figures["growth"] < 0.01, figures
    return figures


def test_soak_registry_short():
    # under a sanitizer nothing is measured: a few rounds check the results (16 s for 40 in ASan)
    soak_registry(int(os.environ.get("MPSKERNELS_SOAK_ROUNDS", 40 if MEASURE_RSS else 8)))


@pytest.mark.slow
def test_soak_registry_full(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("300 rounds of every example: run with -m slow")
    soak_registry(300, check_rss=True, report=lambda f: print("\nregistry soak:", f))
