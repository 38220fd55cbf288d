"""The built-in sample: a small ImageNet-like ``ImageFolder`` tree of real photographic content
(photos shipped inside scikit-image), deterministic per seed, with ImageNet's oddities."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from datasvc.errors import UsageError

# Photos that ship inside scikit-image (no download); grayscale ones are expanded to RGB.
_PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "camera.png",
    "moon.png",
    "coins.png",
    "page.png",
    "cell.png",
]

# (width, height) of ImageNet-like frames: mostly 500 on the long side, some large.
_SIZES = [
    (500, 375),
    (375, 500),
    (500, 333),
    (333, 500),
    (500, 400),
    (400, 300),
    (640, 480),
    (500, 500),
    (1024, 768),
    (1280, 853),
    (300, 225),
]
_SIZE_P = np.array([30, 12, 12, 5, 8, 5, 6, 6, 6, 4, 6], float)


def _load_photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise UsageError(
            "datasvc sample cuts its images from the photos scikit-image ships, and "
            "scikit-image is not installed",
            "pip install 'datasvc[sample]'",
        ) from None

    root = Path(skimage.data.__file__).parent
    photos = []
    for name in _PHOTOS:
        p = root / name
        if not p.exists():
            continue
        img = Image.open(p)
        img = img.convert("RGB")
        photos.append(np.asarray(img))
    if len(photos) < 4:
        raise RuntimeError(f"scikit-image ships too few photos under {root}")
    return photos


MAX_CLASSES = 10_000  # val file names hold the class number in four digits


def check_sample_request(out: Path, classes: int, per_class: int, val_per_class: int) -> None:
    """Refuse counts that make an empty or misnamed tree, and an output that holds files
    already (a second sample written over a first would mix the two)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise UsageError(f"--classes must be in 1..{MAX_CLASSES}, got {classes}")
    if per_class < 1 or val_per_class < 1:
        raise UsageError(
            f"--per-class and --val-per-class must be at least 1, got {per_class} and "
            f"{val_per_class}"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file", "give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out} already holds files", "give a new or empty folder")


def _wnid(k: int) -> str:
    return f"n{1440764 + 7919 * k:08d}"


def _render(rng: np.random.Generator, photo: np.ndarray, tint: np.ndarray) -> Image.Image:
    """A random crop of a photo, tinted per class, resized to an ImageNet-like frame."""
    h, w = photo.shape[:2]
    size = _SIZES[rng.choice(len(_SIZES), p=_SIZE_P / _SIZE_P.sum())]
    aspect = size[0] / size[1]
    cw = int(rng.uniform(0.5, 1.0) * min(w, h * aspect))
    ch = max(8, int(cw / aspect))
    cw = max(8, min(cw, w))
    ch = min(ch, h)
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = photo[y : y + ch, x : x + cw].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = np.clip(crop * tint[None, None, :] + rng.normal(0, 2, size=(1, 1, 3)), 0, 255)
    return Image.fromarray(crop.astype(np.uint8)).resize(size, Image.BILINEAR)


def write_sample(
    out: str | os.PathLike,
    classes: int = 10,
    per_class: int = 32,
    val_per_class: int | None = None,
    seed: int = 0,
) -> dict:
    """Write ``out/train/<wnid>/*.JPEG`` and ``out/val/<wnid>/*.JPEG``; returns counts.

    Quality 85-95, about 1 in 12 files progressive and 1 in 20 grayscale; train holds one CMYK
    JPEG and one PNG named ``.JPEG`` (ImageNet's own oddities).
    """
    out = Path(out)
    val_per_class = max(2, per_class // 4) if val_per_class is None else val_per_class
    check_sample_request(out, classes, per_class, val_per_class)
    photos = _load_photos()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "grayscale": 0, "progressive": 0, "cmyk": 0, "png": 0}
    for k in range(classes):
        wnid = _wnid(k)
        base = k % len(photos)
        tint = rng.uniform(0.75, 1.25, size=3).astype(np.float32)
        for split, n in (("train", per_class), ("val", val_per_class)):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[base] if rng.random() < 0.7 else photos[rng.integers(len(photos))]
                img = _render(rng, photo, tint)
                name = (
                    f"{wnid}_{i + 1}.JPEG"
                    if split == "train"
                    else f"ILSVRC_val_{k:04d}{i:04d}.JPEG"
                )
                buf = io.BytesIO()
                quality = int(rng.integers(85, 96))
                kind = "rgb"
                if split == "train" and k == 0 and i == 0:
                    img.convert("CMYK").save(buf, "JPEG", quality=quality)
                    kind = "cmyk"
                elif split == "train" and k == min(1, classes - 1) and i == 1:
                    img.save(buf, "PNG")
                    kind = "png"
                elif rng.random() < 0.05:
                    img.convert("L").save(buf, "JPEG", quality=quality)
                    kind = "grayscale"
                else:
                    progressive = rng.random() < 1 / 12
                    img.save(buf, "JPEG", quality=quality, progressive=progressive)
                    kind = "progressive" if progressive else "rgb"
                (folder / name).write_bytes(buf.getvalue())
                counts[split] += 1
                if kind != "rgb":
                    counts[kind] += 1
    return counts
