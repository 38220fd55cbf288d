"""``torch``: torchvision datasets and transforms (v2) with ``torch.utils.data.DataLoader`` and
PIL (pillow-simd when installed) — the plain baseline of the seed projects. Its train crops and
flips come from ``train_crop`` like every backend's, so they are a pure function of
``(seed, epoch, sample id)``; torchvision's operators apply them."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Literal, get_args

import torch

from datasvc.augment import TransformConfig, train_crop
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


#: How the torch backend decodes: PIL (or pillow-simd), or torchvision.io into a tensor.
Decode = Literal["pil", "tensor"]
DECODES: tuple[str, ...] = get_args(Decode)


def eval_transform(cfg: TransformConfig, decode: Decode = "pil"):
    """torchvision v2 ``Resize`` + ``CenterCrop`` of an eval ``TransformConfig``: PIL image
    (``decode='pil'``) or uint8 CHW tensor (``'tensor'``) → uint8 CHW tensor."""
    from torchvision.transforms import v2

    ops = [v2.Resize(cfg.resize_shorter, antialias=True), v2.CenterCrop(cfg.image_size)]
    return v2.Compose([*ops, v2.PILToTensor()] if decode == "pil" else ops)


class SampleTransform:
    """A sample's transform, torchvision's operators on the parameters every backend uses:
    in training, the crop box and flip of ``train_crop(cfg, seed, epoch, id)`` (a pure function,
    not the worker's RNG), then ``resized_crop`` (antialiased) and ``horizontal_flip``; in
    evaluation, ``eval_transform``. PIL image or uint8 CHW tensor → uint8 CHW tensor."""

    def __init__(self, cfg: TransformConfig, seed: int, decode: Decode = "pil"):
        # imported here, before the DataLoader forks: each worker importing it costs seconds
        from torchvision.transforms.v2 import functional  # noqa: F401

        self.cfg, self.seed, self.decode = cfg, seed, decode
        self._eval = None if cfg.train else eval_transform(cfg, decode)

    def __call__(self, img, epoch: int, sample_id: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if self._eval is not None:
            return self._eval(img)
        h, w = (img.height, img.width) if self.decode == "pil" else tuple(img.shape[-2:])
        c = train_crop(self.cfg, self.seed, epoch, sample_id, h, w)
        s = self.cfg.image_size
        out = F.resized_crop(img, c.top, c.left, c.height, c.width, [s, s], antialias=True)
        if c.flip:
            out = F.horizontal_flip(out)
        return F.pil_to_tensor(out) if self.decode == "pil" else out


def decode_tensor(data: bytes) -> torch.Tensor:
    """JPEG (or PNG) bytes → uint8 RGB CHW tensor, by torchvision.io (libjpeg-turbo)."""
    from torchvision.io import ImageReadMode, decode_image

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(raw, mode=ImageReadMode.RGB)


def _decode_pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class _EpochItems(torch.utils.data.Dataset):
    """What the DataLoader indexes: ``(epoch, id)`` → (uint8 CHW image, label, id). The epoch
    travels with each index, so persistent workers need no notice of ``set_epoch``."""

    def __init__(self, images, transform: SampleTransform):
        self.images = images  # id → (decoded image, label)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        """(image, label, id), or (None, entry, id) for a corrupt record: the consumer applies
        the policy, so the error keeps its type and fields across the worker boundary."""
        epoch, i = item
        try:
            img, label = self.images[i]
        except CorruptRecordError as e:
            return None, e.entry, i
        return self.transform(img, epoch, i), label, i


class _PackImages:
    """A pack split's samples, decoded: id → (image, label)."""

    def __init__(self, split, decode: Decode):
        self.split, self.decode = split, decode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        from PIL import Image

        s = read_sample(self.split, i)
        try:
            return (decode_tensor if self.decode == "tensor" else _decode_pil)(s.image), s.label
        except (OSError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
            raise corrupt_record(self.split, i, f"undecodable image ({s.key}): {e}") from None


class _FolderImages:
    """A raw ImageFolder tree through ``torchvision.datasets.ImageFolder``: id → (image, label)."""

    def __init__(self, root, decode: Decode):
        from torchvision.datasets import ImageFolder

        if decode == "tensor":  # tensor decode reads the file's bytes; PIL is ImageFolder's own
            self.ds = ImageFolder(root, loader=lambda path: decode_tensor(Path(path).read_bytes()))
        else:
            self.ds = ImageFolder(root)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            return self.ds[i]
        except (OSError, ValueError) as e:  # PIL's errors for a damaged file
            path = self.ds.samples[i][0]
            raise CorruptRecordError(i, path, 0, f"undecodable image: {e}") from None


def _collate(items, image_size: int):
    """Samples → (images, labels, ids, skipped entries); corrupt ones go to the entries. Images
    are stacked into channels-last memory (N×3×S×S view of N×S×S×3), as every backend hands
    them out."""
    good = [x for x in items if x[0] is not None]
    skipped = [x[1] for x in items if x[0] is None]
    if good:
        images = torch.stack([x[0].permute(1, 2, 0) for x in good]).permute(0, 3, 1, 2)
    else:
        images = torch.empty((0, image_size, image_size, 3), dtype=torch.uint8)
        images = images.permute(0, 3, 1, 2)
    labels = torch.tensor([x[1] for x in good], dtype=torch.int64)
    ids = torch.tensor([x[2] for x in good], dtype=torch.int64)
    return images, labels, ids, skipped


class _CursorBatches:
    """The batch sampler the DataLoader sees: the sampler's batches from its cursor on."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0

    def __iter__(self):
        epoch = self.sampler.epoch
        for b in range(self.start, len(self.sampler)):
            yield [(epoch, i) for i in self.sampler.batch(b).tolist()]

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
        decode: Decode = "pil",
        workers: int | None = None,
        **common,
    ):
        num_workers = renamed("workers", "num_workers", workers, num_workers)
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        self.decode = decode
        source = Path(source)
        if (source / MANIFEST_NAME).exists():
            images = _PackImages(open_pack(source).split(split), decode)
        else:
            root = source / split if (source / split).is_dir() else source
            images = _FolderImages(root, decode)
        super().__init__(len(images), **common)
        self.dataset = _EpochItems(images, SampleTransform(self.cfg, self.seed, decode))
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
