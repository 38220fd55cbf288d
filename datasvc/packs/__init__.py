"""Packs: sharded LMDB or TFRecord files plus ``manifest.json``; one writer+reader pair per
format in ``PACK_FORMATS``, and ``open_pack(path)`` to read any of them."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from datasvc.packs.manifest import FORMAT_VERSION, MANIFEST_NAME, PackError, read_manifest
from datasvc.registry import Registry


class Sample(NamedTuple):
    """One record: encoded image bytes, 0-based label, source key, stored height and width."""

    image: bytes
    label: int
    key: str
    height: int
    width: int


class CorruptSampleError(PackError):
    """A record failed its checksum or could not be parsed; names the shard and record."""


class UnknownSplitError(PackError, KeyError):
    """A split the pack does not have; the message lists the ones it has (a KeyError too)."""


@dataclass(frozen=True)
class PackFormat:
    """A pack format: shard file suffix, a writer ``writer(path)`` and a reader ``reader(path)``.

    Writers take ``write(sample)`` calls and ``close() -> dict`` (record count, bytes, digest).
    Readers are random-access sequences of ``Sample`` that open their files lazily, per process.
    """

    name: str
    suffix: str
    writer: type
    reader: type


PACK_FORMATS = Registry("pack format")


def register_pack_format(fmt: PackFormat) -> PackFormat:
    return PACK_FORMATS.add(fmt.name, fmt)


def shard_name(split: str, index: int, count: int, suffix: str) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{suffix}"


class Split:
    """A random-access sequence of ``Sample`` over one split's shards; fork-safe."""

    def __init__(self, name: str, shard_paths: list[Path], counts: list[int], reader_cls: type):
        self.name = name
        self.shard_paths = shard_paths
        self.counts = counts
        self._reader_cls = reader_cls
        self._readers: list = [None] * len(shard_paths)
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index → (shard number, index within shard)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for split {self.name!r} ({len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def shard(self, i: int):
        reader = self._readers[i]
        if reader is None:
            reader = self._readers[i] = self._reader_cls(self.shard_paths[i])
        return reader

    def __getitem__(self, index: int) -> Sample:
        shard, local = self.locate(int(index))
        return self.shard(shard)[local]

    def close(self) -> None:
        for r in self._readers:
            if r is not None:
                r.close()
        self._readers = [None] * len(self.shard_paths)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self.shard_paths)
        return state


class Pack:
    """A converted pack: ``.classes``, ``.manifest``, ``.split(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest["format"] not in PACK_FORMATS:
            raise PackError(
                f"{self.path}: manifest names format {self.manifest['format']!r}, which this "
                f"datasvc does not read (it reads {', '.join(PACK_FORMATS.names())})",
                "upgrade datasvc or re-convert",
            )
        self.format = PACK_FORMATS.get(self.manifest["format"])
        self.classes: list[str] = list(self.manifest["classes"])
        self._splits: dict[str, Split] = {}

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise UnknownSplitError(
                f"pack {self.path} has no split {name!r}; splits: {self.splits}"
            )
        if name not in self._splits:
            info = self.manifest["splits"][name]
            folder = self.path / info.get("dir", name)  # adopted TF shards sit side by side
            paths = [folder / s["file"] for s in info["shards"]]
            counts = [s["num_records"] for s in info["shards"]]
            self._splits[name] = Split(name, paths, counts, self.format.reader)
        return self._splits[name]

    def __repr__(self) -> str:
        counts = {k: v["num_samples"] for k, v in self.manifest["splits"].items()}
        return f"Pack({str(self.path)!r}, format={self.format.name!r}, splits={counts})"


def open_pack(path: str | os.PathLike) -> Pack:
    """Open a pack directory (any registered format) for reading."""
    path = Path(path)
    if not (path / MANIFEST_NAME).exists():
        from datasvc.packs.tfrecord import looks_like_tf_imagenet

        if looks_like_tf_imagenet(path):
            raise PackError(
                f"{path} holds TensorFlow ImageNet TFRecords without a {MANIFEST_NAME}",
                f"run `datasvc adopt {path}` once; it indexes them so they open at once",
            )
    return Pack(path)


# Register the built-in formats.
from datasvc.packs import lmdb as _lmdb  # noqa: E402,F401
from datasvc.packs import tfrecord as _tfrecord  # noqa: E402,F401

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PACK_FORMATS",
    "CorruptSampleError",
    "Pack",
    "PackError",
    "PackFormat",
    "Sample",
    "Split",
    "open_pack",
    "register_pack_format",
    "shard_name",
]
