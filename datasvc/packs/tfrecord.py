"""TFRecord shards: real framing (length, masked CRC32C, data, masked CRC32C) of
``tf.train.Example`` messages in the schema of TensorFlow's ImageNet conversion script, with a
DALI index (``<offset> <size>`` per line) beside each shard."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import google_crc32c

from datasvc.packs import CorruptSampleError, PackFormat, Sample, register_pack_format

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
    """Random-access reader of one TFRecord shard through its index; reopens per process."""

    def __init__(self, path: str | os.PathLike, verify: bool = True, index=None):
        self.path = Path(path)
        self.verify = verify
        self._index = index
        self._f = None
        self._pid = None

    @property
    def index(self) -> list[tuple[int, int]]:
        if self._index is None:
            ip = index_path(self.path)
            self._index = read_index(ip) if ip.exists() else scan_records(self.path)
        return self._index

    def _file(self):
        if self._pid != os.getpid():
            self._f = open(self.path, "rb", buffering=0)
            self._pid = os.getpid()
        return self._f

    def __len__(self) -> int:
        return len(self.index)

    def raw(self, i: int) -> bytes:
        offset, size = self.index[i]
        return os.pread(self._file().fileno(), size, offset)

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
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = self._pid = None

    def __getstate__(self):
        return {
            "path": self.path,
            "verify": self.verify,
            "_index": self._index,
            "_f": None,
            "_pid": None,
        }


register_pack_format(PackFormat("tfrecord", ".tfrecord", TFRecordShardWriter, TFRecordShardReader))


# --- ImageNet TFRecords written by TensorFlow's own script ---------------------------------

_TF_SHARD = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")


def looks_like_tf_imagenet(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(_TF_SHARD.match(p.name) for p in path.iterdir())


def adopt_tf_imagenet(path: str | os.PathLike):
    """Open a folder of ``train-NNNNN-of-NNNNN`` / ``validation-...`` shards made by TensorFlow's
    ImageNet script as a read-only pack (split ``validation`` is also named ``val``).

    Record offsets come from a DALI ``.idx`` file beside a shard when present, otherwise from
    one walk over the framing. The class list is rebuilt from the records' synsets.
    """
    from datasvc.packs import Pack, Split

    path = Path(path)
    shards: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        m = _TF_SHARD.match(p.name)
        if m:
            shards.setdefault(m.group(1), []).append(p)
    synsets: dict[int, str] = {}
    splits = {}
    readers = {}
    for split, paths in shards.items():
        infos = []
        for p in paths:
            reader = TFRecordShardReader(p)
            for i in range(len(reader)):
                feats = decode_example(unframe(reader.raw(i), f"{p} record {i}"))
                label = int(feats["image/class/label"][0])
                syn = feats.get("image/class/synset", [b""])[0].decode()
                synsets.setdefault(label, syn)
            infos.append({"file": p.name, "num_records": len(reader)})
            readers[p] = reader.index
        splits[split] = {"num_samples": sum(s["num_records"] for s in infos), "shards": infos}
    classes = [synsets.get(i, str(i)) for i in range(1, max(synsets, default=0) + 1)]

    pack = Pack.__new__(Pack)
    pack.path = path
    pack.manifest = {
        "format": "tfrecord",
        "format_version": 1,
        "classes": classes,
        "splits": splits,
        "adopted": "tensorflow imagenet script",
    }
    pack.format = None
    pack.classes = classes
    pack._splits = {}
    for split, info in list(splits.items()):
        ps = [path / s["file"] for s in info["shards"]]
        sp = Split(split, ps, [s["num_records"] for s in info["shards"]], TFRecordShardReader)
        sp._readers = [TFRecordShardReader(p, index=readers[p]) for p in ps]
        pack._splits[split] = sp
        if split == "validation":
            pack._splits["val"] = sp
            pack.manifest["splits"]["val"] = info
    return pack
