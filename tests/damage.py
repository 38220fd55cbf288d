"""Damage a converted pack the way storage does: flip bytes inside records (their CRC then
fails) or cut a shard file short (an interrupted copy)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from datasvc.packs import open_pack
from datasvc.packs.lmdb import value_spans
from datasvc.packs.tfrecord import index_path, read_index


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def damage_records(pack: Path, split: str, ids: list[int]) -> list[dict]:
    """Flip one byte in the middle of each sample's image bytes, in place (so the record's
    CRC fails); returns the entries ``loader.skipped`` should list, without the reason."""
    sp = open_pack(pack).split(split)
    places = [_image_byte(sp, sid) for sid in ids]  # all located before any is damaged
    sp.close()
    out = []
    for sid, (path, offset) in zip(ids, places):
        _flip(path, offset)
        out.append({"id": sid, "shard": path.name, "record": sp.locate(sid)[1]})
    return out


def _image_byte(sp, sid: int) -> tuple[Path, int]:
    """The shard file and the offset of a byte inside sample ``sid``'s image bytes."""
    shard, local = sp.locate(sid)
    path = sp.shard_paths[shard]
    if path.suffix == ".tfrecord":
        offset, size = read_index(index_path(path))[local]
        return path, offset + 12 + size // 2  # inside the Example, under the data CRC
    # LMDB: the record's value (a msgpack map holding the image bytes) where the live tree
    # puts it; stale copies on freed pages may hold the same bytes elsewhere in the file.
    offset, size = value_spans(path)[local]
    with open(path, "rb") as f:
        value = os.pread(f.fileno(), int(size), int(offset))
    image = sp[sid].image
    at = value.index(image)
    return path, int(offset) + at + len(image) // 2


def overwrite_pages(shard: Path, first: int = 8, count: int = 4) -> None:
    """Overwrite ``count`` 4 KiB pages of an LMDB shard from page ``first``: in the test packs'
    shards these are B-tree pages of the first records, so reading them fails in LMDB
    (MDB_CORRUPTED, MDB_PAGE_NOTFOUND) or yields garbage the record's check refuses."""
    with open(shard, "r+b") as f:
        f.seek(4096 * first)
        f.write(bytes([0xA5]) * 4096 * count)


def truncate_shard(pack: Path, split: str, shard: int, keep: float = 0.5) -> Path:
    """Cut a shard file to ``keep`` of its size, as an interrupted copy leaves it."""
    path = open_pack(pack).split(split).shard_paths[shard]
    os.truncate(path, int(path.stat().st_size * keep))
    return path
