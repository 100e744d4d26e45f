"""The arena by itself: planned offsets never let two live blocks overlap, and the block
cache reuses, bounds and gives back its memory."""
import numpy as np
import pytest

from mpskernels import _native


def check_plan(sizes, firsts, lasts):
    offsets, stats = _native.plan_arena(sizes, firsts, lasts)
    n = len(sizes)
    aligned = [-(-s // 64) * 64 for s in sizes]
    assert all(o % 64 == 0 for o in offsets)
    for i in range(n):
        for j in range(i + 1, n):
            live_together = firsts[i] <= lasts[j] and firsts[j] <= lasts[i]
            if live_together:
                disjoint = (offsets[i] + aligned[i] <= offsets[j]
                            or offsets[j] + aligned[j] <= offsets[i])
                assert disjoint, (i, j, offsets[i], offsets[j])
    assert stats["peak_bytes"] == max((o + a for o, a in zip(offsets, aligned)), default=0)
    assert stats["requested_bytes"] == sum(aligned)
    horizon = max(lasts, default=0) + 1
    live = [sum(a for a, f, l in zip(aligned, firsts, lasts) if f <= t <= l) for t in range(horizon)]
    assert stats["lower_bound_bytes"] == max(live, default=0)
    assert stats["lower_bound_bytes"] <= stats["peak_bytes"] <= stats["requested_bytes"]
    return offsets, stats


@pytest.mark.parametrize("seed", range(40))
def test_random_lifetimes_never_overlap(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    firsts = rng.integers(0, 200, n)
    lasts = firsts + rng.integers(0, 40, n)
    sizes = rng.integers(1, 1 << 20, n)
    _, stats = check_plan(sizes.tolist(), firsts.tolist(), lasts.tolist())
    # greedy by size is near-optimal on such inputs; a wide margin still catches regressions
    assert stats["peak_bytes"] <= 2 * stats["lower_bound_bytes"]


def test_chain_reuses_memory():
    # t[i] is written by command i and read by command i+1: two live at a time
    n, size = 31, 1000 * 64
    offsets, stats = check_plan([size] * n, list(range(n)), list(range(1, n + 1)))
    assert stats["peak_bytes"] == 2 * size
    assert stats["requested_bytes"] == n * size


def test_empty_and_bad_input():
    offsets, stats = _native.plan_arena([], [], [])
    assert len(offsets) == 0 and stats["peak_bytes"] == 0
    with pytest.raises(ValueError):
        _native.plan_arena([64], [3], [2])      # ends before it starts
    with pytest.raises(ValueError):
        _native.plan_arena([64, 64], [0], [1])  # lengths differ


def test_block_cache_reuses_and_trims():
    cache = _native.BlockCache()
    a = cache.acquire(1 << 20)
    assert a.fresh and a.address % 64 == 0 and a.size >= 1 << 20
    address = a.address
    a.release()
    assert cache.idle_bytes == a.size
    b = cache.acquire(1000)            # the idle block fits: no new allocation
    assert not b.fresh and b.address == address
    b.release()
    c = cache.acquire(4 << 20)         # nothing fits: the smaller idle block is dropped
    assert c.fresh and cache.total_bytes == c.size
    c.release()
    assert cache.trim() == c.size
    assert cache.total_bytes == 0 and cache.idle_bytes == 0
