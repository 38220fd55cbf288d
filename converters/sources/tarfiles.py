"""Tar archives read in place: one pass over the headers finds every member's byte range
(members of tars nested in a tar included), and workers read members at those offsets. Nothing
is extracted to disk; an uncompressed tar is addressed like a folder of files."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from converters.sources import Candidate, SourceError, SourceReader


@dataclass(frozen=True, slots=True)  # slots: a listing may hold a class tar's 1,300
class Member:
    """A regular file inside an archive: its name and absolute byte range in the archive."""

    name: str
    offset: int
    size: int


def _open(path: str, fileobj=None) -> tarfile.TarFile:
    try:
        # "r:" (not "r:*"): compressed archives cannot be addressed by offset
        return tarfile.open(path if fileobj is None else None, "r:", fileobj=fileobj)
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{path}: not a readable uncompressed tar ({e})") from None


def _stream(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar, one at a time, kept nowhere: iterating a ``TarFile`` keeps
    every ``TarInfo`` in ``tar.members`` (ImageNet's val tar: 50,000; a flat tar of 14M
    images, gigabytes), which a one-pass listing never looks at again."""
    while (m := tar.next()) is not None:
        tar.members.clear()
        yield m


def members(path: str) -> Iterator[Member]:
    """The regular files of a tar, in archive order."""
    last = None
    with _open(path) as tar:
        try:
            for m in _stream(tar):
                last = m.name
                if m.isfile():
                    yield Member(m.name, m.offset_data, m.size)
        except tarfile.TarError as e:
            where = f"the member after {last}" if last else "its first member"
            raise SourceError(f"{path}: damaged tar at {where} ({e})") from None


def nested_members(path: str, outer: Member) -> Iterator[Member]:
    """The regular files of a tar stored as member ``outer`` of the tar at ``path``; their
    offsets are absolute in the outer file."""
    with open(path, "rb") as f:
        f.seek(outer.offset)
        window = _Window(f, outer.offset, outer.size)
        with _open(f"{path}: member {outer.name}", window) as tar:
            try:
                for m in _stream(tar):
                    if m.isfile():
                        yield Member(m.name, outer.offset + m.offset_data, m.size)
            except tarfile.TarError as e:
                raise SourceError(f"{path}: member {outer.name} is a damaged tar ({e})") from None


class _Window:
    """A read-only, seekable view of ``size`` bytes of ``f`` from ``start`` (for tarfile)."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        data = os.pread(self._f.fileno(), n, self._start + self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


class TarMemberReader(SourceReader):
    """Reads candidates whose ``loc`` is (archive number, offset, size) with one ``pread``
    each; archives are opened once per process."""

    def __init__(self, archives: list[str]):
        self.archives = list(archives)
        self._fds: dict[int, int] = {}
        self._pid = None

    def read(self, cand: Candidate) -> bytes:
        archive, offset, size = cand.loc
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(archive)
        if fd is None:
            fd = self._fds[archive] = os.open(self.archives[archive], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            where = f"{self.archives[archive]}: member {cand.path}"
            raise OSError(f"{where}: {len(data)} of {size} bytes (the archive is truncated)")
        return data

    def __getstate__(self):
        return {"archives": self.archives, "_fds": {}, "_pid": None}
