"""Webdataset shards: uncompressed tars of samples, each a group of members sharing a key
(``<key>.jpg`` + ``<key>.cls``: the image and its integer label), read in place by offset."""

from __future__ import annotations

import re
from pathlib import Path

from converters.sources import (
    CandidateTable,
    SourceError,
    SourceOptions,
    SplitListing,
    is_image_name,
    read_class_file,
    tree_key,
    tree_order,
)
from converters.sources.tarfiles import TarMemberReader, members

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


def _samples(archive: int, path: Path, out: dict, ignored: list) -> None:
    """Group one tar's members by key: {key: (image member name, loc, label)}."""
    for m in members(str(path)):
        key, ext = _sample_key(m.name)
        entry = out.setdefault(key, [None, None, None])
        if ext == "cls":
            with open(path, "rb") as f:
                f.seek(m.offset)
                text = f.read(m.size).decode(errors="replace").strip()
            try:
                entry[2] = int(text)
            except ValueError:
                raise SourceError(
                    f"{path}: member {m.name}: label {text!r} is not an integer"
                ) from None
        elif is_image_name(m.name) and entry[0] is None:
            entry[0], entry[1] = m.name, (archive, m.offset, m.size)
        else:
            ignored.append(m.name)


def _classes(samples: dict, opts: SourceOptions, where: str) -> list[str]:
    """``--classes``, else the class folders the keys sit in (each must agree with .cls)."""
    if opts.classes:
        return read_class_file(opts.classes)
    folders = {name.split("/")[0]: label for name, _, label in samples.values() if name}
    if folders and all("/" in name for name, _, _ in samples.values() if name):
        classes = sorted(folders)
        if all(folders[c] == i for i, c in enumerate(classes)):
            return classes
    raise SourceError(
        f"{where}: the samples do not name their classes; pass --classes FILE "
        "(one name per line, line i = the .cls value i)"
    )


def discover_webdataset(src: Path, opts: SourceOptions) -> tuple[list[str], list[SplitListing]]:
    by_split: dict[str, list[Path]] = {}
    for p in sorted([*src.glob("*.tar"), *src.glob("*/*.tar")]):
        split = _split_of(p, src)
        if split is not None:
            by_split.setdefault(split, []).append(p)
    if not by_split:
        raise SourceError(f"{src}: tar files, but none named for a split (e.g. train-0000.tar)")
    splits = list(opts.splits) if opts.splits else [s for s in ("train", "val") if s in by_split]
    grouped = {}
    for split in splits or sorted(by_split):
        if split not in by_split:
            raise SourceError(f"{src}: no webdataset tars for split {split!r}")
        samples, ignored = {}, []
        for i, path in enumerate(by_split[split]):
            _samples(i, path, samples, ignored)
        grouped[split] = (samples, ignored)
    named_by = grouped["train"] if "train" in grouped else next(iter(grouped.values()))
    classes = _classes(named_by[0], opts, str(src))
    del named_by
    listings = []
    for split in list(grouped):
        samples, ignored = grouped.pop(split)  # so each split's grouping goes once listed
        candidates = CandidateTable.Builder(loc_width=3)
        for key, (name, loc, label) in samples.items():
            if name is None or label is None:
                ignored.append(f"{key} ({'no image' if name is None else 'no .cls label'})")
            elif not 0 <= label < len(classes):
                raise SourceError(f"{name}: label {label} is not one of the {len(classes)} classes")
            else:
                candidates.append(tree_key(split, name, classes[label]), label, loc)
        del samples  # the grouping by key holds more per image than the table: free it first
        # the whole split is sorted: a sort key per image is held for this sort only
        candidates = candidates.build().sorted_by(tree_order)
        reader = TarMemberReader([str(p) for p in by_split[split]])
        listings.append(SplitListing(split, reader, candidates, ignored))
    return classes, listings
