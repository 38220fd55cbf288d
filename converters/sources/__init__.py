"""Sources: what SRC is → the class list and, per split, the candidates to pack and a reader of
their bytes. Every source gives the records the extracted ``SRC/<split>/<class>/...`` tree
would give: the same keys, labels and class list (torchvision's sorted class folders)."""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasvc.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(UserError):
    """SRC cannot be converted as it is; the message names the file or member and the fix."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file to pack: its key (the path the extracted tree would give it, relative to the
    split folder), its 0-based label, and where its source finds the bytes (``loc``).
    Plans hold them as a ``CandidateTable``; these are made one at a time from it."""

    path: str
    label: int
    loc: tuple = ()


# Keys are stored as UTF-8 with surrogates passed through: any str round-trips exactly (a
# file name os.walk decoded with surrogateescape included).
_ENCODING = ("utf-8", "surrogatepass")
_CHUNK = 8192  # candidates made (or key bytes gathered) per numpy call


class CandidateTable:
    """A split's (or a shard's) candidates in columns: the keys' UTF-8 in one buffer with an
    int64 offsets array, int32 labels and an (N, loc width) int64 array of locs. About 50-70
    bytes an image where a list of ``Candidate`` took 150-250: ImageNet's 1.28M-image plan is
    the one thing in a conversion that grows with the source.

    Reads like a sequence of ``Candidate``. A slice, and a ``view`` through a permutation, share
    the columns (a view holds 8 bytes an image: its row numbers) but pickle only their own
    part, so a shard job sent to a worker carries its shard alone.
    """

    __slots__ = ("_keys", "_offsets", "_labels", "_locs", "_rows")

    def __init__(self, keys, offsets: np.ndarray, labels: np.ndarray, locs: np.ndarray, rows=None):
        # offsets index into keys; a slice's first offset need not be 0
        self._keys, self._offsets, self._labels, self._locs = keys, offsets, labels, locs
        self._rows = rows  # a view's rows of the columns, in its order; None: all, in order

    @classmethod
    def of(cls, candidates: Iterable[Candidate], loc_width: int | None = None) -> CandidateTable:
        builder = cls.Builder(loc_width)
        builder.extend(candidates)
        return builder.build()

    def __len__(self) -> int:
        return len(self._labels) if self._rows is None else len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the columns its candidates would have on their own (as pickled)."""
        if self._rows is not None:
            return self._own().nbytes
        a, b = int(self._offsets[0]), int(self._offsets[-1])
        return b - a + self._offsets.nbytes + self._labels.nbytes + self._locs.nbytes

    @property
    def labels(self) -> np.ndarray:
        """The labels in this table's order (a view's are gathered: 4 bytes an image)."""
        return self._labels if self._rows is None else self._labels[self._rows]

    def _row(self, i: int) -> int:
        return i if self._rows is None else int(self._rows[i])

    def path(self, i: int) -> str:
        j = self._row(i)
        return str(self._keys[self._offsets[j] : self._offsets[j + 1]], *_ENCODING)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return self.take(range(start, stop, step))
            stop = max(start, stop)
            if self._rows is not None:
                cols = (self._keys, self._offsets, self._labels, self._locs)
                return CandidateTable(*cols, self._rows[start:stop])
            return CandidateTable(
                self._keys,
                self._offsets[start : stop + 1],
                self._labels[start:stop],
                self._locs[start:stop],
            )
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"candidate {i} of {n}")
        j = self._row(i % n)
        return Candidate(self.path(i % n), int(self._labels[j]), tuple(self._locs[j].tolist()))

    def __iter__(self) -> Iterator[Candidate]:
        if self._rows is not None:
            for start in range(0, len(self), _CHUNK):  # a gathered chunk at a time
                yield from self._gather(self._rows[start : start + _CHUNK])
            return
        keys = self._keys
        for start in range(0, len(self), _CHUNK):
            # a chunk's columns as Python lists: one numpy call each, not one per candidate
            stop = min(start + _CHUNK, len(self))
            offsets = self._offsets[start : stop + 1].tolist()
            labels = self._labels[start:stop].tolist()
            locs = self._locs[start:stop].tolist()
            for j, label in enumerate(labels):
                key = str(keys[offsets[j] : offsets[j + 1]], *_ENCODING)
                yield Candidate(key, label, tuple(locs[j]))

    def take(self, indices) -> CandidateTable:
        """The candidates at ``indices``, in that order, in buffers of their own."""
        idx = np.asarray(indices, dtype=np.int64)
        return self._gather(idx if self._rows is None else self._rows[idx])

    def view(self, indices) -> CandidateTable:
        """The candidates at ``indices``, in that order, sharing these columns: 8 bytes an
        image (its row number) where ``take`` copies them (50-70)."""
        idx, n = np.asarray(indices, dtype=np.int64), len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"candidates {idx.min()}..{idx.max()} of {n}")
        if len(idx) and idx.min() < 0:
            idx = np.where(idx < 0, idx + n, idx)
        rows = idx if self._rows is None else self._rows[idx]
        return CandidateTable(self._keys, self._offsets, self._labels, self._locs, rows)

    def _own(self) -> CandidateTable:
        """This table with its own columns: itself, or a view's rows gathered."""
        return self if self._rows is None else self._gather(self._rows)

    def _gather(self, idx: np.ndarray) -> CandidateTable:
        """The columns' rows ``idx`` copied into a table of their own."""
        starts = self._offsets[:-1][idx]
        lengths = self._offsets[1:][idx] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        src = np.frombuffer(self._keys, dtype=np.uint8)
        keys = np.empty(int(offsets[-1]), dtype=np.uint8)
        for c in range(0, len(idx), _CHUNK):
            # the key bytes of _CHUNK candidates at a time: positions are 8 bytes per key
            # byte, so gathering all at once would cost 8x the keys
            d = min(c + _CHUNK, len(idx))
            first, last = int(offsets[c]), int(offsets[d])
            shift = np.repeat(starts[c:d] - offsets[c:d], lengths[c:d])
            keys[first:last] = src[shift + np.arange(first, last)]
        return CandidateTable(keys.tobytes(), offsets, self._labels[idx], self._locs[idx])

    def tree_sorted(self) -> CandidateTable:
        """Stably sorted in the extracted tree's order (``tree_order``), by one numpy argsort.

        Each key becomes ``top NUL folder NUL name`` in bytes. Their byte order is tree_order's:
        the keys are UTF-8 (surrogates passed through), which keeps code point order, and NUL
        sorts before any character a file name can hold. In a fixed-width array that costs the
        longest such key plus 8 bytes an image while sorting, where Python's ``sorted`` with
        ``tree_order`` held a tuple of three strings an image (~300 bytes). When one key is
        far longer than the rest, the width would cost more than that: Python sorts them."""
        own, n = self._own(), len(self)
        width = max((len(k) + len(_tree_top(k)) + 2 for k in own._key_bytes()), default=1)
        if width > 4 * (own.nbytes / max(n, 1)):
            order = sorted(range(n), key=lambda i: _tree_sort_key(own._key_at(i)))
            return own.take(order)
        keys = np.empty(n, dtype=f"S{width}")
        for i, k in enumerate(own._key_bytes()):
            keys[i] = _tree_sort_key(k)
        order = np.argsort(keys, kind="stable")
        del keys
        return own.take(order)

    def _key_bytes(self) -> Iterator[bytes]:
        """An own table's keys as UTF-8 bytes, a chunk of offsets at a time."""
        for start in range(0, len(self), _CHUNK):
            offsets = self._offsets[start : min(start + _CHUNK, len(self)) + 1].tolist()
            for a, b in zip(offsets, offsets[1:]):
                yield bytes(self._keys[a:b])

    def _key_at(self, i: int) -> bytes:
        return bytes(self._keys[self._offsets[i] : self._offsets[i + 1]])

    def __reduce__(self):
        # a slice or view pickles as a table of its own part: its bytes, offsets from 0
        own = self._own()
        a, b = int(own._offsets[0]), int(own._offsets[-1])
        keys = bytes(own._keys[a:b])
        return CandidateTable, (keys, own._offsets - a, own._labels.copy(), own._locs.copy())

    def __repr__(self) -> str:
        return f"CandidateTable({len(self)} candidates, {self.nbytes} bytes)"

    class Builder:
        """Appends candidates into growing arrays, so a listing never holds one Python object
        per image; ``build()`` makes the table. ``loc_width`` is fixed by the first append when
        not given (a source's locs all have one shape)."""

        def __init__(self, loc_width: int | None = None):
            self._keys = bytearray()
            self._offsets = array("q", [0])
            self._labels = array("i")
            self._locs = array("q")
            self._width = loc_width

        def __len__(self) -> int:
            return len(self._labels)

        def append(self, path: str, label: int, loc: tuple = ()) -> None:
            if self._width is None:
                self._width = len(loc)
            elif len(loc) != self._width:
                raise ValueError(f"{path}: loc {loc} is not {self._width} numbers")
            self._keys += path.encode(*_ENCODING)
            self._offsets.append(len(self._keys))
            self._labels.append(label)
            self._locs.extend(loc)

        def extend(self, candidates: Iterable[Candidate]) -> None:
            for c in candidates:
                self.append(c.path, c.label, c.loc)

        def build(self) -> CandidateTable:
            n, width = len(self._labels), self._width or 0
            # The columns are the builder's own buffers, seen through numpy: a copy would
            # double the listing's peak, and the freed originals would stay in the process as
            # heap the allocator does not hand back (measured: ~80 bytes an image).
            table = CandidateTable(
                self._keys,
                np.frombuffer(self._offsets, dtype=np.int64),
                np.frombuffer(self._labels, dtype=np.int32),
                np.frombuffer(self._locs, dtype=np.int64).reshape(n, width),
            )
            self.__init__(self._width)  # a new listing starts afresh; the table keeps these
            return table


@dataclass
class SplitListing:
    """One split's candidates in the extracted tree's order, and the reader of their bytes.

    ``ordered`` sources (parquet) can only be read in their own order: their shards follow
    it instead of train's seeded permutation. ``repeats`` are paths reached a second time
    (a symlink loop, a link to a folder or file walked already), each counted once.
    """

    name: str
    reader: SourceReader
    candidates: CandidateTable
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


def _tree_top(key: bytes) -> bytes:
    return key.split(b"/", 1)[0] if b"/" in key else b""


def _tree_sort_key(key: bytes) -> bytes:
    """``tree_order`` as one bytes string (see ``CandidateTable.tree_sorted``)."""
    folder, _, name = key.rpartition(b"/")
    return b"\0".join((_tree_top(key), folder, name))


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
