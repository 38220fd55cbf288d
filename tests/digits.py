"""Real data for training tests: scikit-learn's handwritten digits as a JPEG ImageFolder and a pack.

``load_digits()`` ships 1,797 8x8 grayscale digits (values 0..16) inside scikit-learn, so nothing is
downloaded. Each is upscaled to ``size`` px and saved as an RGB JPEG under
``root/{train,val}/<digit>/``; every ``val_every``-th sample (in the dataset's order) goes to val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: str | Path, size: int = 32, val_every: int = 5, quality: int = 95) -> dict:
    """Write the digits ImageFolder tree under ``root``; returns {"train": n, "val": n}."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    counts = {"train": 0, "val": 0}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % val_every == 0 else "train"
        folder = root / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        gray = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        # Bicubic upscaling gives smooth strokes, closer to photographs than blocky 4x4 pixels.
        pil = Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB")
        pil.save(folder / f"{i:05d}.jpg", "JPEG", quality=quality)
        counts[split] += 1
    return counts


def make_digits_pack(workdir: str | Path, size: int = 32, fmt: str = "lmdb") -> Path:
    """Render the digits tree under ``workdir/tree`` and convert it to ``workdir/pack``."""
    from converters.convert import ConvertConfig, convert

    workdir = Path(workdir)
    tree, pack = workdir / "tree", workdir / "pack"
    if not (pack / "manifest.json").exists():
        write_digits(tree, size=size)
        convert(tree, pack, ConvertConfig(format=fmt, shards=2, workers=1), progress=False)
    return pack


if __name__ == "__main__":  # python -m tests.digits OUT: make a pack by hand
    import sys

    print(make_digits_pack(sys.argv[1]))
