"""LMDB shards: one environment per shard file; keys are 8-byte big-endian indices, values are
msgpack maps carrying a CRC32C of the image bytes (LMDB itself checks nothing)."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import google_crc32c
import lmdb
import msgpack
import numpy as np

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
_ENVS: dict[tuple, tuple[int, lmdb.Environment]] = {}
_DAMAGED: dict[tuple, str] = {}  # shard files found shorter than their structure, and why
# A second lmdb.open of an environment this process has open fails ("already open"), so two
# thread-engine workers meeting a shard for the first time at once must not both open it.
_OPENING = threading.Lock()
# One read transaction per shard and thread. A read that meets a damaged page leaves its
# transaction unusable (MDB_BAD_TXN) until it is renewed: shared by the thread engine's
# workers, it made their healthy records of that shard look damaged too.
_THREAD = threading.local()


def _new_opening_lock() -> None:
    global _OPENING
    _OPENING = threading.Lock()  # a fork while another thread held it must not deadlock the child


os.register_at_fork(after_in_child=_new_opening_lock)


class DamagedShardError(CorruptSampleError):
    """A shard file is shorter than its own structure says (an interrupted copy)."""


def check_complete(env: lmdb.Environment, path: str) -> None:
    """Refuse a shard whose file ends before LMDB's last page: touching a page past the end
    of a mapped file is a SIGBUS, so this is checked before any record is read."""
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(path)
    if size < need:
        raise DamagedShardError(
            f"{path}: shard truncated: {size} bytes, its last LMDB page ends at byte {need}"
        )


def _open_env(real: str) -> lmdb.Environment:
    """A read-only environment on a shard checked to be complete."""
    try:
        env = lmdb.open(
            real,
            subdir=False,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=1,
        )
    except lmdb.Error as e:
        raise DamagedShardError(f"{real}: not a readable LMDB file ({e})") from None
    try:
        check_complete(env, real)
    except BaseException:
        env.close()
        raise
    return env


def _env_key(path: Path) -> tuple:
    real = os.path.realpath(path)
    st = os.stat(real)
    return (real, st.st_dev, st.st_ino)  # a file re-created at the same path is another env


def _thread_txns() -> dict[tuple, tuple[lmdb.Environment, lmdb.Transaction]]:
    txns = getattr(_THREAD, "txns", None)
    if txns is None:
        txns = _THREAD.txns = {}
    return txns


def _read_txn(key: tuple) -> lmdb.Transaction:
    """This thread's read transaction on the shard ``key`` names, begun on this process's
    environment (a transaction of an environment since closed, or a parent's, is replaced)."""
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid():
        env = entry[1]
        held = _thread_txns().get(key)
        if held is not None and held[0] is env:
            return held[1]
    else:
        with _OPENING:  # threads of one process: only one may open a shard's environment
            env = _process_env(key)
    txn = env.begin(buffers=False)
    _thread_txns()[key] = (env, txn)
    return txn


def _process_env(key: tuple) -> lmdb.Environment:
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[1]  # another thread opened it while this one waited
    if entry is not None:  # inherited through fork: drop it without touching the parent's
        try:
            entry[1].close()  # also ends the transactions begun on it
        except lmdb.Error:
            pass
        del _ENVS[key]
    if key in _DAMAGED:
        raise DamagedShardError(_DAMAGED[key])
    try:
        env = _open_env(key[0])
    except DamagedShardError as e:
        _DAMAGED[key] = str(e)
        raise
    _ENVS[key] = (os.getpid(), env)
    return env


def _renew_txn(key: tuple) -> None:
    """Drop this thread's transaction on ``key``: LMDB leaves one that met a damaged page
    unusable (MDB_BAD_TXN), so without this every later record of the shard would seem
    damaged too. The next read begins a fresh one."""
    held = _thread_txns().pop(key, None)
    if held is not None:
        try:
            held[1].abort()
        except lmdb.Error:
            pass


def close_environments() -> None:
    """Close this process's read-only environments, unmapping their shards (so that their
    pages can leave the page cache); readers reopen on their next read. Close the readers
    (``Split.close``) first: the transactions of every thread end here."""
    for key, (pid, env) in list(_ENVS.items()):
        if pid == os.getpid():
            env.close()
        del _ENVS[key]
    _thread_txns().clear()


class LMDBShardReader:
    """Random-access reader of one LMDB shard; read-only, lock-free, opened lazily per process."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._len = None
        self._key = None  # the shard file's identity, looked up once per process
        self._pid = None

    def _get_txn(self) -> lmdb.Transaction:
        if self._pid != os.getpid() or self._key is None:
            self._key = _env_key(self.path)
            self._pid = os.getpid()
        return _read_txn(self._key)

    def __len__(self) -> int:
        if self._len is None:
            self._len = self._get_txn().stat()["entries"]
        return self._len

    def raw(self, index: int) -> bytes:
        try:
            value = self._get_txn().get(record_key(index))
        except lmdb.Error as e:  # a damaged B-tree page: MDB_CORRUPTED, MDB_PAGE_NOTFOUND
            _renew_txn(self._key)
            raise CorruptSampleError(
                f"{self.path} record {index}: damaged LMDB page ({e})"
            ) from None
        if value is None:
            if 0 <= index < len(self):  # counted, but its key is gone: a damaged tree
                raise CorruptSampleError(f"{self.path} record {index}: missing from its shard")
            raise IndexError(f"{self.path}: no record {index}")
        return value

    def __getitem__(self, index: int) -> Sample:
        return decode_record(self.raw(index), f"{self.path} record {index}", self.verify)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Forget the shard's identity; environments (and each thread's transaction on them)
        are shared per process and stay open."""
        self._key = self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_key": None, "_pid": None}


# --- where each value lies in the file, for read-ahead --------------------------------------
# py-lmdb's cursors read every value they step over (a cold walk reads the whole file), so the
# spans come from LMDB's own page layout instead (lmdb.h 0.9, little-endian): two meta pages,
# then branch and leaf pages of the main tree; a value larger than a page sits on its own run
# of overflow pages. Only the meta, branch and leaf pages are read.

_PAGE_HEADER = 16  # pgno (8), pad (2), flags (2), lower/upper (2 + 2)
_NODE_HEADER = 8  # lo, hi, flags, ksize: 2 bytes each
_P_BRANCH, _P_LEAF = 0x01, 0x02
_F_BIGDATA = 0x01
_LMDB_MAGIC = 0xBEEFC0DE
_P_INVALID = 0xFFFFFFFFFFFFFFFF


def _main_root(fd: int) -> tuple[int, int]:
    """(page size, root page of the main tree) from the newer of the two meta pages."""
    head = os.pread(fd, 160, 0)
    (psize,) = struct.unpack_from("<I", head, 40)  # the free DB's md_pad holds the page size
    best = None
    for page in (0, 1):
        meta = os.pread(fd, 160, page * psize)
        magic, _ = struct.unpack_from("<II", meta, _PAGE_HEADER)
        if magic != _LMDB_MAGIC:
            raise CorruptSampleError(f"meta page {page} is not an LMDB meta page")
        (root,) = struct.unpack_from("<Q", meta, 128)
        (txnid,) = struct.unpack_from("<Q", meta, 144)
        if best is None or txnid > best[0]:
            best = (txnid, root)
    return psize, best[1]


def _walk_values(fd: int, psize: int, pgno: int, out: dict) -> None:
    page = os.pread(fd, psize, pgno * psize)
    _, flags, lower = struct.unpack_from("<HHH", page, 8)
    for k in range((lower - _PAGE_HEADER) // 2):
        (at,) = struct.unpack_from("<H", page, _PAGE_HEADER + 2 * k)
        lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, at)
        if flags & _P_BRANCH:
            _walk_values(fd, psize, lo | hi << 16 | nflags << 32, out)
            continue
        if not flags & _P_LEAF:
            raise CorruptSampleError(f"page {pgno} is neither a branch nor a leaf")
        key = int.from_bytes(page[at + _NODE_HEADER : at + _NODE_HEADER + ksize], "big")
        data = at + _NODE_HEADER + ksize
        if nflags & _F_BIGDATA:
            (first,) = struct.unpack_from("<Q", page, data)
            out[key] = (first * psize + _PAGE_HEADER, lo | hi << 16)
        else:
            out[key] = (pgno * psize + data, lo | hi << 16)


def value_spans(path: str | os.PathLike) -> np.ndarray:
    """(file offset, length) of every record's value, by record index, for read-ahead."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # tree pages only, no kernel read-ahead
    try:
        psize, root = _main_root(fd)
        spans: dict[int, tuple[int, int]] = {}
        if root != _P_INVALID:
            _walk_values(fd, psize, root, spans)
    except (struct.error, RecursionError) as e:
        raise CorruptSampleError(f"{path}: unreadable LMDB tree ({e})") from e
    finally:
        os.close(fd)
    if sorted(spans) != list(range(len(spans))):
        raise CorruptSampleError(f"{path}: record keys are not 0..{len(spans) - 1}")
    return np.asarray([spans[i] for i in range(len(spans))], np.int64).reshape(-1, 2)


register_pack_format(PackFormat("lmdb", ".lmdb", LMDBShardWriter, LMDBShardReader))
