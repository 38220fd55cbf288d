"""``PackDataset``: a pack split as a map-style dataset, for users who bring their own
``DataLoader``, sampler and transforms. It mirrors ``torchvision.datasets.ImageFolder``."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch

from datasvc.packs import open_pack


def pil_rgb(data: bytes):
    """Encoded image bytes → an RGB ``PIL.Image`` (the default ``loader``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class PackDataset(torch.utils.data.Dataset):
    """One split of a pack, indexed like ``torchvision.datasets.ImageFolder``.

    Args:
        root: the pack's folder (the one holding ``manifest.json``).
        split: which split, e.g. ``"train"`` or ``"val"``.
        transform: applied to the decoded image (a ``PIL.Image``, RGB, by default).
        target_transform: applied to the class index.
        loader: encoded bytes → image; default ``pil_rgb``.

    Returns (``dataset[i]``):
        ``(image, target)``: the transformed image and the 0-based class index, as
        ``ImageFolder`` returns them. Index ``i`` is the sample id every loader and the sampler
        use for this split.

    Attributes: ``classes`` (sorted class names, index = label, as ImageFolder sorts them),
    ``class_to_idx``, and, read from every record on first use, ``samples`` (``(key, target)``
    per id, the key being the source file's path relative to its split folder), ``targets``
    and ``imgs`` (an alias of ``samples``). Worker processes each open their own read handles.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        loader: Callable[[bytes], Any] = pil_rgb,
    ):
        pack = open_pack(root)
        self.root = str(root)
        self.split = split
        self._records = pack.split(split)
        self.classes: list[str] = list(pack.classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int):
        s = self._records[index]
        image = self.loader(s.image)
        target = s.label
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    @cached_property
    def samples(self) -> list[tuple[str, int]]:
        """``(key, target)`` of every sample, in id order (reads every record once)."""
        return [(s.key, s.label) for s in (self._records[i] for i in range(len(self)))]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    @property
    def imgs(self) -> list[tuple[str, int]]:
        return self.samples

    def __repr__(self) -> str:
        return f"PackDataset({self.root!r}, split={self.split!r}, {len(self)} samples)"
