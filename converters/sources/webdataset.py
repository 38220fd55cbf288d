"""Webdataset shards: uncompressed tars of samples, each a group of members sharing a key
(``<key>.jpg`` + ``<key>.cls``: the image and its integer label), read in place by offset."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from converters.sources import (
    CandidateTable,
    SourceError,
    SourceOptions,
    SplitListing,
    is_image_name,
    read_class_file,
    tree_key,
)
from converters.sources.tarfiles import Member, TarMemberReader, members

_SPLIT = re.compile(r"(?:^|[-_.])(train|validation|val|test)(?=[-_.])")


def _split_of(path: Path, src: Path) -> str | None:
    for part in (path.name, *reversed(path.relative_to(src).parts[:-1])):
        m = _SPLIT.search(part + ".")
        if m:
            return "val" if m.group(1) == "validation" else m.group(1)
    return None


def _sample_key(name: str) -> tuple[str, str]:
    """Webdataset's rule: the key runs to the first dot of the file name, the rest is the
    extension (``a/b.seg.png`` → ``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _grouped(path: Path) -> Iterator[tuple[str, list[tuple[Member, str]]]]:
    """One tar's samples as webdataset groups them: runs of consecutive members sharing a key
    (a key seen again later starts another sample, as in webdataset's own reader), each member
    with its extension. Streamed: no grouping of the whole split is held, however many images
    it has."""
    key, group = None, []
    for m in members(str(path)):
        k, ext = _sample_key(m.name)
        if k != key and group:
            yield key, group
            group = []
        key = k
        group.append((m, ext))
    if group:
        yield key, group


def _read_label(f, path: Path, m: Member) -> int:
    f.seek(m.offset)
    text = f.read(m.size).decode(errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"{path}: member {m.name}: label {text!r} is not an integer") from None


class _Classes:
    """The classes a split's samples name: ``--classes``, else their folders (which must each
    hold one label, and whose sorted order must be the labels'), checked once all are seen."""

    def __init__(self, opts: SourceOptions):
        self.given = read_class_file(opts.classes) if opts.classes else None
        self.folders: dict[str, int] = {}
        self.unnamed = self.conflict = False

    def saw(self, name: str, label: int) -> None:
        if self.given is not None:
            return
        if "/" not in name:
            self.unnamed = True
            return
        folder = name.split("/", 1)[0]
        if self.folders.setdefault(folder, label) != label:
            self.conflict = True

    def resolve(self, where: str) -> list[str]:
        if self.given is not None:
            return self.given
        classes = sorted(self.folders)
        agree = all(self.folders[c] == i for i, c in enumerate(classes))
        if classes and not self.unnamed and not self.conflict and agree:
            return classes
        raise SourceError(
            f"{where}: the samples do not name their classes; pass --classes FILE "
            "(one name per line, line i = the .cls value i)"
        )


def _list_split(split: str, tars: list[Path], classes: _Classes) -> SplitListing:
    """A split's samples, tar by tar, into a table; ``classes`` sees each one's label."""
    candidates, ignored = CandidateTable.Builder(loc_width=3), []
    for archive, path in enumerate(tars):
        with open(path, "rb") as f:
            for key, group in _grouped(path):
                image, label = None, None
                for m, ext in group:
                    if ext == "cls":
                        label = _read_label(f, path, m)
                    elif is_image_name(m.name) and image is None:
                        image = m
                    else:
                        ignored.append(m.name)
                if image is None or label is None:
                    ignored.append(f"{key} ({'no image' if image is None else 'no .cls label'})")
                    continue
                classes.saw(image.name, label)
                name = image.name
                if classes.given is not None:
                    name = tree_key(split, name, _class_name(classes.given, label, name))
                candidates.append(name, label, (archive, image.offset, image.size))
    # the whole split is sorted: a sort key per image is held for this sort only
    table = _first_of_each_key(candidates.build().tree_sorted(), ignored)
    return SplitListing(split, TarMemberReader([str(p) for p in tars]), table, ignored)


def _class_name(given: list[str], label: int, name: str) -> str:
    if not 0 <= label < len(given):
        raise _label_error(name, label, len(given))
    return given[label]


def _label_error(name: str, label: int, n_classes: int) -> SourceError:
    return SourceError(f"{name}: label {label} is not one of the {n_classes} classes")


def _first_of_each_key(table: CandidateTable, ignored: list[str]) -> CandidateTable:
    """The sorted table with one candidate per key: a key in two samples (two tars, or apart
    in one) keeps its first in tar order (the sort is stable); the others are ignored."""
    keep, previous = [], None
    for i, c in enumerate(table):
        if c.path == previous:
            ignored.append(f"{c.path} (a second sample with this key)")
        else:
            keep.append(i)
        previous = c.path
    return table if len(keep) == len(table) else table.take(keep)


def _check_labels(listing: SplitListing, n_classes: int) -> None:
    labels = listing.candidates.labels
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise _label_error(listing.candidates.path(int(bad[0])), int(labels[bad[0]]), n_classes)


def discover_webdataset(src: Path, opts: SourceOptions) -> tuple[list[str], list[SplitListing]]:
    by_split: dict[str, list[Path]] = {}
    for p in sorted([*src.glob("*.tar"), *src.glob("*/*.tar")]):
        split = _split_of(p, src)
        if split is not None:
            by_split.setdefault(split, []).append(p)
    if not by_split:
        raise SourceError(f"{src}: tar files, but none named for a split (e.g. train-0000.tar)")
    splits = list(opts.splits) if opts.splits else [s for s in ("train", "val") if s in by_split]
    splits = splits or sorted(by_split)
    for split in splits:
        if split not in by_split:
            raise SourceError(f"{src}: no webdataset tars for split {split!r}")
    # train (else the first split) names the classes: list it first
    named_by = "train" if "train" in splits else splits[0]
    namer = _Classes(opts)
    first = _list_split(named_by, by_split[named_by], namer)
    classes = namer.resolve(str(src))
    listings = [
        first if split == named_by else _list_split(split, by_split[split], _Classes(opts))
        for split in splits
    ]
    for listing in listings:
        _check_labels(listing, len(classes))
    return classes, listings
