"""Source layouts → candidate lists: ``SRC/<split>/<class>/...`` trees, and ImageNet's flat
validation folder with its labels file. Candidates are what torchvision's ImageFolder takes."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Candidate:
    """A file to pack: its path relative to the split folder and its 0-based label."""

    path: str
    label: int


@dataclass
class SplitListing:
    name: str
    root: Path
    candidates: list[Candidate]
    ignored: list[str]


def find_classes(directory: str | os.PathLike) -> list[str]:
    """Class folder names sorted as torchvision's ``find_classes`` sorts them."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders under {directory}")
    return classes


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_imagefolder(root: Path, classes: list[str], name: str) -> SplitListing:
    """Walk ``root/<class>/**`` like ImageFolder (sorted, recursive, following links)."""
    index = {c: i for i, c in enumerate(classes)}
    candidates, ignored = [], []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        if cls not in index:
            raise ValueError(f"{root}/{cls}: class folder not in the class list (train's classes)")
        for dirpath, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for fname in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, fname), root)
                if is_image_name(fname):
                    candidates.append(Candidate(rel, index[cls]))
                else:
                    ignored.append(rel)
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_file():
            ignored.append(e.name)
    return SplitListing(name, root, candidates, ignored)


def read_val_labels(labels: Path, synsets: Path | None = None) -> dict[str, str]:
    """Flat-validation labels → {file stem: wnid}.

    Accepts Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012_ID per line, in file
    order) together with ``synsets``: the devkit's ID → wnid list, one wnid per line in ID order.
    """
    if labels.suffix == ".csv":
        out = {}
        with open(labels, newline="") as f:
            for row in csv.DictReader(f):
                out[row["ImageId"]] = row["PredictionString"].split()[0]
        return out
    if synsets is None:
        raise ValueError(f"{labels}: the devkit ground truth needs --val-synsets (ID → wnid list)")
    ids = [int(x) for x in labels.read_text().split()]
    wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    return {f"ILSVRC2012_val_{i + 1:08d}": wnids[j - 1] for i, j in enumerate(ids)}


def list_flat_val(
    root: Path, classes: list[str], labels: dict[str, str], name: str = "val"
) -> SplitListing:
    """ImageNet's flat ``val/`` folder plus a labels map; unlabeled images are an error."""
    index = {c: i for i, c in enumerate(classes)}
    candidates, ignored = [], []
    for fname in sorted(os.listdir(root)):
        if not is_image_name(fname):
            ignored.append(fname)
            continue
        stem = fname.rsplit(".", 1)[0]
        if stem not in labels:
            raise ValueError(f"{root / fname}: no label in the validation labels file")
        wnid = labels[stem]
        if wnid not in index:
            raise ValueError(f"{root / fname}: label {wnid} is not one of train's classes")
        candidates.append(Candidate(fname, index[wnid]))
    return SplitListing(name, root, candidates, ignored)


def discover(
    src: str | os.PathLike,
    splits: list[str] | None = None,
    val_labels: str | os.PathLike | None = None,
    val_synsets: str | os.PathLike | None = None,
) -> tuple[list[str], list[SplitListing]]:
    """Find the class list (train's folders) and each split's candidates under ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    present = sorted(p.name for p in src.iterdir() if p.is_dir())
    if splits is None:
        splits = [s for s in ("train", "val") if s in present] or present
    if "train" in present:
        classes = find_classes(src / "train")
    else:
        classes = find_classes(src / splits[0])
    listings = []
    for split in splits:
        root = src / split
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: split folder missing")
        has_class_dirs = any(e.is_dir() for e in os.scandir(root))
        if not has_class_dirs and val_labels is not None:
            labels = read_val_labels(Path(val_labels), Path(val_synsets) if val_synsets else None)
            listings.append(list_flat_val(root, classes, labels, split))
        elif not has_class_dirs:
            raise ValueError(
                f"{root}: flat folder of images; pass --val-labels (LOC_val_solution.csv or the "
                "devkit ground truth with --val-synsets)"
            )
        else:
            listings.append(list_imagefolder(root, classes, split))
    return classes, listings
