"""The ILSVRC2012 files as image-net.org hands them out, read in place: the train tar (a tar
of one tar per class), the flat val tar, and the val labels from the devkit
(``ILSVRC2012_devkit_t12.tar.gz``) or Kaggle's ``LOC_val_solution.csv``."""

from __future__ import annotations

import io
import multiprocessing as mp
import tarfile
from collections.abc import Iterator
from pathlib import Path

from converters.sources import (
    Candidate,
    CandidateTable,
    SourceError,
    SourceOptions,
    SplitListing,
    is_image_name,
    tree_order,
)
from converters.sources.tarfiles import Member, TarMemberReader, members, nested_members
from converters.sources.tree import check_val_label, parse_val_labels, read_val_labels

TARBALLS = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_LABELS = "LOC_val_solution.csv"


def _list_inner(path: str, outer: Member) -> list[Member]:
    return list(nested_members(path, outer))


def _inner_listings(path: Path, inner: list[Member], workers: int) -> Iterator[list[Member]]:
    """Each per-class tar's members, class after class; ``workers`` processes read the headers
    (ImageNet's train tar holds 1.28M of them: about 25 µs each in Python). Yielded in order
    as they come, so one class's members are held at a time, not the whole train tar's."""
    args = [(str(path), m) for m in inner]
    if workers <= 1 or len(inner) < 2:
        yield from (_list_inner(*a) for a in args)
        return
    with mp.get_context("fork").Pool(min(workers, len(inner))) as pool:
        yield from pool.imap(_list_inner_args, args, chunksize=max(1, len(args) // (8 * workers)))


def _list_inner_args(args: tuple[str, Member]) -> list[Member]:
    return _list_inner(*args)


def list_train(path: Path, workers: int = 1) -> tuple[list[str], SplitListing]:
    """The train tar → sorted synsets (one inner ``<wnid>.tar`` each) and the candidates, keyed
    ``<wnid>/<file name>`` as the extracted tree's."""
    outer = list(members(str(path)))
    inner = sorted((m for m in outer if m.name.endswith(".tar")), key=_class_of)
    classes = [_class_of(m) for m in inner]
    if not classes:
        raise SourceError(f"{path}: no per-class tars inside (<wnid>.tar members)")
    candidates = CandidateTable.Builder(loc_width=3)
    ignored = [m.name for m in outer if not m.name.endswith(".tar")]
    for label, files in enumerate(_inner_listings(path, inner, workers)):
        wnid, mine = classes[label], []
        for f in files:
            key = f"{wnid}/{f.name}"
            if is_image_name(f.name):
                mine.append(Candidate(key, label, (0, f.offset, f.size)))
            else:
                ignored.append(key)
        # classes come in sorted order, so sorting within each is the tree's order, without
        # a sort key (nor a Candidate) per image of the whole train tar held at once
        mine.sort(key=lambda c: tree_order(c.path))
        candidates.extend(mine)
    listing = SplitListing("train", TarMemberReader([str(path)]), candidates.build(), ignored)
    return classes, listing


def _class_of(inner: Member) -> str:
    """A per-class tar's synset: its file name without ``.tar``."""
    return inner.name.rsplit("/", 1)[-1][: -len(".tar")]


def _devkit_files(path: Path) -> tuple[str, list[str]]:
    """The devkit → (the ground-truth text, ID → wnid list); the list comes from
    ``data/meta.mat`` (leaf synsets, by ILSVRC2012_ID), as torchvision reads it."""
    import scipy.io

    gt = meta = None
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                if m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    gt = tar.extractfile(m).read().decode()
                elif m.name.endswith("data/meta.mat"):
                    meta = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{path}: not a readable devkit tar.gz ({e})") from None
    if gt is None or meta is None:
        raise SourceError(
            f"{path}: no data/ILSVRC2012_validation_ground_truth.txt or data/meta.mat inside"
        )
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    leaves = sorted((int(s[0]), str(s[1])) for s in synsets if int(s[4]) == 0)
    return gt, [wnid for _, wnid in leaves]


def val_labels(src: Path, opts: SourceOptions) -> tuple[dict[str, str], list[str]]:
    """The val labels map {file stem: wnid} and the wnids it may name, from ``--val-labels``,
    Kaggle's CSV or the devkit beside the tarballs (in that order)."""
    if opts.val_labels:
        synsets = Path(opts.val_synsets) if opts.val_synsets else None
        labels = read_val_labels(Path(opts.val_labels), synsets)
        return labels, sorted(set(labels.values()))
    if (src / KAGGLE_LABELS).exists():
        labels = parse_val_labels((src / KAGGLE_LABELS).read_text(), str(src / KAGGLE_LABELS))
        return labels, sorted(set(labels.values()))
    if (src / DEVKIT).exists():
        gt, synsets = _devkit_files(src / DEVKIT)
        return parse_val_labels(gt, str(src / DEVKIT), synsets), sorted(synsets)
    raise SourceError(
        f"{src / TARBALLS['val']}: no val labels; put {DEVKIT} or Kaggle's {KAGGLE_LABELS} "
        "beside it, or pass --val-labels"
    )


def list_val(path: Path, classes: list[str], labels: dict[str, str]) -> SplitListing:
    """The flat val tar → candidates keyed by file name, labelled from ``labels``."""
    index = {c: i for i, c in enumerate(classes)}
    candidates, ignored = CandidateTable.Builder(loc_width=3), []
    for m in members(str(path)):
        name = m.name.rsplit("/", 1)[-1]
        if not is_image_name(name):
            ignored.append(m.name)
            continue
        where = f"{path}: member {m.name}"
        label = check_val_label(where, name.rsplit(".", 1)[0], labels, index)
        candidates.append(name, label, (0, m.offset, m.size))
    # the whole split is sorted: for this sort only, a sort key per image (50,000 for
    # ImageNet's val) is held besides the table
    ordered = candidates.build().tree_sorted()
    return SplitListing("val", TarMemberReader([str(path)]), ordered, ignored)


def discover_ilsvrc(src: Path, opts: SourceOptions) -> tuple[list[str], list[SplitListing]]:
    """The tarballs in ``src`` → train's synsets (or the labels' when only val is converted)
    and the listings of the requested splits."""
    present = [s for s in TARBALLS if (src / TARBALLS[s]).exists()]
    splits = list(opts.splits) if opts.splits else present
    for s in splits:
        if s not in TARBALLS:
            raise SourceError(f"--split {s}: the ILSVRC2012 tarballs hold train and val only")
        if not (src / TARBALLS[s]).exists():
            raise SourceError(f"{src / TARBALLS[s]}: missing (asked for split {s})")
    classes, listings = None, []
    if "train" in splits:
        classes, train = list_train(src / TARBALLS["train"], opts.workers)
        listings.append(train)
    if "val" in splits:
        labels, wnids = val_labels(src, opts)
        classes = classes or wnids
        listings.append(list_val(src / TARBALLS["val"], classes, labels))
    return classes, listings
