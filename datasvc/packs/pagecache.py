"""The page cache of pack files: drop it (``posix_fadvise(DONTNEED)``) and measure how much of
a file is resident (``mincore`` over a read-only mapping), so that a cold measurement can show
that it really was cold."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = mmap.PAGESIZE


def drop_cache(paths) -> None:
    """Ask the kernel to drop the cached pages of ``paths``. Pages a live process has mapped
    and touched stay (the kernel keeps mapped pages), so close readers first; dirty pages
    (a file just written) are written back first, since the kernel drops clean pages only."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(path, offset: int = 0, length: int | None = None) -> tuple[int, int]:
    """(pages in the page cache, pages) of ``path``, or of bytes ``[offset, offset + length)``
    of it, from ``mincore`` over a read-only mapping."""
    size = os.path.getsize(path)
    end = size if length is None else min(size, offset + length)
    start = offset - offset % PAGE
    if end <= start:
        return 0, 0
    pages = -(-(end - start) // PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, end - start, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap {path}: {os.strerror(err)}")
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, end - start, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore {path}: {os.strerror(err)}")
            resident = sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, end - start)
    finally:
        os.close(fd)
    return resident, pages


def resident_fraction(paths) -> float:
    """Share of the pages of ``paths`` that are in the page cache (0.0 to 1.0)."""
    resident = total = 0
    for p in paths:
        r, n = resident_pages(p)
        resident, total = resident + r, total + n
    return resident / total if total else 0.0


def warm_cache(paths, chunk: int = 8 << 20) -> None:
    """Read ``paths`` once, sequentially, so that they are in the page cache."""
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def pack_files(split) -> list[Path]:
    """The files of a split that reads touch: its shards (TFRecord indices are read once, at
    open, and are not part of an epoch's IO)."""
    return [Path(p) for p in split.shard_paths]
