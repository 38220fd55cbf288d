"""Loader backends behind one contract: ``create_loader(backend, source, ...)``.

Every backend draws batches from the same ``EpochSampler`` and yields ``Batch(images, labels,
ids)``: uint8 N×3×S×S RGB, int64 labels, int64 sample ids; with ``len()``, ``set_epoch()``,
``state_dict()`` and ``load_state_dict()``. Options follow ``torch.utils.data.DataLoader``'s
names: ``num_workers``, ``prefetch_factor`` (batches in flight per worker), ``pin_memory``.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401 - every backend hands out torch tensors
except ImportError as e:
    raise ImportError(
        f"datasvc.loaders needs torch, which the base install leaves out: "
        f"pip install 'datasvc[torch]' ({e})"
    ) from None

from datasvc.corrupt import OnCorrupt
from datasvc.loaders.base import renamed
from datasvc.registry import Registry

LOADERS = Registry("loader backend")
register_loader = LOADERS.register


def list_loaders() -> list[str]:
    return LOADERS.names()


# Splits read for evaluation unless ``train=`` says otherwise: their samples must each be seen
# once, unshuffled, through the eval transform.
EVAL_SPLITS = frozenset({"val", "test"})


def create_loader(
    backend: str,
    source,
    *,
    split: str = "train",
    batch_size: int = 64,
    image_size: int = 224,
    train: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int | None = None,
    on_corrupt: OnCorrupt = "raise",
    max_corrupt: int | float | None = None,
    workers: int | None = None,
    **options,
):
    """Build a loader: ``backend`` one of ``list_loaders()``; ``source`` a pack path (or, for
    ``torch``, an ImageFolder tree; for ``remote``, endpoint(s)). ``num_workers`` are the
    processes or threads that build batches (default: one per usable core); extra ``options``
    go to the backend (e.g. ``pin_memory``, ``prefetch_factor``, ``decoder``, ``pack`` for
    ``remote``). ``train`` (train transform, shuffling, full batches only) defaults to True
    except for the splits named in ``EVAL_SPLITS``, which get the eval transform and every
    sample exactly once. ``on_corrupt`` is the corrupt-record policy, the same for every
    backend: 'raise' stops at the first damaged record, 'skip' leaves it out of its batch and
    reports it in ``loader.skipped``, up to ``max_corrupt`` records per epoch (an int count or a
    float fraction of the rank's epoch, default 0.1%; see ``datasvc.corrupt``). ``workers`` is
    the deprecated name of ``num_workers``."""
    num_workers = renamed("workers", "num_workers", workers, num_workers)
    if train is None:
        train = split not in EVAL_SPLITS
    return LOADERS.get(backend)(
        source,
        split=split,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        on_corrupt=on_corrupt,
        max_corrupt=max_corrupt,
        **options,
    )


# Register the built-in backends (each imports its heavy dependencies only when used).
from datasvc.loaders import custom as _custom  # noqa: E402,F401
from datasvc.loaders import dali as _dali  # noqa: E402,F401
from datasvc.loaders import torchvision_loader as _torch  # noqa: E402,F401

try:
    from datasvc.loaders import remote as _remote  # noqa: F401
except ImportError:  # the service is optional at this stage
    pass

from datasvc.loaders.dataset import PackDataset  # noqa: E402

__all__ = [
    "EVAL_SPLITS",
    "LOADERS",
    "PackDataset",
    "create_loader",
    "list_loaders",
    "register_loader",
]
