"""Shared fixtures of the elementwise tests (neurons, arithmetic)."""
import zlib

import numpy as np
import pytest

import mpskernels as mk
from mpskernels import _native

ISAS = ("generic", "avx2", "avx512")
FMT = mk.ImageFeatureChannelFormat


@pytest.fixture(scope="session")
def device():
    """A device with two threads (the kernels split big images between them)."""
    return mk.Device(num_threads=2)


@pytest.fixture(scope="session")
def device1():
    return mk.Device(num_threads=1)


def _select(name):
    chosen = _native.select_isa(name)
    if chosen != name:
        pytest.skip(f"this CPU cannot run ISA {name} (select_isa chose {chosen})")
    return chosen


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the kernels of one ISA, then restores the ISA in use before."""
    original = _native.active_isa()
    try:
        yield _select(request.param)
    finally:
        _native.select_isa(original)


@pytest.fixture
def select_isa():
    """select_isa(name): switch ISA (skipping the test if the CPU lacks it); the ISA in use
    before the test is restored afterwards."""
    original = _native.active_isa()
    yield _select
    _native.select_isa(original)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def run():
    """run(device, encode): encode(command_buffer) on a new command buffer, commit, wait, check
    that it completed without error; returns encode's result."""
    def _run(device, encode):
        cb = device.make_command_queue().make_command_buffer()
        result = encode(cb)
        cb.commit()
        cb.wait_until_completed()
        assert cb.error is None, cb.error
        assert cb.status == mk.CommandBufferStatus.COMPLETED
        return result
    return _run


def _storage_array(values, fmt):
    """float values (already representable in fmt) as the array from_numpy takes for fmt."""
    values = np.asarray(values, dtype=np.float64)
    if fmt == FMT.UNORM8:
        return np.rint(values * 255.0).astype(np.uint8)
    if fmt == FMT.UNORM16:
        return np.rint(values * 65535.0).astype(np.uint16)
    if fmt == FMT.FLOAT16:
        return values.astype(np.float16)
    return values.astype(np.float32)   # FLOAT32, and BFLOAT16 (values exact in bf16)


@pytest.fixture(scope="session")
def make_image():
    """make_image(device, values (N,H,W,C) or (H,W,C), fmt=FLOAT32): an Image holding values,
    which must be representable in fmt (so no conversion rounding is involved)."""
    def _make(device, values, fmt=FMT.FLOAT32):
        fmt = FMT(fmt)
        array = _storage_array(values, fmt)
        return mk.Image.from_numpy(device, array, channel_format=fmt)
    return _make


@pytest.fixture(scope="session")
def read_image():
    """read_image(image): its values as a float64 (N,H,W,C) array, whatever the format."""
    def _read(image):
        out = image.to_numpy()
        if out.dtype == np.uint8:
            return out.astype(np.float64) / 255.0
        if out.dtype == np.uint16 and image.feature_channel_format == FMT.UNORM16:
            return out.astype(np.float64) / 65535.0
        return out.astype(np.float64)
    return _read
