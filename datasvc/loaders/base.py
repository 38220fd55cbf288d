"""What every loader shares: the sampler, the cursor, and in-order iteration."""

from __future__ import annotations

import os
import time
import warnings

from datasvc.augment import TransformConfig
from datasvc.sampling import EpochSampler


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
    ):
        """The options every backend shares (backends take them as ``**common``): batch size
        per rank, output size, train or eval transform and sampling, rank and world size, seed,
        ``drop_last`` (default: train drops the remainder, eval keeps every sample) and
        ``transform`` overrides (see ``TransformConfig.build``)."""
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
        self.data_wait: list[float] = []  # seconds the consumer waited for each batch

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
        return {"backend": self.backend, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def __iter__(self):
        if self.sampler.batches_done >= len(self.sampler):
            self.sampler.set_epoch(self.sampler.epoch + 1)
        self.data_wait = []
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
