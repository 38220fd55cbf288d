"""EpochSampler: ``(seed, epoch, rank, world_size)`` → the sample ids of each batch, and a cursor
``(epoch, batches done)`` that is the whole state needed to resume."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from datasvc.errors import UsageError

log = logging.getLogger(__name__)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of an epoch: a permutation drawn from ``(seed, epoch)``, or identity."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


class ListingCache:
    """Epoch orders shared by every sampler of a process, least recently used first out.

    An order depends only on ``(num_samples, seed, epoch, shuffle)`` -- not on rank, world
    size or batch size -- so a server answering 64 ranks computes each epoch's listing once
    (an ImageNet listing costs ~50 ms and 10 MB). Orders are read-only: a rank's batch is a
    view. ``max_listings`` and ``max_bytes`` bound the memory held: a job reads the current
    epoch (and, around a boundary or an eval, one or two others), so a few listings suffice
    and older epochs do not pile up while a server runs for days. ``computed`` counts the
    listings made, so a test or a metric can tell a shared listing from a recomputed one.

    ``max_idle_s`` (a server's builders set it) also drops a listing no one has asked for in
    that long, so a long-running process holds the epochs in use now, not the last
    ``max_listings`` of them: its memory reaches its steady state after one epoch, not four.
    """

    def __init__(
        self,
        max_bytes: int = 64 << 20,
        max_listings: int = 4,
        max_idle_s: float | None = None,
        clock=time.monotonic,
    ):
        self.max_bytes = int(max_bytes)
        self.max_listings = int(max_listings)
        self.max_idle_s = max_idle_s
        self.clock = clock
        self.computed = 0
        self._orders: collections.OrderedDict = collections.OrderedDict()
        self._used: dict = {}  # key → when last asked for
        self._bytes = 0
        # Held while computing, so two thread builders asking at once compute one listing.
        self._lock = threading.Lock()

    def order(self, num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
        key = (int(num_samples), int(seed), int(epoch), bool(shuffle))
        with self._lock:
            now = self.clock()
            self._used[key] = now
            order = self._orders.get(key)
            if order is not None:
                self._orders.move_to_end(key)
                self._drop_idle(now)
                return order
            order = epoch_order(*key)
            order.setflags(write=False)
            self.computed += 1
            self._orders[key] = order
            self._bytes += order.nbytes
            # Keep at least the newest listing even when it alone exceeds the bound.
            while len(self._orders) > 1 and (
                self._bytes > self.max_bytes or len(self._orders) > self.max_listings
            ):
                self._drop_oldest()
            self._drop_idle(now)
            return order

    def _drop_oldest(self) -> None:
        old_key, old = self._orders.popitem(last=False)
        self._used.pop(old_key, None)
        self._bytes -= old.nbytes

    def _drop_idle(self, now: float) -> None:
        """Least recently used first: drop while the oldest is idle past ``max_idle_s``."""
        if self.max_idle_s is None:
            return
        while len(self._orders) > 1:
            oldest = next(iter(self._orders))
            if now - self._used[oldest] <= self.max_idle_s:
                return
            self._drop_oldest()

    def __len__(self) -> int:
        return len(self._orders)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._orders.clear()
            self._used.clear()
            self._bytes = 0


#: The process's listings; every ``EpochSampler`` draws from it unless given another.
LISTINGS = ListingCache()


class EpochSampler:
    """Splits each epoch's order into per-rank batches.

    Global batches of ``batch_size`` are dealt round-robin to ranks: rank ``r`` of ``w`` takes
    global batches ``r, r + w, r + 2w, ...`` of the epoch order. Train (``drop_last=True``):
    only whole rounds of ``w`` full batches are used, so every rank gets the same number of
    full batches; the remainder is dropped and nothing is duplicated. Eval
    (``drop_last=False``): every sample once across ranks, no padding, the last batches may be
    smaller and some ranks may get one batch fewer.

    The cursor counts this rank's batches delivered. Resuming with another world size starts
    from the same global position (``offset + batches_done * world * batch_size``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        listings: ListingCache | None = None,
    ):
        if batch_size < 1:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0  # global sample position where this epoch's listing starts
        self.batches_done = 0
        self.listings = LISTINGS if listings is None else listings
        self._order = None
        self._order_epoch = None

    # --- the listing ------------------------------------------------------------------------

    def order(self) -> np.ndarray:
        """This epoch's global order (read-only, shared with every sampler of the process)."""
        if self._order_epoch != self.epoch:
            self._order = self.listings.order(self.num_samples, self.seed, self.epoch, self.shuffle)
            self._order_epoch = self.epoch
        return self._order

    def _global_batches(self) -> int:
        rest = max(0, self.num_samples - self.offset)
        if self.drop_last:
            return (rest // (self.batch_size * self.world_size)) * self.world_size
        return -(-rest // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch listing (done ones included)."""
        g = self._global_batches()
        return max(0, -(-(g - self.rank) // self.world_size))

    def batch(self, b: int) -> np.ndarray:
        """Sample ids of this rank's batch ``b`` of the current epoch listing."""
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range ({len(self)} batches)")
        g = b * self.world_size + self.rank
        start = self.offset + g * self.batch_size
        return self.order()[start : min(start + self.batch_size, self.num_samples)]

    def remaining(self) -> range:
        return range(self.batches_done, len(self))

    # --- the cursor -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (unless it is the one being resumed)."""
        if epoch != self.epoch or self.batches_done >= len(self):
            self.epoch = int(epoch)
            self.offset = 0
            self.batches_done = 0

    def advance(self, n: int = 1) -> None:
        self.batches_done += n

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "offset": self.offset,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: same world and batch size → exactly the remaining batches; otherwise the
        listing restarts at the same global position."""
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"cursor is for {state['num_samples']} samples, this split has {self.num_samples}"
            )
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"cursor was made with seed {state['seed']}, loader has {self.seed}")
        self.epoch = int(state["epoch"])
        if state["world_size"] == self.world_size and state["batch_size"] == self.batch_size:
            self.offset = int(state.get("offset", 0))
            self.batches_done = int(state["batches_done"])
        else:
            done = state["batches_done"] * state["world_size"] * state["batch_size"]
            self.offset = min(self.num_samples, int(state.get("offset", 0)) + done)
            self.batches_done = 0


def require_batches(sampler: EpochSampler) -> None:
    """Refuse a loader whose epochs would deliver no batch: an empty split, or (dropping the
    last partial round) fewer samples than one full batch on every rank."""
    n, b, w = sampler.num_samples, sampler.batch_size, sampler.world_size
    if n == 0:
        raise UsageError("the split has no samples, so an epoch would have no batch")
    if sampler.drop_last and n < b * w:
        ranks = f" on each of {w} ranks" if w > 1 else ""
        raise UsageError(
            f"an epoch of {n} samples has no full batch of {b}{ranks}, so it would deliver "
            "no batch",
            f"use batch_size <= {max(1, n // w)}, or drop_last=False",
        )
