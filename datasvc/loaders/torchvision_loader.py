"""``torch``: torchvision datasets and transforms (v2) with ``torch.utils.data.DataLoader`` and
PIL (pillow-simd when installed) — the plain baseline of the seed projects."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import torch

from datasvc.augment import TransformConfig
from datasvc.batch import Batch
from datasvc.corrupt import CorruptRecordError, corrupt_record, read_sample
from datasvc.loaders import register_loader
from datasvc.loaders.base import Loader, default_workers, renamed
from datasvc.packs import MANIFEST_NAME, open_pack


def pil_info() -> str:
    """Which PIL is installed: 'pillow-simd X' or 'pillow X'."""
    from importlib import metadata

    import PIL

    for dist in ("pillow-simd", "Pillow-SIMD"):
        try:
            return f"pillow-simd {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    return f"pillow {PIL.__version__}" + (" (SIMD build)" if ".post" in PIL.__version__ else "")


DECODES = ("pil", "tensor")


def build_transform(cfg: TransformConfig, decode: str = "pil"):
    """The torchvision v2 pipeline of a ``TransformConfig``: PIL image (``decode='pil'``) or
    uint8 CHW tensor (``'tensor'``) → uint8 CHW tensor."""
    from torchvision.transforms import v2

    if cfg.train:
        ops = [
            v2.RandomResizedCrop(cfg.image_size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
            v2.RandomHorizontalFlip(cfg.hflip),
        ]
    else:
        ops = [v2.Resize(cfg.resize_shorter, antialias=True), v2.CenterCrop(cfg.image_size)]
    return v2.Compose([*ops, v2.PILToTensor()] if decode == "pil" else ops)


def decode_tensor(data: bytes) -> torch.Tensor:
    """JPEG (or PNG) bytes → uint8 RGB CHW tensor, by torchvision.io (libjpeg-turbo)."""
    from torchvision.io import ImageReadMode, decode_image

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(raw, mode=ImageReadMode.RGB)


class PackDataset(torch.utils.data.Dataset):
    """A pack split as a torchvision-style dataset: PIL or tensor decode, v2 transforms,
    uint8 CHW."""

    def __init__(self, split, transform, decode: str = "pil"):
        self.split = split
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        """(image, label, id), or (None, entry, id) for a corrupt record: the consumer applies
        the policy, so the error keeps its type and fields across the worker boundary."""
        from PIL import Image

        try:
            s = read_sample(self.split, i)
            try:
                if self.decode == "tensor":
                    image = decode_tensor(s.image)
                else:
                    image = Image.open(io.BytesIO(s.image)).convert("RGB")
            except (OSError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
                raise corrupt_record(self.split, i, f"undecodable image ({s.key}): {e}") from None
        except CorruptRecordError as e:
            return None, e.entry, i
        return self.transform(image), s.label, i


class FolderDataset(torch.utils.data.Dataset):
    """A raw ImageFolder tree through ``torchvision.datasets.ImageFolder``."""

    def __init__(self, root, transform, decode: str = "pil"):
        from torchvision.datasets import ImageFolder

        # tensor decode reads the file's bytes; PIL decode is ImageFolder's own loader
        loader = (
            (lambda path: decode_tensor(Path(path).read_bytes())) if decode == "tensor" else None
        )
        self.ds = ImageFolder(root, loader=loader) if loader else ImageFolder(root)

        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            img, label = self.ds[i]
        except (OSError, ValueError) as e:  # PIL's errors for a damaged file
            path = self.ds.samples[i][0]
            return None, CorruptRecordError(i, path, 0, f"undecodable image: {e}").entry, i
        return self.transform(img), label, i


def _collate(items, image_size: int):
    """Samples → (images, labels, ids, skipped entries); corrupt ones go to the entries."""
    good = [x for x in items if x[0] is not None]
    skipped = [x[1] for x in items if x[0] is None]
    if good:
        images = torch.stack([x[0] for x in good])
    else:
        images = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.tensor([x[1] for x in good], dtype=torch.int64)
    ids = torch.tensor([x[2] for x in good], dtype=torch.int64)
    return images, labels, ids, skipped


class _CursorBatches:
    """The batch sampler the DataLoader sees: the sampler's batches from its cursor on."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        for b in range(self.start, len(self.sampler)):
            yield self.sampler.batch(b).tolist()

    def __len__(self) -> int:
        return len(self.sampler) - self.start


@register_loader("torch")
class TorchLoader(Loader):
    """torchvision + DataLoader with ``num_workers`` processes (persistent across epochs);
    ``prefetch_factor`` and ``pin_memory`` are the DataLoader's; ``decode`` is 'pil' (PIL or
    pillow-simd) or 'tensor' (``torchvision.io.decode_image``: libjpeg-turbo into a tensor, and
    the v2 transforms on tensors). ``workers`` is the deprecated name of ``num_workers``."""

    backend = "torch"

    def __init__(
        self,
        source,
        *,
        split="train",
        num_workers: int | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        decode: str = "pil",
        workers: int | None = None,
        **common,
    ):
        num_workers = renamed("workers", "num_workers", workers, num_workers)
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.decode = decode
        source = Path(source)
        if (source / MANIFEST_NAME).exists():
            self.dataset = PackDataset(open_pack(source).split(split), None, decode)
        else:
            root = source / split if (source / split).is_dir() else source
            self.dataset = FolderDataset(root, None, decode)
        super().__init__(len(self.dataset), **common)
        self.dataset.transform = build_transform(self.cfg, decode)
        self.num_workers = default_workers() if num_workers is None else num_workers
        self._batch_sampler = _CursorBatches(self.sampler)
        kw = {}
        if self.num_workers > 0:
            kw = {
                "persistent_workers": True,
                "prefetch_factor": prefetch_factor or 2,
                "multiprocessing_context": "fork",
            }
        self._dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._batch_sampler,
            num_workers=self.num_workers,
            collate_fn=functools.partial(_collate, image_size=self.cfg.image_size),
            pin_memory=pin_memory,
            **kw,
        )

    def _batches(self, start: int):
        self._batch_sampler.start = start
        for images, labels, ids, skipped in self._dl:
            if skipped and self.on_corrupt == "raise":
                raise CorruptRecordError.from_entry(skipped[0])
            self.ledger.add(skipped)
            yield Batch(images, labels, ids)

    def worker_pids(self) -> list[int]:
        it = getattr(self._dl, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])] if it is not None else []

    def close(self) -> None:
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl = None


__all__ = ["TorchLoader", "pil_info"]
