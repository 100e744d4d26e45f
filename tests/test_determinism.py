"""Determinism and instruction sets, for every family in families.EXAMPLES: the same bits for
1, 2, 3 and 4 threads and on every repeated run (per ISA), and the portable, AVX2 and AVX-512
paths within each example's tolerance of each other."""

import numpy as np
import pytest

import mpskernels as mk
from families import CONVOLUTION_KERNELS, EXAMPLES, examples, run_example
from mpskernels import _native

ISAS = _native.ISA_NAMES[:_native.ISA_NAMES.index(_native.best_isa()) + 1]   # this CPU's


@pytest.fixture
def restore_isa():
    original = _native.active_isa()
    yield
    _native.select_isa(original)


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_bitwise_identical_across_threads_and_runs(family, restore_isa):
    devices = {n: mk.Device(num_threads=n) for n in (1, 2, 3, 4)}
    for isa in ISAS:
        assert _native.select_isa(isa) == isa
        for example in examples(family):
            first = run_example(devices[1], example).tobytes()
            for n, device in devices.items():
                for repeat in range(2):
                    assert run_example(device, example).tobytes() == first, \
                        f"{example.name} ({isa}): {n} threads, run {repeat + 1} differs from 1 thread"


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_isas_agree(family, restore_isa):
    if len(ISAS) == 1:
        pytest.skip("this CPU has only the portable path")
    device = mk.Device(num_threads=2)
    for example in examples(family):
        results = {}
        for isa in ISAS:
            _native.select_isa(isa)
            results[isa] = run_example(device, example).astype(np.float64)
        reference = results["generic"]
        for isa, got in results.items():
            assert np.array_equal(np.isnan(got), np.isnan(reference)), f"{example.name}: NaNs differ ({isa})"
            with np.errstate(invalid="ignore"):
                diff = np.abs(np.nan_to_num(got - reference))
            scale = np.maximum(1.0, np.abs(np.nan_to_num(reference)))
            if example.normwise:
                scale = scale.max()
            assert (diff <= example.rtol * scale).all(), (
                f"{example.name}: {isa} differs from generic by {(diff / scale).max():.3g} relative")


def test_convolution_examples_reach_every_kernel(restore_isa):
    """The examples cover each C kernel of src/conv (the AVX-512 choice; others may differ)."""
    if "avx512" not in ISAS:
        pytest.skip("the kernels chosen are stated for AVX-512")
    _native.select_isa("avx512")
    device = mk.Device(num_threads=1)
    reached = {e.name: e.kernels(device).implementation.split("_")[0] for e in examples("convolution")}
    assert reached == CONVOLUTION_KERNELS
    assert set(reached.values()) == {"winograd", "igemm", "dwconv", "gconv", "direct"}
