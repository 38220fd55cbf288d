"""EpochSampler: exact-once per epoch, equal full batches on every train rank, and resume."""

from __future__ import annotations

import numpy as np
import pytest

from datasvc.sampling import EpochSampler


def rank_batches(n, bs, world, train, epoch=0, seed=0):
    out = []
    for r in range(world):
        s = EpochSampler(n, bs, rank=r, world_size=world, seed=seed, shuffle=train, drop_last=train)
        s.set_epoch(epoch)
        out.append([s.batch(b) for b in range(len(s))])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,bs", [(100, 8), (97, 5), (10, 4)])
def test_train_rule(world, n, bs):
    batches = rank_batches(n, bs, world, train=True)
    counts = {len(b) for b in batches}
    assert len(counts) == 1, "every rank gets the same number of batches"
    flat = np.concatenate([x for rb in batches for x in rb] or [np.array([], np.int64)])
    assert all(len(x) == bs for rb in batches for x in rb), "only full batches"
    assert len(np.unique(flat)) == len(flat), "nothing duplicated"
    assert n - len(flat) < bs * world, "only the remainder is dropped"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,bs", [(100, 8), (97, 5), (10, 4), (3, 4)])
def test_eval_rule(world, n, bs):
    batches = rank_batches(n, bs, world, train=False)
    flat = np.concatenate([x for rb in batches for x in rb])
    assert sorted(flat.tolist()) == list(range(n)), "every sample exactly once, no padding"


def test_epochs_differ_and_repeat():
    a = rank_batches(64, 8, 2, True, epoch=0)
    b = rank_batches(64, 8, 2, True, epoch=1)
    c = rank_batches(64, 8, 2, True, epoch=0)
    assert not np.array_equal(a[0][0], b[0][0])
    assert all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def _consume(s, k):
    out = []
    for b in list(s.remaining())[:k]:
        out.append(s.batch(b))
        s.advance()
    return out


@pytest.mark.parametrize("train", [True, False])
def test_resume_same_world(train):
    n, bs, w = 103, 4, 2
    full = rank_batches(n, bs, w, train, epoch=3)
    for r in range(w):
        s = EpochSampler(n, bs, rank=r, world_size=w, shuffle=train, drop_last=train)
        s.set_epoch(3)
        head = _consume(s, 5)
        t = EpochSampler(n, bs, rank=r, world_size=w, shuffle=train, drop_last=train)
        t.load_state_dict(s.state_dict())
        tail = _consume(t, 10**6)
        got = head + tail
        assert len(got) == len(full[r])
        assert all(np.array_equal(x, y) for x, y in zip(got, full[r]))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (1, 2)])
def test_resume_other_world(train, old, new):
    """Continue from the same global position: nothing repeated, nothing skipped."""
    n, bs = 211, 5
    seen = []
    states = []
    for r in range(old):
        s = EpochSampler(n, bs, rank=r, world_size=old, shuffle=train, drop_last=train)
        seen += _consume(s, 4)
        states.append(s.state_dict())
    for r in range(new):
        t = EpochSampler(n, bs, rank=r, world_size=new, shuffle=train, drop_last=train)
        t.load_state_dict(states[0])
        seen += _consume(t, 10**6)
    flat = np.concatenate(seen)
    assert len(np.unique(flat)) == len(flat)
    if train:
        assert n - len(flat) < bs * max(old, new)
    else:
        assert sorted(flat.tolist()) == list(range(n))


def test_listing_computed_once_for_every_rank():
    from datasvc.sampling import ListingCache

    cache = ListingCache()
    n, bs, world = 10_000, 16, 64
    seen = []
    for epoch in (0, 1):
        for r in range(world):
            s = EpochSampler(n, bs, rank=r, world_size=world, seed=3, listings=cache)
            s.set_epoch(epoch)
            for b in range(len(s)):
                ids = s.batch(b)
                assert ids.base is not None and not ids.flags.writeable, "a read-only view"
                seen.append(ids)
        assert cache.computed == epoch + 1, "one listing per epoch, whatever the world size"
    flat = np.concatenate(seen[: len(seen) // 2])
    assert len(np.unique(flat)) == len(flat) == (n // (bs * world)) * bs * world


def test_listing_cache_memory_is_bounded():
    from datasvc.sampling import ListingCache

    cache = ListingCache(max_bytes=3 * 8 * 1000, max_listings=5)
    for epoch in range(10):
        cache.order(1000, 0, epoch, True)
    assert len(cache) == 3 and cache.nbytes == 3 * 8 * 1000
    cache.order(1000, 0, 9, True)  # still held: not recomputed
    assert cache.computed == 10
    cache.order(1000, 0, 0, True)  # evicted long ago: recomputed, same order
    assert cache.computed == 11
    assert np.array_equal(cache.order(1000, 0, 0, True), EpochSampler(1000, 1).order())
    by_count = ListingCache(max_listings=2)
    for epoch in range(10):
        by_count.order(100, 0, epoch, True)
    assert len(by_count) == 2 and by_count.nbytes == 2 * 8 * 100


def test_listing_cache_drops_idle_listings():
    """With ``max_idle_s``, a listing no one asked for in that long goes (least recently used
    first), the newest stays, and one still in use is kept however old its epoch."""
    from datasvc.sampling import ListingCache

    now = [0.0]
    cache = ListingCache(max_listings=4, max_idle_s=10.0, clock=lambda: now[0])
    cache.order(1000, 0, 0, True)
    now[0] = 5.0
    cache.order(1000, 0, 1, True)
    now[0] = 12.0
    cache.order(1000, 0, 1, True)  # epoch 0 unused for 12 s: dropped
    assert len(cache) == 1 and cache.nbytes == 8 * 1000 and cache.computed == 2
    for t in (20.0, 29.0, 38.0):  # epoch 5 read every 9 s: kept while newer epochs come and go
        now[0] = t
        cache.order(1000, 0, 5, True)
        cache.order(1000, 0, int(t), True)
    assert len(cache) == 3 and cache.computed == 6  # epoch 5 and the two newest
    now[0] = 100.0  # everything idle: the newest is kept
    cache.order(1000, 0, 5, True)
    assert len(cache) == 1 and cache.computed == 6
