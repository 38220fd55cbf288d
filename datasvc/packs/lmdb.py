"""LMDB shards: one environment per shard file; keys are 8-byte big-endian indices, values are
msgpack maps carrying a CRC32C of the image bytes (LMDB itself checks nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import lmdb
import msgpack

from datasvc.packs import CorruptSampleError, PackFormat, Sample, register_pack_format

_INITIAL_MAP = 64 << 20
_TXN_RECORDS = 256


def record_key(index: int) -> bytes:
    return int(index).to_bytes(8, "big")


def encode_record(sample: Sample, extra: dict | None = None) -> tuple[bytes, int]:
    """Sample → msgpack value and the CRC32C of its image bytes."""
    crc = google_crc32c.value(sample.image)
    value = {
        "image": sample.image,
        "label": int(sample.label),
        "key": sample.key,
        "height": int(sample.height),
        "width": int(sample.width),
        "crc32c": crc,
    }
    if extra:
        value.update(extra)
    return msgpack.packb(value, use_bin_type=True), crc


def decode_record(value: bytes, where: str, verify: bool = True) -> Sample:
    try:
        rec = msgpack.unpackb(value, raw=False)
        sample = Sample(rec["image"], rec["label"], rec["key"], rec["height"], rec["width"])
    except Exception as e:  # noqa: BLE001 - any parse failure is damage
        raise CorruptSampleError(f"{where}: unreadable record ({e})") from e
    if verify and google_crc32c.value(sample.image) != rec["crc32c"]:
        raise CorruptSampleError(f"{where}: image bytes fail their CRC32C (key {sample.key!r})")
    return sample


class LMDBShardWriter:
    """Appends samples to a new LMDB shard file; the map grows as needed."""

    def __init__(self, path: str | os.PathLike, classes: list[str] | None = None):
        self.path = Path(path)
        for p in (self.path, Path(f"{self.path}-lock")):
            if p.exists():
                p.unlink()
        self._map_size = _INITIAL_MAP
        self._env = lmdb.open(
            str(self.path),
            subdir=False,
            map_size=self._map_size,
            readahead=False,
            meminit=False,
            sync=False,
            metasync=False,
            lock=True,
        )
        self._pending: list[tuple[bytes, bytes]] = []
        self._count = 0
        self._bytes = 0
        self._digest = 0

    def write(self, sample: Sample, extra: dict | None = None) -> None:
        value, crc = encode_record(sample, extra)
        self._pending.append((record_key(self._count), value))
        self._count += 1
        self._bytes += len(sample.image)
        self._digest = google_crc32c.extend(self._digest, crc.to_bytes(4, "big"))
        if len(self._pending) >= _TXN_RECORDS:
            self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v, overwrite=True, append=True)
                self._pending.clear()
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def close(self) -> dict:
        self._flush()
        self._env.sync(True)
        self._env.close()
        lock = Path(f"{self.path}-lock")
        if lock.exists():
            lock.unlink()
        return {
            "num_records": self._count,
            "image_bytes": self._bytes,
            "digest": f"{self._digest:08x}",
        }

    def abort(self) -> None:
        self._env.close()


# One read-only environment per shard file and process: LMDB (and py-lmdb's guard) forbid
# opening the same environment twice in a process, and a forked child must not use its
# parent's handle, so a child closes what it inherited and opens its own.
_ENVS: dict[tuple, tuple[int, lmdb.Environment, lmdb.Transaction]] = {}


def _read_txn(path: Path) -> lmdb.Transaction:
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_dev, st.st_ino)  # a file re-created at the same path is another env
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[2]
    if entry is not None:  # inherited through fork: drop it without touching the parent's
        try:
            entry[2].abort()
            entry[1].close()
        except lmdb.Error:
            pass
    env = lmdb.open(
        real, subdir=False, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1
    )
    txn = env.begin(buffers=False)
    _ENVS[key] = (os.getpid(), env, txn)
    return txn


class LMDBShardReader:
    """Random-access reader of one LMDB shard; read-only, lock-free, opened lazily per process."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._len = None
        self._txn = None
        self._pid = None

    def _get_txn(self) -> lmdb.Transaction:
        if self._pid != os.getpid() or self._txn is None:
            self._txn = _read_txn(self.path)
            self._pid = os.getpid()
        return self._txn

    def __len__(self) -> int:
        if self._len is None:
            self._len = self._get_txn().stat()["entries"]
        return self._len

    def raw(self, index: int) -> bytes:
        value = self._get_txn().get(record_key(index))
        if value is None:
            raise IndexError(f"{self.path}: no record {index}")
        return value

    def __getitem__(self, index: int) -> Sample:
        return decode_record(self.raw(index), f"{self.path} record {index}", self.verify)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Forget the handle; environments are shared per process and stay open."""
        self._txn = self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_txn": None, "_pid": None}


register_pack_format(PackFormat("lmdb", ".lmdb", LMDBShardWriter, LMDBShardReader))
