"""EpochSampler: ``(seed, epoch, rank, world_size)`` → the sample ids of each batch, and a cursor
``(epoch, batches done)`` that is the whole state needed to resume."""

from __future__ import annotations

import numpy as np


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The global order of an epoch: a permutation drawn from ``(seed, epoch)``, or identity."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


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
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
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
        self._order = None
        self._order_epoch = None

    # --- the listing ------------------------------------------------------------------------

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
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
