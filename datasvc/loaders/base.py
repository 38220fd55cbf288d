"""What every loader shares: the sampler, the cursor, and in-order iteration."""

from __future__ import annotations

import os
import time
import warnings

from datasvc.augment import TransformConfig
from datasvc.corrupt import CorruptLedger, OnCorrupt, check_on_corrupt
from datasvc.sampling import EpochSampler, require_batches


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def renamed(old: str, new: str, old_value, new_value, stacklevel: int = 3):
    """The value of an option renamed from ``old`` to ``new``: the old name still works for one
    release (0.2 drops it) with a ``DeprecationWarning``; giving both is an error."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"give {new}= only ({old}= is its deprecated name)")
    warnings.warn(
        f"{old}= is deprecated and will be removed in datasvc 0.2; use {new}=",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old_value


class Loader:
    """Iterates this rank's batches of the current epoch from the cursor on.

    Subclasses implement ``_batches(start)``, yielding ``Batch`` objects for batch indices
    ``start, start + 1, ...`` of the sampler's listing, in order. A finished epoch followed by
    a new iteration moves on to the next epoch, as does ``set_epoch``.
    """

    backend = "base"

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int = 64,
        image_size: int = 224,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool | None = None,
        transform=None,
        on_corrupt: OnCorrupt = "raise",
        max_corrupt: int | float | None = None,
    ):
        """The options every backend shares (backends take them as ``**common``): batch size
        per rank, output size, train or eval transform and sampling, rank and world size, seed,
        ``drop_last`` (default: train drops the remainder, eval keeps every sample),
        ``transform`` overrides (see ``TransformConfig.build``), and the corrupt-record policy
        (see ``datasvc.corrupt``): ``on_corrupt`` 'raise' or 'skip', ``max_corrupt`` records
        skipped per epoch before raising (an int count or a float fraction of this rank's
        epoch; default 0.1%)."""
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.cfg = TransformConfig.build(train, image_size, transform)
        self.seed = seed
        self.sampler = EpochSampler(
            num_samples,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=train,
            drop_last=train if drop_last is None else drop_last,
        )
        require_batches(self.sampler)
        self.data_wait: list[float] = []  # seconds the consumer waited for each batch
        self.ledger = CorruptLedger(self._epoch_samples(), max_corrupt)

    def _epoch_samples(self) -> int:
        """Samples this rank is listed for in one epoch (the base of ``max_corrupt``)."""
        s, n = self.sampler, len(self.sampler)
        if n == 0:
            return 0
        last_start = s.offset + ((n - 1) * s.world_size + s.rank) * s.batch_size
        return (n - 1) * s.batch_size + min(s.batch_size, s.num_samples - last_start)

    @property
    def skipped(self) -> list[dict]:
        """Records skipped as corrupt in the current epoch so far: ``{"id", "shard", "record",
        "reason"}`` each, in the order they were met."""
        self.ledger.start_epoch(self.sampler.epoch)
        return list(self.ledger.entries)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {
            "backend": self.backend,
            "sampler": self.sampler.state_dict(),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.ledger.start_epoch(self.sampler.epoch, list(state.get("skipped", [])))

    def __iter__(self):
        if self.sampler.batches_done >= len(self.sampler):
            self.sampler.set_epoch(self.sampler.epoch + 1)
        self.data_wait = []
        self.ledger.start_epoch(self.sampler.epoch)
        it = self._batches(self.sampler.batches_done)
        try:
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self.data_wait.append(time.perf_counter() - t)
                self.sampler.advance()
                yield batch
        finally:
            it.close()

    def _batches(self, start: int):
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
