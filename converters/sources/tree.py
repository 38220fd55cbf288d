"""The extracted tree: ``SRC/<split>/<class>/...`` folders (ImageFolder per split), and
ImageNet's flat validation folder with its labels file."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from converters.sources import (
    Candidate,
    CandidateTable,
    SourceError,
    SourceOptions,
    SourceReader,
    SplitListing,
    is_image_name,
)

LAYOUT = "SRC/<split>/<class>/<image> (e.g. SRC/train/n01440764/n01440764_10026.JPEG)"


@dataclass(frozen=True)
class TreeReader(SourceReader):
    """Reads candidates as files under the split folder."""

    root: str

    def read(self, cand: Candidate) -> bytes:
        with open(os.path.join(self.root, cand.path), "rb") as f:
            return f.read()


def find_classes(directory: str | os.PathLike) -> list[str]:
    """Class folder names sorted as torchvision's ``find_classes`` sorts them."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise SourceError(f"{directory}: no class folders; convert expects {LAYOUT}")
    return classes


@dataclass
class _Walk:
    """What walking one split saw: each folder and file once, by (device, inode). The inodes
    are kept per device as plain ints: while a tree is listed, the files' set is the one thing
    as large as the split, and a (device, inode) tuple each took about twice the room."""

    folders: dict[int, set[int]] = field(default_factory=dict)
    files: dict[int, set[int]] = field(default_factory=dict)
    repeats: list[str] = field(default_factory=list)

    def first_visit(self, path: str, seen: dict, rel: str) -> bool:
        st = os.stat(path)
        return self.first_seen((st.st_dev, st.st_ino), seen, rel)

    def first_seen(self, ident: tuple[int, int], seen: dict, rel: str) -> bool:
        dev, ino = ident
        inodes = seen.setdefault(dev, set())
        if ino in inodes:
            self.repeats.append(rel)
            return False
        inodes.add(ino)
        return True


def _walk_class(
    root: Path, cls: str, label: int, walk: _Walk, candidates: CandidateTable.Builder, ignored
) -> None:
    """ImageFolder's recursive, link-following walk of one class folder, where a folder or
    file reached a second time (a symlink loop, a link to something walked already) is
    skipped and recorded instead of being walked again."""
    entries = []
    for dirpath, dirnames, files in os.walk(root / cls, followlinks=True):
        dirnames[:] = [
            d
            for d in sorted(dirnames)
            if walk.first_visit(
                os.path.join(dirpath, d),
                walk.folders,
                os.path.relpath(os.path.join(dirpath, d), root) + "/",
            )
        ]
        entries.append((dirpath, files))
    for dirpath, files in sorted(entries):
        folder = os.path.relpath(dirpath, root)  # once per folder: relpath costs two abspaths
        for fname in sorted(files):
            path = os.path.join(dirpath, fname)
            rel = f"{folder}/{fname}"
            if not is_image_name(fname):
                ignored.append(rel)
                continue
            try:
                st = os.stat(path)  # follows links, as ImageFolder does
            except FileNotFoundError:
                ignored.append(rel)  # a dangling link
                continue
            if walk.first_seen((st.st_dev, st.st_ino), walk.files, rel):
                candidates.append(rel, label)


def list_imagefolder(root: Path, classes: list[str], name: str) -> SplitListing:
    """Walk ``root/<class>/**`` like ImageFolder (sorted, recursive, following links), each
    folder and file once."""
    index = {c: i for i, c in enumerate(classes)}
    candidates, ignored = CandidateTable.Builder(loc_width=0), []
    walk = _Walk()
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    walk.first_visit(str(root), walk.folders, "./")  # a link up to the split is a repeat
    for cls in class_dirs:
        if cls not in index:
            raise SourceError(f"{root}/{cls}: class folder not in the class list (train's classes)")
        walk.first_visit(str(root / cls), walk.folders, cls + "/")  # a link to it is a repeat
    for cls in class_dirs:
        _walk_class(root, cls, index[cls], walk, candidates, ignored)
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_file():
            ignored.append(e.name)
    return SplitListing(name, TreeReader(str(root)), candidates.build(), ignored, walk.repeats)


def parse_val_labels(text: str, where: str, synsets: list[str] | None = None) -> dict[str, str]:
    """Flat-validation labels → {file stem: wnid}.

    Accepts Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012_ID per line, in file
    order) together with ``synsets``: the devkit's ID → wnid list, in ID order.
    """
    if text.startswith("ImageId"):
        return {
            row["ImageId"]: row["PredictionString"].split()[0]
            for row in csv.DictReader(text.splitlines())
        }
    if synsets is None:
        raise SourceError(f"{where}: the devkit ground truth needs --val-synsets (ID → wnid list)")
    try:
        ids = [int(x) for x in text.split()]
        return {f"ILSVRC2012_val_{i + 1:08d}": synsets[j - 1] for i, j in enumerate(ids)}
    except (ValueError, IndexError):
        raise SourceError(
            f"{where}: not a ground-truth file (1-based class IDs, one per line) "
            f"for a list of {len(synsets)} synsets"
        ) from None


def read_val_labels(labels: Path, synsets: Path | None = None) -> dict[str, str]:
    """``--val-labels`` (and ``--val-synsets``: one wnid per line in ID order) → labels map."""
    try:
        text = labels.read_text()
        wnids = None
        if synsets is not None:
            wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise SourceError(f"{e.filename}: cannot read the validation labels ({e.strerror})") from e
    return parse_val_labels(text, str(labels), wnids)


def check_val_label(where: str, stem: str, labels: dict[str, str], index: dict) -> int:
    """The 0-based label of a flat-val file named ``stem``; unlabeled files are an error."""
    if stem not in labels:
        raise SourceError(f"{where}: no label in the validation labels file")
    wnid = labels[stem]
    if wnid not in index:
        raise SourceError(f"{where}: label {wnid} is not one of train's classes")
    return index[wnid]


def list_flat_val(
    root: Path, classes: list[str], labels: dict[str, str], name: str = "val"
) -> SplitListing:
    """ImageNet's flat ``val/`` folder plus a labels map; unlabeled images are an error."""
    index = {c: i for i, c in enumerate(classes)}
    candidates, ignored = CandidateTable.Builder(loc_width=0), []
    for fname in sorted(os.listdir(root)):
        if not is_image_name(fname):
            ignored.append(fname)
            continue
        label = check_val_label(str(root / fname), fname.rsplit(".", 1)[0], labels, index)
        candidates.append(fname, label)
    return SplitListing(name, TreeReader(str(root)), candidates.build(), ignored)


def _has_images(folder: Path) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in os.scandir(folder))


def _check_layout(src: Path, present: list[str]) -> None:
    """One-line errors for the layouts convert does not take: an empty or flat folder, and a
    plain ImageFolder (class folders at the top)."""
    if not present:
        what = "a flat folder of images" if _has_images(src) else "an empty folder"
        raise SourceError(f"{src}: {what}, no split folders; convert expects {LAYOUT}")
    if "train" not in present and "val" not in present:
        if any(_has_images(src / p) for p in present):
            raise SourceError(
                f"{src}: class folders at the top level (a plain ImageFolder); convert expects "
                f"{LAYOUT}: move the class folders into {src}/train (or pass the parent folder)"
            )


def discover_tree(src: Path, opts: SourceOptions) -> tuple[list[str], list[SplitListing]]:
    """Find the class list (train's folders) and each split's candidates under ``src``."""
    present = sorted(p.name for p in src.iterdir() if p.is_dir())
    splits = list(opts.splits) if opts.splits else None
    if splits is None:
        _check_layout(src, present)
        splits = [s for s in ("train", "val") if s in present] or present
    for split in splits:
        if not (src / split).is_dir():
            raise SourceError(f"{src / split}: split folder missing; convert expects {LAYOUT}")
    classes = find_classes(src / ("train" if "train" in present else splits[0]))
    listings = []
    for split in splits:
        root = src / split
        has_class_dirs = any(e.is_dir() for e in os.scandir(root))
        if not has_class_dirs and opts.val_labels is not None:
            synsets = Path(opts.val_synsets) if opts.val_synsets else None
            labels = read_val_labels(Path(opts.val_labels), synsets)
            listings.append(list_flat_val(root, classes, labels, split))
        elif not has_class_dirs:
            raise SourceError(
                f"{root}: flat folder of images; pass --val-labels (LOC_val_solution.csv or the "
                "devkit ground truth with --val-synsets)"
            )
        else:
            listings.append(list_imagefolder(root, classes, split))
    return classes, listings
