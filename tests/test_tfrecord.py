"""TFRecord interop: DALI reads our shards; we read shards laid out as TensorFlow's ImageNet
script writes them, encoded here by the protobuf library rather than by our own encoder."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from datasvc.packs import PackError, open_pack
from datasvc.packs.tfrecord import (
    TFRecordShardReader,
    decode_example,
    frame,
    masked_crc,
    scan_records,
    unframe,
)
from datasvc.packs.verify import verify_pack
from tests.test_packs import cli


def _example_class():
    """tf.train.Example built from its .proto definition with the protobuf runtime."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tf_example_test.proto", package="tftest", syntax="proto3"
    )

    bl = fdp.message_type.add(name="BytesList")
    bl.field.add(name="value", number=1, type=F.TYPE_BYTES, label=F.LABEL_REPEATED)
    fl = fdp.message_type.add(name="FloatList")
    f = fl.field.add(name="value", number=1, type=F.TYPE_FLOAT, label=F.LABEL_REPEATED)
    f.options.packed = True
    il = fdp.message_type.add(name="Int64List")
    f = il.field.add(name="value", number=1, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    f.options.packed = True
    feat = fdp.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for num, (name, tname) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")], 1
    ):
        feat.field.add(
            name=name,
            number=num,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=f".tftest.{tname}",
            oneof_index=0,
        )
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tftest.Feature",
    )
    feats.field.add(
        name="feature",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".tftest.Features.FeatureEntry",
    )
    ex = fdp.message_type.add(name="Example")
    ex.field.add(
        name="features",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tftest.Features",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Example"))


def _tf_script_example(Example, image: bytes, label: int, synset: str, name: str, h: int, w: int):
    """The features of TensorFlow's build_imagenet_data.py, bounding boxes included."""
    ex = Example()
    f = ex.features.feature

    def b(k, v):
        f[k].bytes_list.value.append(v)

    def i(k, v):
        f[k].int64_list.value.append(v)

    i("image/height", h)
    i("image/width", w)
    b("image/colorspace", b"RGB")
    i("image/channels", 3)
    i("image/class/label", label)
    b("image/class/synset", synset.encode())
    b("image/class/text", b"tench, Tinca tinca")
    f["image/object/bbox/xmin"].float_list.value.extend([0.1, 0.2])
    f["image/object/bbox/xmax"].float_list.value.extend([0.9, 0.8])
    f["image/object/bbox/label"].int64_list.value.extend([label, label])
    b("image/format", b"JPEG")
    b("image/filename", name.encode())
    b("image/encoded", image)
    return ex.SerializeToString()


def _write_tf_shards(tmp_path, clean_pack):
    """Two train shards and one validation shard as TensorFlow's script writes them (the
    protobuf runtime encodes them); returns the pack they came from and what they hold."""
    Example = _example_class()
    src = open_pack(clean_pack)
    expected = {"train": [], "val": []}
    layout = [("train", 0, 2, range(0, 10)), ("train", 1, 2, range(10, 20))]
    layout.append(("validation", 0, 1, range(0, 3)))
    for tf_split, shard, count, rows in layout:
        ours = "val" if tf_split == "validation" else "train"
        split = src.split(ours)
        with open(tmp_path / f"{tf_split}-{shard:05d}-of-{count:05d}", "wb") as f:
            for k in rows:
                s = split[k]
                name = s.key.split("/")[-1]
                data = _tf_script_example(
                    Example, s.image, s.label + 1, src.classes[s.label], name, s.height, s.width
                )
                f.write(frame(data))
                expected[ours].append((s.image, s.label, name))
    return src, expected


def test_adopt_tensorflow_script_shards(tmp_path, clean_pack):
    """`datasvc adopt` reads TF-made shards once; then they open without reading a record."""
    src, expected = _write_tf_shards(tmp_path, clean_pack)
    with pytest.raises(PackError, match=r"datasvc adopt"):
        open_pack(tmp_path)
    r = cli("convert", tmp_path, tmp_path.parent / "tf-pack", check=False)
    assert r.returncode == 1 and f"run `datasvc adopt {tmp_path}` once" in r.stderr
    r = cli("adopt", tmp_path, "--workers", "2", "-q")
    assert "wrote" in r.stdout and (tmp_path / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.glob("*.idx")) == [
        "train-00000-of-00002.idx",
        "train-00001-of-00002.idx",
        "validation-00000-of-00001.idx",
    ]
    before = (TFRecordShardReader.records_read, TFRecordShardReader.shards_scanned)
    pack = open_pack(tmp_path)
    sizes = {name: len(pack.split(name)) for name in pack.splits}
    assert (TFRecordShardReader.records_read, TFRecordShardReader.shards_scanned) == before
    assert sizes == {"train": 20, "val": 3}
    # TF's labels are 1-based with an unused 0: the class list is the source's, by label
    assert pack.classes == src.classes
    assert "format='tfrecord'" in repr(pack)
    for name, rows in expected.items():
        split = pack.split(name)
        got = [(s.image, s.label, s.key) for s in (split[k] for k in range(len(split)))]
        assert got == rows
    assert TFRecordShardReader.records_read == before[0] + 23
    assert verify_pack(tmp_path).ok
    assert "tfrecord" in cli("inspect", tmp_path).stdout


def test_adopt_names_what_it_cannot_read(tmp_path, clean_pack):
    _write_tf_shards(tmp_path, clean_pack)
    shard = tmp_path / "train-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:-100])
    r = cli("adopt", tmp_path, "-q", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "train-00001-of-00002" in r.stderr and "truncated" in r.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_our_examples_parse_with_protobuf(tfrecord_pack):
    Example = _example_class()
    path = sorted(glob.glob(str(tfrecord_pack / "train" / "*.tfrecord")))[0]
    offset, size = scan_records(path)[0]
    with open(path, "rb") as f:
        f.seek(offset)
        data = unframe(f.read(size), path)
    ex = Example.FromString(data)
    ours = decode_example(data)
    feats = ex.features.feature
    assert feats["image/encoded"].bytes_list.value[0] == ours["image/encoded"][0]
    assert feats["image/class/label"].int64_list.value[0] == ours["image/class/label"][0] >= 1
    assert feats["image/height"].int64_list.value[0] > 0


def test_framing_crc_is_tensorflows():
    # CRC32C's check value is 0xE3069283; TensorFlow masks it as rotr15 + 0xA282EAD8.
    assert masked_crc(b"123456789") == 0xC78AB0E5
    rec = frame(b"abc")
    assert unframe(rec, "x") == b"abc"
    bad = bytearray(rec)
    bad[-1] ^= 1
    with pytest.raises(Exception, match="CRC"):
        unframe(bytes(bad), "x")


@pytest.mark.dali
def test_dali_reads_our_shards(tfrecord_pack):
    dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    import nvidia.dali.fn as fn
    import nvidia.dali.tfrecord as tfrec

    pack = open_pack(tfrecord_pack)
    files = sorted(glob.glob(str(tfrecord_pack / "train" / "*.tfrecord")))
    index = [f[: -len(".tfrecord")] + ".idx" for f in files]
    by_key = {}
    train = pack.split("train")
    for i in range(len(train)):
        s = train[i]
        by_key[s.key] = s

    @dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        inp = fn.readers.tfrecord(
            path=files,
            index_path=index,
            random_shuffle=False,
            name="reader",
            features={
                "image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1),
                "image/filename": tfrec.FixedLenFeature((), tfrec.string, ""),
            },
        )
        img = fn.decoders.image(inp["image/encoded"], device="cpu")
        return img, inp["image/class/label"], inp["image/filename"]

    p = pipe()
    p.build()
    n = p.epoch_size("reader")
    assert n == len(train)
    seen = 0
    while seen < n:
        imgs, labels, names = p.run()
        for j in range(len(labels)):
            if seen >= n:
                break
            key = bytes(np.array(names[j])).decode()
            s = by_key[key]
            assert int(np.array(labels[j])[0]) == s.label + 1
            assert np.array(imgs[j]).shape == (s.height, s.width, 3)
            seen += 1


def test_threads_first_reading_a_shard_at_once_all_read_it(tfrecord_pack):
    """The thread engine's workers share one reader: several meeting a shard for the first time
    together each open it. Each read must keep the file it opened; when a later open replaced a
    shared handle, an earlier thread's file could close under it (EBADF in CI)."""
    import threading

    shard = sorted(glob.glob(str(tfrecord_pack / "train" / "*.tfrecord")))[0]
    expected = TFRecordShardReader(shard).raw(0)
    threads, rounds = 8, 200
    errors = []
    for _ in range(rounds):
        reader = TFRecordShardReader(shard)
        _ = reader.index  # the race is in opening the file, not in reading the index
        start = threading.Barrier(threads)

        def read(reader=reader, start=start):
            start.wait()
            try:
                assert reader.raw(0) == expected
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(e))

        pool = [threading.Thread(target=read) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        reader.close()
    assert not errors, f"{len(errors)} of {threads * rounds} reads failed, e.g. {errors[0]}"
