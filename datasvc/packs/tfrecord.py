"""TFRecord shards: real framing (length, masked CRC32C, data, masked CRC32C) of
``tf.train.Example`` messages in the schema of TensorFlow's ImageNet conversion script, with a
DALI index (``<offset> <size>`` per line) beside each shard."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import google_crc32c

from datasvc.packs import CorruptSampleError, PackError, PackFormat, Sample, register_pack_format

_MASK_DELTA = 0xA282EAD8
INDEX_SUFFIX = ".idx"


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --- protobuf wire format, just what tf.train.Example needs ---------------------------------


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 negatives are 10-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
    """A python value → serialized tf.train.Feature (bytes_list, float_list or int64_list)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(v, (bytes, str)) for v in values):
        body = b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in values)
        return _field(1, body)  # BytesList
    if all(isinstance(v, int) for v in values):
        packed = b"".join(_varint(v) for v in values)
        return _field(3, _field(1, packed))  # Int64List, packed
    if all(isinstance(v, (int, float)) for v in values):
        packed = b"".join(struct.pack("<f", float(v)) for v in values)
        return _field(2, _field(1, packed))  # FloatList, packed
    raise TypeError(f"unsupported feature value {value!r}")


def encode_example(features: dict) -> bytes:
    """A dict name → value(s) → serialized tf.train.Example."""
    entries = b"".join(
        _field(1, _field(1, k.encode()) + _field(2, _feature(v))) for k, v in features.items()
    )
    return _field(1, entries)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            val = buf[pos : pos + n]
            pos += n
        elif wire == 5:
            val = buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            val = buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, val


def _parse_feature(buf: bytes):
    for num, _, body in _fields(buf):
        if num == 1:  # BytesList
            return [bytes(v) for n, _, v in _fields(body) if n == 1]
        if num == 3:  # Int64List: packed or not
            out = []
            for n, wire, v in _fields(body):
                if n != 1:
                    continue
                if wire == 0:
                    out.append(v)
                else:
                    pos = 0
                    while pos < len(v):
                        x, pos = _read_varint(v, pos)
                        out.append(x)
            return [x - (1 << 64) if x >= 1 << 63 else x for x in out]
        if num == 2:  # FloatList
            out = []
            for n, _, v in _fields(body):
                if n == 1:
                    out.extend(struct.unpack(f"<{len(v) // 4}f", v))
            return out
    return []


def decode_example(buf: bytes) -> dict:
    """Serialized tf.train.Example → dict name → list of values."""
    out = {}
    for num, _, features in _fields(buf):
        if num != 1:
            continue
        for n, _, entry in _fields(features):
            if n != 1:
                continue
            key, value = None, b""
            for en, _, ev in _fields(entry):
                if en == 1:
                    key = bytes(ev).decode()
                elif en == 2:
                    value = ev
            out[key] = _parse_feature(value)
    return out


def example_from_sample(sample: Sample, synset: str) -> bytes:
    """The schema of TensorFlow's ImageNet script; labels are 1-based there (0 unused)."""
    return encode_example(
        {
            "image/height": sample.height,
            "image/width": sample.width,
            "image/colorspace": b"RGB",
            "image/channels": 3,
            "image/class/label": sample.label + 1,
            "image/class/synset": synset,
            "image/class/text": synset,
            "image/format": b"JPEG",
            "image/filename": sample.key,
            "image/encoded": sample.image,
        }
    )


def sample_from_example(feats: dict, where: str) -> Sample:
    try:
        image = feats["image/encoded"][0]
        label = int(feats["image/class/label"][0]) - 1
        key = feats.get("image/filename", [b""])[0].decode()
        height = int(feats["image/height"][0]) if feats.get("image/height") else 0
        width = int(feats["image/width"][0]) if feats.get("image/width") else 0
    except (KeyError, IndexError, ValueError) as e:
        raise CorruptSampleError(f"{where}: Example lacks the ImageNet schema ({e})") from e
    return Sample(image, label, key, height, width)


# --- framing -----------------------------------------------------------------------------


def frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))
    )


def unframe(buf: bytes, where: str, verify: bool = True) -> bytes:
    if len(buf) < 16:
        raise CorruptSampleError(f"{where}: record shorter than its framing")
    header = buf[:8]
    (length,) = struct.unpack("<Q", header)
    if len(buf) != 16 + length:
        raise CorruptSampleError(f"{where}: length {length} disagrees with the index")
    data = buf[12 : 12 + length]
    if verify:
        (hcrc,) = struct.unpack("<I", buf[8:12])
        (dcrc,) = struct.unpack("<I", buf[12 + length :])
        if hcrc != masked_crc(header):
            raise CorruptSampleError(f"{where}: length CRC mismatch")
        if dcrc != masked_crc(data):
            raise CorruptSampleError(f"{where}: data CRC mismatch")
    return data


def scan_records(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Walk a TFRecord file's framing (headers only) → [(offset, size)] as DALI's index has."""
    out = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise CorruptSampleError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise CorruptSampleError(f"{path}: bad length CRC at byte {offset}")
            rec = 16 + length
            if offset + rec > size:
                raise CorruptSampleError(f"{path}: truncated record at byte {offset}")
            out.append((offset, rec))
            offset += rec
            f.seek(offset)
    return out


def write_index(index: list[tuple[int, int]], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        f.writelines(f"{o} {s}\n" for o, s in index)


def read_index(path: str | os.PathLike) -> list[tuple[int, int]]:
    with open(path) as f:
        return [(int(a), int(b)) for a, b in (line.split() for line in f if line.strip())]


def index_path(shard: str | os.PathLike) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.stem + INDEX_SUFFIX) if shard.suffix else Path(f"{shard}.idx")


class TFRecordShardWriter:
    """Appends samples as framed tf.train.Example records and writes the DALI index on close."""

    def __init__(self, path: str | os.PathLike, classes: list[str] | None = None):
        self.path = Path(path)
        self.classes = classes
        self._f = open(self.path, "wb")
        self._index: list[tuple[int, int]] = []
        self._offset = 0
        self._bytes = 0
        self._digest = 0

    def write(self, sample: Sample, synset: str | None = None) -> None:
        synset = synset or (self.classes[sample.label] if self.classes else str(sample.label))
        rec = frame(example_from_sample(sample, synset))
        self._f.write(rec)
        self._index.append((self._offset, len(rec)))
        self._offset += len(rec)
        self._bytes += len(sample.image)
        crc = google_crc32c.value(sample.image)
        self._digest = google_crc32c.extend(self._digest, crc.to_bytes(4, "big"))

    def close(self) -> dict:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        write_index(self._index, index_path(self.path))
        return {
            "num_records": len(self._index),
            "image_bytes": self._bytes,
            "digest": f"{self._digest:08x}",
            "index": index_path(self.path).name,
        }

    def abort(self) -> None:
        self._f.close()


class TFRecordShardReader:
    """Random-access reader of one TFRecord shard through its index; reopens per process.

    ``records_read`` and ``shards_scanned`` count, per process, the records read and the
    shards whose framing was walked for want of an index (what opening a pack must not do).
    """

    records_read = 0
    shards_scanned = 0

    def __init__(self, path: str | os.PathLike, verify: bool = True, index=None):
        self.path = Path(path)
        self.verify = verify
        self._index = index
        self._opened = None  # (pid, file, size): replaced whole, never changed in place

    @property
    def index(self) -> list[tuple[int, int]]:
        if self._index is None:
            ip = index_path(self.path)
            if ip.exists():
                self._index = read_index(ip)
            else:
                TFRecordShardReader.shards_scanned += 1
                self._index = scan_records(self.path)
        return self._index

    def _file(self) -> tuple[int, object, int]:
        """This process's open file and its size. Thread-engine workers share the reader, so
        the handle is one tuple each read holds locally: two threads opening at once each keep
        the file they opened alive for their read (a shared attribute would let one thread's
        open drop, and close, the file another thread is reading)."""
        opened = self._opened
        if opened is None or opened[0] != os.getpid():
            f = open(self.path, "rb", buffering=0)
            opened = (os.getpid(), f, os.fstat(f.fileno()).st_size)
            self._opened = opened
        return opened

    def __len__(self) -> int:
        return len(self.index)

    def _check_extent(self, i: int, offset: int, size: int, file_size: int) -> None:
        """A record the index places past the file's end is lost to a truncated copy."""
        if offset + size > file_size:
            raise CorruptSampleError(
                f"{self.path} record {i}: shard truncated: the index puts the record at bytes "
                f"{offset}-{offset + size}, the file has {file_size}"
            )

    def raw(self, i: int) -> bytes:
        offset, size = self.index[i]
        TFRecordShardReader.records_read += 1
        _, f, file_size = self._file()
        self._check_extent(i, offset, size, file_size)
        return os.pread(f.fileno(), size, offset)

    def __getitem__(self, i: int) -> Sample:
        where = f"{self.path} record {i}"
        data = unframe(self.raw(i), where, self.verify)
        try:
            feats = decode_example(data)
        except (ValueError, IndexError) as e:
            raise CorruptSampleError(f"{where}: unparseable Example ({e})") from e
        return sample_from_example(feats, where)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None and opened[0] == os.getpid():
            opened[1].close()

    def __getstate__(self):
        return {
            "path": self.path,
            "verify": self.verify,
            "_index": self._index,
            "_opened": None,
        }


register_pack_format(PackFormat("tfrecord", ".tfrecord", TFRecordShardWriter, TFRecordShardReader))


# --- ImageNet TFRecords written by TensorFlow's own script ---------------------------------

_TF_SHARD = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")
_TF_SPLITS = {"train": "train", "validation": "val"}
ADOPTED = "tensorflow imagenet script"


def looks_like_tf_imagenet(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(_TF_SHARD.match(p.name) for p in path.iterdir())


def tf_imagenet_shards(path: Path) -> dict[str, list[Path]]:
    """{our split name: its shards, sorted} for ``train-NNNNN-of-NNNNN`` / ``validation-...``."""
    shards: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        m = _TF_SHARD.match(p.name)
        if m:
            shards.setdefault(_TF_SPLITS[m.group(1)], []).append(p)
    return shards


def _records(path: Path):
    """Walk a TFRecord file front to back in one read → (offset, framed size, data)."""
    with open(path, "rb", buffering=1 << 20) as f:
        offset = 0
        while header := f.read(12):
            where = f"{path} record at byte {offset}"
            if len(header) < 12:
                raise CorruptSampleError(f"{where}: truncated header")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise CorruptSampleError(f"{where}: bad length CRC")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise CorruptSampleError(f"{where}: truncated record")
            yield offset, 16 + length, unframe(header + body, where)
            offset += 16 + length


def adopt_shard(path: str) -> dict:
    """Read one TF-made shard once: its DALI index (written beside it), record count, digest,
    and the {1-based label: synset} pairs its records name."""
    path = Path(path)
    index, synsets, digest, image_bytes = [], {}, 0, 0
    for i, (offset, size, data) in enumerate(_records(path)):
        where = f"{path} record {i}"
        try:
            feats = decode_example(data)
        except (ValueError, IndexError) as e:
            raise CorruptSampleError(f"{where}: unparseable Example ({e})") from e
        sample = sample_from_example(feats, where)
        synsets.setdefault(sample.label + 1, feats.get("image/class/synset", [b""])[0].decode())
        crc = google_crc32c.value(sample.image)
        digest = google_crc32c.extend(digest, crc.to_bytes(4, "big"))
        image_bytes += len(sample.image)
        index.append((offset, size))
    write_index(index, index_path(path))
    return {
        "file": path.name,
        "num_records": len(index),
        "image_bytes": image_bytes,
        "digest": f"{digest:08x}",
        "index": index_path(path).name,
        "synsets": synsets,
    }


def _adopted_classes(synsets: dict[int, str]) -> list[str]:
    """Labels 1..K of TF's script (0 is its unused background class) → K class names."""
    return [synsets.get(i) or str(i) for i in range(1, max(synsets, default=0) + 1)]


def adopt_tf_imagenet(path: str | os.PathLike, workers: int = 2, progress: bool = False) -> dict:
    """Read the shards made by TensorFlow's ImageNet script once, in parallel, and write a
    DALI index beside each and a ``manifest.json`` beside them: afterwards ``open_pack(path)``
    opens them without reading a record. Returns the manifest."""
    import multiprocessing as mp

    from tqdm import tqdm

    from datasvc.packs.manifest import FORMAT_VERSION, MANIFEST_NAME, write_json_atomic

    path = Path(path)
    shards = tf_imagenet_shards(path) if path.is_dir() else {}
    if not shards:
        raise PackError(f"{path}: no train-NNNNN-of-NNNNN or validation-NNNNN-of-NNNNN shards")
    files = [str(p) for ps in shards.values() for p in ps]
    total = sum(os.path.getsize(f) for f in files)
    records = {}
    with (
        mp.get_context("fork").Pool(max(1, min(workers, len(files)))) as pool,
        tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        for f, rec in zip(files, pool.imap(adopt_shard, files)):
            records[f] = rec
            bar.update(os.path.getsize(f))
    synsets = {}
    for rec in records.values():
        for label, syn in rec.pop("synsets").items():
            synsets.setdefault(label, syn)
    splits = {}
    for split, ps in shards.items():
        infos = [records[str(p)] for p in ps]
        n = sum(r["num_records"] for r in infos)
        splits[split] = {"num_samples": n, "shards": infos, "dir": "."}
    manifest = {
        "format": "tfrecord",
        "format_version": FORMAT_VERSION,
        "classes": _adopted_classes(synsets),
        "splits": splits,
        "adopted": ADOPTED,
    }
    try:
        write_json_atomic(path / MANIFEST_NAME, manifest)
    except OSError as e:
        raise PackError(f"{path}: cannot write {MANIFEST_NAME} there ({e.strerror or e})") from None
    return manifest
