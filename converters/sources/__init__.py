"""Sources: what SRC is → the class list and, per split, the candidates to pack and a reader of
their bytes. Every source gives the records the extracted ``SRC/<split>/<class>/...`` tree
would give: the same keys, labels and class list (torchvision's sorted class folders)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasvc.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(UserError):
    """SRC cannot be converted as it is; the message names the file or member and the fix."""


@dataclass(frozen=True, slots=True)  # slots: ImageNet's plan holds 1.28M of them
class Candidate:
    """A file to pack: its key (the path the extracted tree would give it, relative to the
    split folder), its 0-based label, and where its source finds the bytes (``loc``)."""

    path: str
    label: int
    loc: tuple = ()


@dataclass
class SplitListing:
    """One split's candidates in the extracted tree's order, and the reader of their bytes.

    ``ordered`` sources (parquet) can only be read in their own order: their shards follow
    it instead of train's seeded permutation. ``repeats`` are paths reached a second time
    (a symlink loop, a link to a folder or file walked already), each counted once.
    """

    name: str
    reader: SourceReader
    candidates: list[Candidate]
    ignored: list[str]
    repeats: list[str] = field(default_factory=list)
    ordered: bool = False


class SourceReader:
    """Reads candidates' bytes in a worker; picklable, opens its files lazily per process."""

    def iter_bytes(
        self, candidates: Iterable[Candidate]
    ) -> Iterator[tuple[Candidate, bytes | OSError]]:
        """Yield (candidate, its bytes) in the given order, or the ``OSError`` that reading it
        raised: one unreadable file is a rejection, not the end of its shard."""
        for cand in candidates:
            try:
                yield cand, self.read(cand)
            except OSError as e:
                yield cand, e

    def read(self, cand: Candidate) -> bytes:
        raise NotImplementedError


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def tree_order(key: str) -> tuple[str, str, str]:
    """Sort key giving the extracted tree's listing order: class folder, then sub-folder, then
    file name (a flat split sorts by file name)."""
    top = key.split("/", 1)[0] if "/" in key else ""
    folder, _, name = key.rpartition("/")
    return top, folder, name


def tree_key(split: str, name: str, class_name: str) -> str:
    """The key a record named ``name`` (no folder) gets in the extracted tree: train files sit
    in class folders, other splits are flat, as ImageNet ships val."""
    if "/" in name or split != "train":
        return name
    return f"{class_name}/{name}"


def read_class_file(path: str | os.PathLike) -> list[str]:
    """``--classes`` file: one class name per line, line i is label i (first word is used)."""
    path = Path(path)
    try:
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise SourceError(f"{path}: cannot read the class list ({e.strerror or e})") from None
    if not names:
        raise SourceError(f"{path}: the class list is empty")
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: the class list names a class twice")
    return names


@dataclass(frozen=True)
class SourceOptions:
    """What a source may need besides SRC: val labels, class names, parquet column names."""

    splits: tuple[str, ...] | None = None
    val_labels: str | None = None
    val_synsets: str | None = None
    classes: str | None = None  # --classes file
    image_column: str = "image"
    label_column: str = "label"
    key_column: str | None = None
    workers: int = 1  # processes that may list a source (the ILSVRC train tar's headers)


def detect_kind(src: Path) -> str:
    """``tree``, ``ilsvrc`` (the ILSVRC2012 tarballs), ``parquet`` or ``webdataset``."""
    from converters.sources import ilsvrc

    if not src.is_dir():
        raise SourceError(f"{src}: no such directory")
    names = {p.name for p in src.iterdir()}
    if names & set(ilsvrc.TARBALLS.values()):
        return "ilsvrc"
    from datasvc.packs.tfrecord import looks_like_tf_imagenet

    if looks_like_tf_imagenet(src):
        raise SourceError(
            f"{src} holds TensorFlow ImageNet TFRecords: they are a pack already; "
            f"run `datasvc adopt {src}` once and open them as they are"
        )
    if any(src.rglob("*.parquet")):
        return "parquet"
    if any(p.suffix == ".tar" for p in src.iterdir()) or any(src.glob("*/*.tar")):
        return "webdataset"
    return "tree"


def discover(src: str | os.PathLike, opts: SourceOptions) -> tuple[str, list[str], list]:
    """SRC → (source kind, class list, one ``SplitListing`` per split)."""
    src = Path(src)
    kind = detect_kind(src)
    if kind == "ilsvrc":
        from converters.sources.ilsvrc import discover_ilsvrc as find
    elif kind == "parquet":
        from converters.sources.parquet import discover_parquet as find
    elif kind == "webdataset":
        from converters.sources.webdataset import discover_webdataset as find
    else:
        from converters.sources.tree import discover_tree as find
    classes, listings = find(src, opts)
    return kind, classes, listings
