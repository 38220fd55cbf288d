"""Augmentation parameters as pure functions of ``(seed, epoch, sample id)``, so any worker,
process or server computes the same crop and flip for the same sample."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class TransformConfig:
    """The per-sample transform: train (RandomResizedCrop + flip) or eval (resize + center crop).

    ``eval_resize`` is the shorter side before the center crop; default
    ``round(image_size * 256 / 224)`` as in the reference ImageNet evaluation.
    """

    train: bool = True
    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_resize: int | None = None

    def __post_init__(self):
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be within 8..1024, got {self.image_size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"bad scale range {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad ratio range {self.ratio}")
        object.__setattr__(self, "scale", tuple(map(float, self.scale)))
        object.__setattr__(self, "ratio", tuple(map(float, self.ratio)))

    @property
    def resize_shorter(self) -> int:
        return self.eval_resize or int(round(self.image_size * 256 / 224))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformConfig:
        d = dict(d)
        for k in ("scale", "ratio"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class Crop(NamedTuple):
    """A crop box in source pixels (top, left, height, width) and whether to flip it."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF,
                                                     (epoch << 40) ^ sample_id]))  # fmt: skip


def random_resized_crop(rng: np.random.Generator, height: int, width: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:  # fmt: skip
    """torchvision's RandomResizedCrop.get_params, fallback included: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crop(cfg: TransformConfig, seed: int, epoch: int, sample_id: int,
               height: int, width: int) -> Crop:  # fmt: skip
    """The train crop and flip of one sample: a pure function of its arguments."""
    rng = sample_rng(seed, epoch, sample_id)
    top, left, h, w = random_resized_crop(rng, height, width, cfg.scale, cfg.ratio)
    flip = bool(rng.random() < cfg.hflip)
    return Crop(top, left, h, w, flip)


def eval_geometry(cfg: TransformConfig, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision ``Resize(shorter)`` + ``CenterCrop(size)``: (resized h, w, crop top, left)."""
    short = cfg.resize_shorter
    if height <= width:
        rh, rw = short, int(short * width / height)
    else:
        rh, rw = int(short * height / width), short
    s = cfg.image_size
    return rh, rw, int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
