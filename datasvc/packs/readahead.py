"""Read-ahead driven by the sampler's known order.

A cold epoch reads records in random order; LMDB values then come in as page faults, 4 KiB
at a time (the map is opened with ``MADV_RANDOM``), and TFRecord records as one blocking
``pread`` per record per worker. But the sampler knows the whole epoch's order, so the reader
can name the byte ranges of the next few batches' records to the kernel ahead of their use,
and the disk reads them while the workers decode. ``ReadAhead`` keeps a window of upcoming
batches whose records have been advised and not yet consumed, at most ``max_bytes`` of
records (and at least one batch); an ``Adviser`` turns byte ranges into IO:

- ``fadvise``: ``posix_fadvise(WILLNEED)``, asynchronous kernel read-ahead of each range;
- ``madvise``: ``madvise(WILLNEED)`` on a read-only mapping of the shard (the same kernel
  path, reached through a mapping);
- ``thread``: a thread that ``pread``s each range into a scratch buffer, one at a time;
- ``io_uring``: reads submitted as a batch through io_uring (the ``liburing`` package), when
  it is installed.

Nothing here changes the order, the bytes or the pixels: read-ahead only decides what is in
the page cache when the reader asks for it.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from datasvc.packs.manifest import PackError
from datasvc.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
PAGE = mmap.PAGESIZE


def record_spans(reader) -> np.ndarray:
    """(file offset, length) of every record of one shard reader, by record index."""
    from datasvc.packs.lmdb import LMDBShardReader, value_spans

    if isinstance(reader, LMDBShardReader):
        return value_spans(reader.path)
    return np.asarray(reader.index, np.int64).reshape(-1, 2)


def merge_ranges(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(shard, offset, length) ranges → sorted, with touching or overlapping ones merged, so
    that a batch costs one request per run of neighbouring records."""
    out: list[list[int]] = []
    for shard, off, n in sorted(ranges):
        if out and out[-1][0] == shard and off <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], off + n - out[-1][1])
        else:
            out.append([shard, off, n])
    return [tuple(r) for r in out]


# --- advisers: byte ranges → IO ------------------------------------------------------------

ADVISERS = Registry("read-ahead method")


class Adviser:
    """Turns (shard, offset, length) ranges of a split's shard files into IO."""

    def __init__(self, paths: list):
        self.paths = [str(p) for p in paths]
        self._fds: dict[int, int] = {}

    def fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
            # Reads through this descriptor fetch the named ranges, not the kernel's guess
            # of what follows them: the window is the bound.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def advise(self, ranges: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@ADVISERS.register("fadvise")
class FadviseAdviser(Adviser):
    """``posix_fadvise(POSIX_FADV_WILLNEED)``: the kernel starts reading each range and
    returns; the pages land in the page cache that every process reading the file shares."""

    def advise(self, ranges):
        for shard, off, n in ranges:
            os.posix_fadvise(self.fd(shard), off, n, os.POSIX_FADV_WILLNEED)


@ADVISERS.register("madvise")
class MadviseAdviser(Adviser):
    """``madvise(MADV_WILLNEED)`` on a read-only mapping of each shard."""

    def __init__(self, paths):
        super().__init__(paths)
        self._maps: dict[int, mmap.mmap] = {}

    def advise(self, ranges):
        for shard, off, n in ranges:
            m = self._maps.get(shard)
            if m is None:
                m = self._maps[shard] = mmap.mmap(self.fd(shard), 0, access=mmap.ACCESS_READ)
            start = off - off % PAGE
            m.madvise(mmap.MADV_WILLNEED, start, min(len(m), off + n) - start)

    def close(self):
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        super().close()


@ADVISERS.register("thread")
class ThreadAdviser(Adviser):
    """A thread that reads each range (into a reused scratch buffer, so the bytes only pass
    through it): the read brings the pages into the page cache before a worker asks."""

    CHUNK = 1 << 20

    def __init__(self, paths):
        super().__init__(paths)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="datasvc-readahead")
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        while (item := self._queue.get()) is not None:
            shard, off, n = item
            fd = self.fd(shard)
            while n > 0:
                got = os.preadv(fd, [view[: min(n, self.CHUNK)]], off)
                if got <= 0:
                    break
                off, n = off + got, n - got
            self._queue.task_done()
        self._queue.task_done()

    def advise(self, ranges):
        for r in ranges:
            self._queue.put(r)

    def drain(self) -> None:
        """Wait until every range handed over so far has been read."""
        self._queue.join()

    def close(self):
        self._queue.put(None)
        self._thread.join(timeout=30)
        super().close()


def _register_io_uring() -> None:
    try:
        from datasvc.packs.uring import UringAdviser
    except ImportError:  # the optional liburing package is not installed
        return
    ADVISERS.register("io_uring")(UringAdviser)


_register_io_uring()


def create_adviser(method: str, paths: list) -> Adviser:
    return ADVISERS.get(method)(paths)


# --- the window ----------------------------------------------------------------------------


def batch_ranges(split, ids, spans: dict) -> list[tuple[int, int, int]]:
    """(shard, offset, length) of the records ``ids`` of ``split``; ``spans`` caches each
    shard's ``record_spans``."""
    ranges = []
    for sid in ids:
        shard, local = split.locate(int(sid))
        table = spans.get(shard)
        if table is None:
            table = spans[shard] = record_spans(split.shard(shard))
        off, n = table[local]
        ranges.append((shard, int(off), int(n)))
    return ranges


class ReadAhead:
    """Advises the records of batches ``start, start + 1, ... end - 1`` ahead of their use.

    ``batch_ids(b)`` gives batch ``b``'s sample ids (the sampler's listing). The caller calls
    ``fill()`` when it hands batches out and ``done(b)`` once batch ``b``'s records have been
    read; the window then moves on. At most ``max_bytes`` of advised records are unconsumed
    at any time, or a single batch when one batch alone is larger.
    """

    def __init__(
        self,
        split,
        batch_ids: Callable[[int], np.ndarray],
        start: int,
        end: int,
        *,
        method: str = "fadvise",
        max_bytes: int = DEFAULT_MAX_BYTES,
        spans: dict | None = None,
    ):
        self.split = split
        self.batch_ids = batch_ids
        self.next = start
        self.end = end
        self.max_bytes = max_bytes
        self.adviser = create_adviser(method, split.shard_paths)
        self.window: dict[int, int] = {}  # batch → its advised bytes
        self.window_bytes = 0
        self.peak_bytes = 0
        self.advised_bytes = 0
        self._spans = {} if spans is None else spans  # shard → record_spans, reusable

    def fill(self) -> None:
        """Advise further batches while the window has room. Read-ahead never fails a read:
        on a shard it cannot map (damage is the reader's to report) it turns itself off."""
        try:
            self._fill()
        except (OSError, PackError) as e:
            log.warning("read-ahead off for this epoch: %s", e)
            self.next = self.end

    def _fill(self) -> None:
        while self.next < self.end:
            ranges = batch_ranges(self.split, self.batch_ids(self.next), self._spans)
            nbytes = sum(n for _, _, n in ranges)
            if self.window and self.window_bytes + nbytes > self.max_bytes:
                return
            self.adviser.advise(merge_ranges(ranges))
            self.window[self.next] = nbytes
            self.window_bytes += nbytes
            self.advised_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.window_bytes)
            self.next += 1

    def done(self, b: int) -> None:
        """Batch ``b``'s records have been read: its bytes leave the window."""
        self.window_bytes -= self.window.pop(b, 0)
        self.fill()

    def close(self) -> None:
        self.adviser.close()


def read_ahead_for(
    split, sampler, start: int, end: int, method, max_bytes=None, spans=None
) -> ReadAhead | None:
    """A ``ReadAhead`` over a sampler's listing, or None when ``method`` is None/'none'."""
    if method in (None, "none"):
        return None
    return ReadAhead(
        split,
        sampler.batch,
        start,
        end,
        method=method,
        max_bytes=max_bytes or DEFAULT_MAX_BYTES,
        spans=spans,
    )


class AheadOfRequests:
    """Read-ahead for a server's builders, which see one request at a time: building batch
    ``b`` of a listing, advise batches ``b + 1 .. b + depth`` of the same listing (those its
    client asks for next), each once per builder. Per stream of requests the window is
    ``depth`` batches; at most ``streams`` streams are tracked (least recent dropped)."""

    def __init__(self, method: str = "fadvise", depth: int = 4, streams: int = 256):
        self.method, self.depth, self.streams = method, depth, streams
        self._frontier: OrderedDict = OrderedDict()  # stream key → last batch advised
        self._splits: dict[int, tuple] = {}  # id(split) → (split, adviser, spans)

    def _adviser(self, split) -> tuple:
        entry = self._splits.get(id(split))
        if entry is None or entry[0] is not split:
            entry = self._splits[id(split)] = (
                split,
                create_adviser(self.method, split.shard_paths),
                {},
            )
        return entry

    def after(self, split, sampler, key, b: int) -> None:
        """Batch ``b`` of ``sampler``'s listing (stream ``key``) is being built. Never fails
        the build: a shard that cannot be mapped is the reader's to report."""
        try:
            self._after(split, sampler, key, b)
        except (OSError, PackError) as e:
            log.warning("read-ahead skipped for batch %d: %s", b + 1, e)

    def _after(self, split, sampler, key, b: int) -> None:
        last = max(self._frontier.pop(key, b), b)
        upto = min(len(sampler) - 1, b + self.depth)
        if upto > last:
            _, adviser, spans = self._adviser(split)
            for nb in range(last + 1, upto + 1):
                adviser.advise(merge_ranges(batch_ranges(split, sampler.batch(nb), spans)))
        self._frontier[key] = max(last, upto)
        while len(self._frontier) > self.streams:
            self._frontier.popitem(last=False)

    def close(self) -> None:
        for _, adviser, _ in self._splits.values():
            adviser.close()
        self._splits.clear()
