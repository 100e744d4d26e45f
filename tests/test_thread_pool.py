"""The thread pool itself (src/runtime/pool.c): every index of a parallel_for runs exactly
once, for any thread count, back to back and from several callers at once. Also run under
ThreadSanitizer by scripts/sanitize.sh tsan."""
import threading

import numpy as np
import pytest

from mpskernels import _native


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_each_index_once(threads):
    pool = _native.Pool(threads)
    rng = np.random.default_rng(threads)
    # back to back, so late workers of one job meet the next job: sizes from 0 to a few
    # thousand, grains from 1 to larger than n
    for _ in range(3000):
        n = int(rng.integers(0, 3000))
        grain = int(rng.integers(1, 64)) if rng.random() < 0.8 else int(rng.integers(1, 5000))
        counts = _native.pool_visit_counts(pool, n, grain)
        assert counts.shape == (n,)
        assert (counts == 1).all(), (n, grain, np.flatnonzero(counts != 1)[:10])


def test_several_callers_share_a_pool():
    """A caller that finds the pool busy runs its job itself; nothing is lost either way."""
    pool = _native.Pool(2)
    errors = []

    def call(seed):
        rng = np.random.default_rng(seed)
        for _ in range(500):
            n = int(rng.integers(1, 2000))
            counts = _native.pool_visit_counts(pool, n, int(rng.integers(1, 32)))
            if not (counts == 1).all():
                errors.append((seed, n))

    threads = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_thread_count_changes_between_jobs():
    pool = _native.Pool(1)
    for threads in (2, 4, 1, 3, 2):
        pool.num_threads = threads
        assert pool.num_threads == threads
        assert (_native.pool_visit_counts(pool, 1000, 7) == 1).all()
    with pytest.raises(ValueError):
        pool.num_threads = 0


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_each_thread_claims_its_own_share_first(threads):
    """A job's chunks are cut into one contiguous share per thread (the caller's first); each
    thread claims the start of its own share before anything else, so consecutive layers that
    split an image alike find the rows they read in the cache of the thread that wrote them.
    Each thread's first chunk waits until every thread has one: the first claims are then
    exactly the shares' starts, whichever thread woke first. The first job of a new pool
    included: workers started for a job take part in it."""
    pool = _native.Pool(threads)
    n = 4 * threads
    seen = [_native.pool_first_claims(pool, n) for _ in range(5)]
    claims = [sorted(s) for s in seen if s is not None]
    assert claims, "the workers never took part within 2 s"
    assert all(c == list(range(0, n, 4)) for c in claims), seen
