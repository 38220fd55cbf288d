"""Shared fixtures: a tiny ImageNet-like tree with ImageNet's odd files, and packs of it."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converters.convert import ConvertConfig, convert
from datasvc.sample import write_sample

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _suite_tmpdir(tmp_path_factory):
    """The suite's TMPDIR is under pytest's base temp: what its processes leave there
    (torchrun's folders, a killed server's socket folder) goes with it when the run passes,
    instead of piling up in the machine's /tmp run after run."""
    own = tmp_path_factory.mktemp("TMPDIR")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(own)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield own
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


def _jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _img(rng, h, w, mode="RGB") -> Image.Image:
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3))
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


# name → (bytes, expected outcome): "kind" for converted, "reject:<reason prefix>"
def odd_files(rng) -> dict[str, tuple[bytes, str]]:
    good = _jpeg(np.asarray(_img(rng, 120, 160)))

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgba = _img(rng, 60, 80, "RGBA")
    i16 = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).convert("I;16")
    return {
        "odd_cmyk.JPEG": (save(_img(rng, 90, 120, "CMYK"), "JPEG", quality=90), "cmyk"),
        "odd_gray.JPEG": (save(_img(rng, 90, 120, "L"), "JPEG", quality=90), "grayscale"),
        "odd_png.JPEG": (save(_img(rng, 70, 90), "PNG"), "png"),
        "odd_gif.JPEG": (save(_img(rng, 50, 60, "P"), "GIF"), "gif"),
        "odd_bmp.JPEG": (save(_img(rng, 50, 60), "BMP"), "bmp"),
        "odd_webp.JPEG": (save(_img(rng, 50, 60), "WEBP"), "webp"),
        "odd_palette.png": (save(_img(rng, 40, 50, "P"), "PNG"), "png"),
        "odd_alpha.png": (save(rgba, "PNG"), "png"),
        "odd_16bit.png": (save(i16, "PNG"), "png"),
        "bad_truncated.JPEG": (good[: len(good) * 6 // 10], "reject:corrupt or truncated JPEG"),
        "bad_empty.JPEG": (b"", "reject:empty file"),
        "bad_text.JPEG": (b"<html>not an image</html>\n" * 20, "reject:not an image"),
        "bad_bomb.JPEG": (_jpeg(np.asarray(_img(rng, 1000, 1200))), "reject:decompression bomb"),
    }


# Pixel cap for the fixture trees: the 1200x1000 "bomb" exceeds it, every sample image fits.
TEST_MAX_PIXELS = 1_100_000


def make_tree(root: Path, classes=4, per_class=12, val_per_class=3, seed=0, oddities=True) -> Path:
    write_sample(root, classes=classes, per_class=per_class, val_per_class=val_per_class, seed=seed)
    if oddities:
        rng = np.random.default_rng(seed)
        cls = sorted(os.listdir(root / "train"))[1]
        for name, (data, _) in odd_files(rng).items():
            (root / "train" / cls / name).write_bytes(data)
        (root / "train" / cls / "README.txt").write_text("not a candidate\n")
        nested = root / "train" / cls / "nested"
        nested.mkdir()
        (nested / "deep.jpeg").write_bytes(_jpeg(np.asarray(_img(rng, 64, 64))))
    return root


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def clean_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("clean"), classes=4, per_class=16, oddities=False)


def _pack(tmp_path_factory, tree, fmt, **kw) -> Path:
    out = tmp_path_factory.mktemp(f"pack-{fmt}") / "pack"
    convert(tree, out, ConvertConfig(format=fmt, max_pixels=TEST_MAX_PIXELS, **kw), progress=False)
    return out


@pytest.fixture(scope="session")
def lmdb_pack(tmp_path_factory, tree) -> Path:
    return _pack(tmp_path_factory, tree, "lmdb", shards=3)


@pytest.fixture(scope="session")
def tfrecord_pack(tmp_path_factory, tree) -> Path:
    return _pack(tmp_path_factory, tree, "tfrecord", shards=3)


@pytest.fixture(scope="session")
def clean_pack(tmp_path_factory, clean_tree) -> Path:
    """A pack without oddities, for loader tests: 64 train and 12 val images in 4 classes."""
    return _pack(tmp_path_factory, clean_tree, "lmdb", shards=2)
