"""``custom``: our fastest CPU path; whole batches (crop-aware decode, resize, flip) are built
by workers of one of two engines:

- ``engine="process"``: worker processes write into slots of one anonymous shared mapping. The
  consumer gets the slot itself (a tensor view, no copy) and the slot is reused only after
  every view of it has been dropped (its storage's use count says so); a consumer that holds
  many batches gets copies past the point where the workers would run out of slots. The
  mapping has no name, so no crash can leave a segment behind.
- ``engine="thread"``: a thread pool in the consumer's process writes each batch straight into
  the tensor that is handed out (the decoder and OpenCV release the GIL): no copy, no IPC.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import signal
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

import numpy as np
import torch

from datasvc.batch import Batch, fill_batch
from datasvc.corrupt import CorruptRecordError
from datasvc.decode import init_decode_worker
from datasvc.lifecycle import die_with_parent
from datasvc.loaders import register_loader
from datasvc.loaders.base import Loader, default_workers, renamed
from datasvc.memory import recycle_large_allocations
from datasvc.packs import open_pack
from datasvc.packs.readahead import ADVISERS, DEFAULT_MAX_BYTES, read_ahead_for

#: Where the custom loader's workers run: forked processes or threads of the consumer.
Engine = Literal["process", "thread"]
ENGINES: tuple[str, ...] = get_args(Engine)


class SlotRing:
    """``n`` batch slots (images N×S×S×3 uint8 + labels N int64) in one anonymous mapping,
    shared with processes forked after its creation."""

    def __init__(self, n: int, batch_size: int, image_size: int):
        self.n = n
        self.image_bytes = batch_size * image_size * image_size * 3
        self.slot_bytes = self.image_bytes + batch_size * 8
        self.shape = (batch_size, image_size, image_size, 3)
        self.mem = mmap.mmap(-1, n * self.slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS

    def views(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        base = slot * self.slot_bytes
        images = np.frombuffer(self.mem, np.uint8, self.image_bytes, base).reshape(self.shape)
        labels = np.frombuffer(self.mem, np.int64, self.shape[0], base + self.image_bytes)
        return images, labels


class _TrackedSplit:
    """A split that notes in shared memory which sample its worker is reading, so that a
    worker killed by a signal can be reported with the shard and record it was on."""

    def __init__(self, split, reading, index: int):
        self._split, self._reading, self._index = split, reading, index

    def __getitem__(self, sid: int):
        self._reading[self._index] = int(sid)
        return self._split[sid]

    def __getattr__(self, name):
        return getattr(self._split, name)


def _worker_main(
    split, cfg, seed, ring: SlotRing, decoder, tasks, results, parent: int, policy: tuple
) -> None:
    """``policy``: (on_corrupt, the shared array of samples being read, this worker's index)."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the consumer decides when to stop
    torch.set_num_threads(1)
    init_decode_worker()
    recycle_large_allocations()
    on_corrupt, reading, index = policy
    tracked = _TrackedSplit(split, reading, index)
    while True:
        task = tasks.get()
        if task is None:
            return
        slot, epoch, b, ids = task
        images, labels = ring.views(slot)
        try:
            kept, skipped = fill_batch(
                tracked, ids, cfg, seed, epoch, images, labels, decoder, on_corrupt
            )
            results.put((b, None, kept, skipped))
        except CorruptRecordError as e:
            results.put((b, ("corrupt", e.entry), None, []))
        except Exception as e:  # noqa: BLE001 - reported to the consumer with its type
            msg = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            results.put((b, ("error", msg), None, []))
        reading[index] = -1


def _use_count(t: torch.Tensor) -> int:
    """References to a tensor's storage: views handed out raise it."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _shutdown(procs, tasks) -> None:
    for _ in procs:
        try:
            tasks.put(None)
        except Exception:  # noqa: BLE001
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


@register_loader("custom")
class CustomLoader(Loader):
    """Batches built by ``num_workers`` processes (or threads) into shared slots.

    Options: ``engine`` ('process' or 'thread'), ``prefetch_factor`` (batches in flight per
    worker, default 2, as in torch's DataLoader), ``decoder`` (a ``DECODERS`` name),
    ``pin_memory``, ``drop_last``, ``timeout`` (seconds without any batch before failing),
    ``read_ahead`` (a ``datasvc.packs.readahead`` method, default 'fadvise', or None) and
    ``read_ahead_mb`` (its window, default 64).
    Deprecated: ``workers`` (now ``num_workers``) and ``prefetch`` (batches in flight in all).
    """

    backend = "custom"

    def __init__(
        self,
        source,
        *,
        split="train",
        num_workers: int | None = None,
        prefetch_factor: int | None = None,
        decoder: str | None = None,
        pin_memory: bool = False,
        timeout: float = 120.0,
        engine: Engine = "process",
        read_ahead: str | None = "fadvise",
        read_ahead_mb: float = DEFAULT_MAX_BYTES >> 20,
        workers: int | None = None,
        prefetch: int | None = None,
        **common,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if read_ahead not in (None, "none") and read_ahead not in ADVISERS:
            raise ValueError(
                f"read_ahead must be None or one of {ADVISERS.names()}, got {read_ahead!r}"
            )
        self.engine = engine
        self.pack = open_pack(source)
        self.split = self.pack.split(split)
        super().__init__(
            len(self.split),
            **common,
        )
        num_workers = renamed("workers", "num_workers", workers, num_workers)
        self.num_workers = max(1, num_workers or default_workers())
        if prefetch is not None:  # the old meaning: batches in flight in all
            slots = renamed("prefetch", "prefetch_factor", prefetch, prefetch_factor)
            self.prefetch_factor = -(-slots // self.num_workers)
        else:
            self.prefetch_factor = max(1, prefetch_factor or 2)
            slots = self.prefetch_factor * self.num_workers
        self.slots = max(2, slots)  # batches in flight (and shared slots) in all
        self.decoder = decoder
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.read_ahead = read_ahead
        self.read_ahead_bytes = int(read_ahead_mb * 2**20)
        self._spans: dict = {}  # shard → record spans, kept across epochs
        self._procs: list = []
        self._finalizer = None
        self._pool = None
        self._held: set[int] = set()

    # --- worker pool ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._procs:
            return
        ctx = mp.get_context("fork")
        self._ring = SlotRing(self.slots, self.batch_size, self.cfg.image_size)
        r = self._ring
        self._slot_images = [
            torch.frombuffer(
                r.mem, dtype=torch.uint8, count=r.image_bytes, offset=k * r.slot_bytes
            ).view(r.shape)
            for k in range(r.n)
        ]
        self._slot_base = [_use_count(t) for t in self._slot_images]
        self._held: set[int] = set()
        self._tasks = ctx.SimpleQueue()
        self._results = ctx.Queue()
        self._reading = ctx.RawArray("q", [-1] * self.num_workers)
        self.split.close()  # each worker opens its own read-only handles
        self._procs = [
            ctx.Process(
                target=_worker_main,
                daemon=True,
                name=f"datasvc-custom-{i}",
                args=(
                    self.split,
                    self.cfg,
                    self.seed,
                    self._ring,
                    self.decoder,
                    self._tasks,
                    self._results,
                    os.getpid(),
                    (self.on_corrupt, self._reading, i),
                ),
            )
            for i in range(self.num_workers)
        ]
        for p in self._procs:
            p.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._tasks)

    def _build(self, epoch: int, b: int) -> tuple[Batch, list[dict]]:
        """One whole batch, written straight into the tensor handed out (thread engine), and
        the records it skipped."""
        ids = self.sampler.batch(b)
        s = self.cfg.image_size
        images = torch.empty((len(ids), s, s, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        labels = torch.empty(len(ids), dtype=torch.int64)
        kept, skipped = fill_batch(
            self.split,
            ids,
            self.cfg,
            self.seed,
            epoch,
            images.numpy(),
            labels.numpy(),
            self.decoder,
            self.on_corrupt,
        )
        n = len(kept)
        batch = Batch(images[:n].permute(0, 3, 1, 2), labels[:n], torch.from_numpy(kept))
        return batch, skipped

    def _thread_batches(self, start: int):
        if self._pool is None:
            init_decode_worker()  # threads that decode here: OpenCV single-threaded (see there)
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="datasvc-custom")
        end, epoch = len(self.sampler), self.sampler.epoch
        futures = {}
        ra = self._read_ahead(start, end)
        try:
            for want in range(start, end):
                if ra is not None:
                    ra.fill()
                for b in range(want, min(end, want + self.slots)):
                    if b not in futures:
                        futures[b] = self._pool.submit(self._build, epoch, b)
                batch, skipped = futures.pop(want).result(timeout=self.timeout)
                if ra is not None:
                    ra.done(want)
                self.ledger.add(skipped)
                yield batch
        finally:
            if ra is not None:
                ra.close()
            for f in futures.values():
                f.cancel()
            for f in futures.values():
                if not f.cancelled():
                    f.exception()  # wait: no thread may still be writing after we return

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._finalizer is not None:
            self._finalizer()
        self._procs = []
        self._finalizer = None

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _get_result(self):
        waited = 0.0
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    error = self._dead_worker_error(dead)
                    self.close()
                    raise error from None
                if waited >= self.timeout:
                    raise TimeoutError(
                        f"no batch from the custom loader in {self.timeout:.0f}s"
                    ) from None

    def _dead_worker_error(self, dead) -> RuntimeError:
        """Which worker died, of which signal or exit code, and what it was reading."""
        parts = []
        for p in dead:
            code = p.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            sid = self._reading[self._procs.index(p)]
            where = ""
            if sid >= 0:
                shard, local = self.split.locate(sid)
                where = (
                    f" while reading sample {sid} ({self.split.shard_paths[shard]} record {local})"
                )
            parts.append(f"{p.name} {how}{where}")
        hint = ""
        if any(p.exitcode == -signal.SIGBUS for p in dead):
            hint = " (SIGBUS: a shard file shrank while mapped; run datasvc verify on the pack)"
        return RuntimeError(f"custom loader worker died: {'; '.join(parts)}{hint}")

    # --- iteration --------------------------------------------------------------------------

    def _batches(self, start: int):
        if self.engine == "thread":
            yield from self._thread_batches(start)
            return
        self._start()
        end = len(self.sampler)
        free = [k for k in range(self.slots) if k not in self._held]
        slot_of: dict[int, int] = {}  # batch index -> the slot its task writes
        ready: dict[int, object] = {}  # results that came back before their turn
        next_b = start
        ra = self._read_ahead(start, end)
        try:
            for want in range(start, end):
                free += self._released()
                if ra is not None:
                    ra.fill()  # before the tasks go out: the kernel reads while workers wait
                next_b = self._submit(free, slot_of, next_b, end)
                while want not in ready:
                    b, *result = self._get_result()
                    ready[b] = result
                    if ra is not None:
                        ra.done(b)
                yield self._deliver(slot_of.pop(want), free, *ready.pop(want))
        finally:
            if ra is not None:
                ra.close()
            self._wait_for_builds(len(slot_of) - len(ready))

    def _submit(self, free: list[int], slot_of: dict[int, int], next_b: int, end: int) -> int:
        """Send a task for every free slot, in batch order; returns the next batch to send."""
        epoch = self.sampler.epoch
        while free and next_b < end:
            slot = free.pop()
            self._tasks.put((slot, epoch, next_b, self.sampler.batch(next_b)))
            slot_of[next_b] = slot
            next_b += 1
        return next_b

    def _deliver(self, slot: int, free: list[int], err, ids, skipped):
        """The finished batch in ``slot``, lent or copied out; a worker's error raised here."""
        if err is not None:
            free.append(slot)
            kind, what = err
            raise CorruptRecordError.from_entry(what) if kind == "corrupt" else RuntimeError(what)
        self.ledger.add(skipped)
        # Hand the slot itself out while the consumer leaves enough slots for the
        # workers; it comes back once the consumer drops every view of it.
        if not self.pin_memory and len(self._held) < self.slots - self.num_workers:
            self._held.add(slot)
            return self._lend(slot, len(ids), ids)
        batch = self._copy_out(slot, len(ids), ids)
        free.append(slot)
        return batch

    def _wait_for_builds(self, outstanding: int) -> None:
        """Wait for batches still being built so no slot is written after we reuse it."""
        for _ in range(outstanding):
            if not self._procs:  # the pool is gone (a worker died): nothing to wait for
                break
            try:
                self._get_result()
            except (RuntimeError, TimeoutError):
                break

    def _read_ahead(self, start: int, end: int):
        """The read-ahead window over this epoch's listing (None when turned off)."""
        return read_ahead_for(
            self.split,
            self.sampler,
            start,
            end,
            self.read_ahead,
            self.read_ahead_bytes,
            spans=self._spans,
        )

    def _released(self) -> list[int]:
        """Lent slots whose every view the consumer has dropped."""
        back = [k for k in self._held if _use_count(self._slot_images[k]) <= self._slot_base[k]]
        self._held.difference_update(back)
        return back

    def _lend(self, slot: int, n: int, ids: np.ndarray) -> Batch:
        """A batch whose images are the shared slot itself: no copy."""
        _, labels = self._ring.views(slot)
        images = self._slot_images[slot][:n].permute(0, 3, 1, 2)
        lab = torch.from_numpy(labels[:n].copy())
        return Batch(images, lab, torch.from_numpy(np.array(ids, np.int64)))

    def _copy_out(self, slot: int, n: int, ids: np.ndarray) -> Batch:
        images, labels = self._ring.views(slot)
        s = self.cfg.image_size
        out = torch.empty((n, s, s, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        out.numpy()[...] = images[:n]
        lab = torch.from_numpy(labels[:n].copy())
        return Batch(out.permute(0, 3, 1, 2), lab, torch.from_numpy(np.array(ids, np.int64)))
