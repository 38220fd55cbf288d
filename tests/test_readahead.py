"""Read-ahead from the sampler's order: record spans are exact, batches are unchanged, the
window stays within its bound, and the page-cache tools really make a pack cold."""

from __future__ import annotations

import time

import numpy as np
import pytest

from datasvc.loaders import create_loader
from datasvc.packs import lmdb as lmdb_format
from datasvc.packs import open_pack
from datasvc.packs.pagecache import PAGE, drop_cache, resident_fraction, resident_pages
from datasvc.packs.readahead import (
    ADVISERS,
    AheadOfRequests,
    ReadAhead,
    batch_ranges,
    merge_ranges,
    record_spans,
)
from datasvc.sampling import EpochSampler

METHODS = [m for m in ("fadvise", "madvise", "thread", "io_uring") if m in ADVISERS]


@pytest.fixture(params=["lmdb", "tfrecord"])
def pack(request, lmdb_pack, tfrecord_pack):
    return lmdb_pack if request.param == "lmdb" else tfrecord_pack


def make_cold(split) -> float:
    """Drop the split's shards from the page cache (closing this process's maps first)."""
    split.close()
    lmdb_format.close_environments()
    drop_cache(split.shard_paths)
    return resident_fraction(split.shard_paths)


def test_record_spans_point_at_each_record(pack):
    split = open_pack(pack).split("train")
    seen = 0
    for k, path in enumerate(split.shard_paths):
        data = path.read_bytes()
        reader = split.shard(k)
        spans = record_spans(reader)
        assert len(spans) == len(reader) > 0
        for i, (off, n) in enumerate(spans):
            assert data[off : off + n] == reader.raw(i)
            seen += 1
    assert seen == len(split)


def test_lmdb_spans_read_only_the_tree(lmdb_pack):
    """The spans come from the tree's pages: a cold walk leaves the values out of the cache."""
    split = open_pack(lmdb_pack).split("train")
    assert make_cold(split) < 0.1
    for path in split.shard_paths:
        lmdb_format.value_spans(path)
    resident, total = map(sum, zip(*(resident_pages(p) for p in split.shard_paths)))
    values = sum(n for p in split.shard_paths for _, n in lmdb_format.value_spans(p))
    assert resident * PAGE < values / 2, (resident, total, values)


def test_merge_ranges_joins_neighbours_only():
    got = merge_ranges([(1, 100, 50), (0, 10, 5), (1, 150, 10), (1, 300, 1), (0, 12, 10)])
    assert got == [(0, 10, 12), (1, 100, 60), (1, 300, 1)]


def _epoch(pack, fmt_read_ahead, engine="process"):
    with create_loader(
        "custom",
        pack,
        batch_size=8,
        image_size=48,
        num_workers=2,
        seed=3,
        engine=engine,
        read_ahead=fmt_read_ahead,
        read_ahead_mb=0.05,  # a window of a batch or two: it moves through the whole epoch
    ) as loader:
        loader.set_epoch(1)
        return [(b.ids.clone(), b.images.clone(), b.labels.clone()) for b in loader]


@pytest.mark.parametrize("method", METHODS)
def test_read_ahead_returns_the_same_batches(pack, method):
    split = open_pack(pack).split("train")
    make_cold(split)
    plain = _epoch(pack, None)
    make_cold(split)
    ahead = _epoch(pack, method)
    assert len(plain) == len(ahead) == len(split) // 8
    for (i0, x0, y0), (i1, x1, y1) in zip(plain, ahead):
        assert np.array_equal(i0, i1)
        assert np.array_equal(y0, y1)
        assert np.array_equal(x0, x1)


def test_read_ahead_same_batches_thread_engine(pack):
    assert all(
        np.array_equal(a[1], b[1])
        for a, b in zip(_epoch(pack, None, "thread"), _epoch(pack, "fadvise", "thread"))
    )


def test_unknown_read_ahead_method_is_refused(lmdb_pack):
    with pytest.raises(ValueError, match="fadvise"):
        create_loader("custom", lmdb_pack, read_ahead="telepathy")


@pytest.mark.parametrize("method", METHODS)
def test_window_stays_within_its_bound(pack, method):
    """Advised-but-unread bytes never pass the bound, and neither do the pages the kernel
    brought in beyond what was consumed (mincore, on a cold pack)."""
    split = open_pack(pack).split("train")
    sampler = EpochSampler(len(split), 4, seed=0)
    spans = {k: record_spans(split.shard(k)) for k in range(len(split.shard_paths))}
    sizes = [sum(spans[k][i][1] for k, i in map(split.locate, sampler.batch(b))) for b in range(3)]
    bound = int(max(sizes) * 1.5)
    assert make_cold(split) < 0.1
    ra = ReadAhead(
        split, sampler.batch, 0, len(sampler), method=method, max_bytes=bound, spans=spans
    )
    consumed = 0
    try:
        for b in range(len(sampler)):
            ra.fill()
            assert ra.window_bytes <= bound
            if method == "thread":
                ra.adviser.drain()
            resident = sum(resident_pages(p)[0] for p in split.shard_paths) * PAGE
            # each advised record can add a partial page at both ends; LMDB adds its tree
            slack = 2 * PAGE * 4 * len(ra.window) + 16 * PAGE * len(split.shard_paths)
            assert resident <= consumed + ra.window_bytes + slack, (b, resident, consumed)
            consumed += ra.window[b]
            ra.done(b)
    finally:
        ra.close()
    assert ra.peak_bytes <= bound and ra.advised_bytes == consumed
    every = [split.locate(i) for b in range(len(sampler)) for i in sampler.batch(b)]
    assert consumed == sum(spans[k][i][1] for k, i in every)


def test_cold_means_cold(pack):
    split = open_pack(pack).split("train")
    for path in split.shard_paths:
        path.read_bytes()
    assert resident_fraction(split.shard_paths) > 0.9
    assert make_cold(split) < 0.1


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.dali
@pytest.mark.skipif(not _has_dali(), reason="NVIDIA DALI is not installed")
def test_dali_feeder_read_ahead_same_batches(lmdb_pack):
    def epoch(read_ahead):
        kw = dict(batch_size=8, image_size=48, num_workers=1, seed=3, read_ahead=read_ahead)
        with create_loader("dali_cpu", lmdb_pack, **kw) as loader:
            return [(b.ids.clone(), b.images.clone()) for b in loader]

    split = open_pack(lmdb_pack).split("train")
    make_cold(split)
    plain = epoch(None)
    make_cold(split)
    ahead = epoch("fadvise")
    assert len(plain) == len(ahead) > 0
    assert all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(plain, ahead)
    )


def test_builders_read_ahead_the_next_requests(pack):
    """A builder building batch b advises batches b+1..b+depth of the same listing, once: on a
    cold pack their records come in, and nothing past the window."""
    split = open_pack(pack).split("train")
    sampler = EpochSampler(len(split), 4, seed=1)
    ahead = AheadOfRequests(method="fadvise", depth=2)
    assert make_cold(split) < 0.1
    try:
        ahead.after(split, sampler, ("stream",), 0)
        ahead.after(split, sampler, ("stream",), 0)  # a second builder: nothing new
        assert ahead._frontier[("stream",)] == 2
    finally:
        ahead.close()
    wanted = [r for b in (1, 2) for r in batch_ranges(split, sampler.batch(b), {})]
    paths = split.shard_paths
    deadline = time.monotonic() + 10  # WILLNEED starts the reads; give them time to land
    while time.monotonic() < deadline and not all(_cached(paths[k], o, n) for k, o, n in wanted):
        time.sleep(0.05)
    assert all(_cached(paths[k], o, n) for k, o, n in wanted)
    resident = sum(resident_pages(p)[0] for p in paths) * PAGE
    window = sum(n for _, _, n in wanted)
    assert resident <= window + 2 * PAGE * len(wanted) + 16 * PAGE * len(paths)


def _cached(path, off: int, n: int) -> bool:
    resident, pages = resident_pages(path, off, n)
    return resident == pages
