"""The one place that wires loaders to the trainer: train/val loaders from a ``DataConfig``, and
the device stage that turns uint8 batches into normalized (and mixed) float batches.

uint8 stays uint8 until the device: batches are copied from pinned memory with non-blocking
copies (on CUDA a side stream prepares the next batch while the current one trains), then
normalized, and in training mixed, on the device.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from datasvc.loaders import LOADERS, create_loader
from trainer.config import DataConfig, require_data_source
from trainer.sources import pack_classes  # noqa: F401 - the engine takes it from here


def _accepts(backend: str, option: str) -> bool:
    """Whether the backend's factory names ``option`` (so trainer defaults go only where valid).
    Backends take their shared options as ``**common`` and name their own, so a catch-all
    ``**`` does not count as accepting."""
    try:
        params = inspect.signature(LOADERS.get(backend)).parameters
    except (TypeError, ValueError):
        return False
    return option in params


def _options(cfg: DataConfig, device: torch.device) -> dict:
    """Backend options: the config's, plus pinned memory on CUDA and this rank's GPU for
    backends that decode there (only where the backend takes them and the config did not)."""
    opts = dict(cfg.options)
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    if "pin_memory" not in opts and pin and _accepts(cfg.backend, "pin_memory"):
        opts["pin_memory"] = True
    if "device_id" not in opts and device.type == "cuda" and _accepts(cfg.backend, "device_id"):
        opts["device_id"] = device.index if device.index is not None else 0
    return opts


def _transform(cfg: DataConfig, train: bool) -> dict | None:
    """The train crop's scale and flip, or the eval resize, from the config (every backend
    honours them)."""
    if not train:
        return {"eval_resize": cfg.eval_resize} if cfg.eval_resize else None
    return {"scale": tuple(cfg.crop_scale), "hflip": cfg.hflip}


def build_loader(
    cfg: DataConfig, *, train: bool, rank: int, world_size: int, seed: int, device: torch.device
):
    """The train (shuffled, full batches only) or val (every sample once over ranks) loader."""
    require_data_source(cfg)
    loader = create_loader(
        cfg.backend,
        cfg.source,
        split=cfg.train_split if train else cfg.val_split,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        image_size=cfg.image_size if train else cfg.eval_image_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=cfg.num_workers,
        transform=_transform(cfg, train),
        on_corrupt=cfg.on_corrupt,
        max_corrupt=cfg.max_corrupt,
        **_options(cfg, device),
    )
    return loader


def gather_skipped(loader, world_size: int) -> list[dict]:
    """The records every rank's loader skipped as corrupt this epoch, sorted by id (a
    collective: every rank calls it)."""
    mine = list(loader.skipped)
    if world_size > 1:
        import torch.distributed as dist

        every: list = [None] * world_size
        dist.all_gather_object(every, mine)
        mine = [e for rank in every for e in rank]
    return sorted(mine, key=lambda e: e["id"])


def describe_skipped(entries: list[dict], limit: int = 10) -> str:
    """'2 skipped as corrupt: 5 (train-00000-of-00002.lmdb record 5), ...' for a log line."""
    named = ", ".join(f"{e['id']} ({e['shard']} record {e['record']})" for e in entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"{len(entries)} skipped as corrupt: {named}{more}"


class DeviceBatch(NamedTuple):
    """A batch on the device: ``images`` float N×3×S×S normalized, ``labels`` int64 N (or soft
    targets N×K after mixing), ``ids`` int64 N on the host, and ``cursor``: the loader's state
    just after this batch (what a checkpoint taken once it has trained must hold, even when
    later batches were already fetched ahead)."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    cursor: dict


class DeviceLoader:
    """Iterates a loader's uint8 batches as normalized float batches on ``device``.

    On CUDA the copy, normalization and mixing of batch ``i + 1`` run on a side stream while
    batch ``i`` trains; elsewhere each batch is converted when asked for. ``channels_last`` keeps
    images in NHWC memory, which convolutions prefer. ``augment`` (train only) is a
    ``trainer.augment.DeviceAugment``, applied to the 0..255 levels before normalization and
    keyed by (epoch, sample id); ``mixer`` (train only) is a ``recipe.BatchMixer``, keyed by
    (epoch, batch index, rank), after it. Both make a resumed run augment alike.
    """

    def __init__(
        self,
        loader,
        device: torch.device,
        mean,
        std,
        *,
        channels_last: bool = True,
        mixer=None,
        augment=None,
        rank: int = 0,
    ):
        self.loader = loader
        self.device = device
        self.channels_last = channels_last
        self.mixer = mixer if mixer is not None and mixer.active else None
        self.augment = augment if augment is not None and augment.active else None
        self.rank = rank
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)

    def _convert(self, batch, epoch: int, index: int) -> DeviceBatch:
        cursor = self.loader.state_dict()  # called right after the loader yielded ``batch``
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=fmt).float()
        if self.augment is not None:
            images = self.augment(images, batch.ids, epoch).contiguous(memory_format=fmt)
        images.sub_(self.mean).mul_(self.inv_std)
        if self.mixer is not None:
            images, labels = self.mixer(images, labels, epoch=epoch, step=index, rank=self.rank)
        return DeviceBatch(images, labels, batch.ids, cursor)

    def batches(self, epoch: int, start: int = 0):
        """Yield the device batches of the loader's current pass; ``start`` is the index of the
        first one within the epoch (the loader's cursor), which keys the mixing."""
        it = iter(self.loader)
        if self.stream is None:
            for i, batch in enumerate(it, start):
                yield self._convert(batch, epoch, i)
            return
        index = start
        nxt = self._prefetch(it, epoch, index)
        while nxt is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            cur = nxt
            for t in (cur.images, cur.labels):
                t.record_stream(torch.cuda.current_stream(self.device))
            index += 1
            nxt = self._prefetch(it, epoch, index)
            yield cur

    def _prefetch(self, it, epoch: int, index: int) -> DeviceBatch | None:
        try:
            batch = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(self.stream):
            return self._convert(batch, epoch, index)
