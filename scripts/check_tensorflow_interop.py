"""TensorFlow interop check (TensorFlow is not a test dependency: ~600 MB). In an environment
with tensorflow-cpu and this project importable:

    python scripts/check_tensorflow_interop.py PACK   # a pack converted with --format tfrecord

1. TensorFlow's TFRecordDataset (CRC-checked) and parse_single_example read our shards, with the
   ImageNet script's schema; labels, synsets and sizes agree with the manifest.
2. Our reader reads records written by TensorFlow's own TFRecordWriter and tf.train.Example.
"""

import glob
import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
pack = sys.argv[1]
# 1. TensorFlow reads our shards (its own CRC checks on), with the ImageNet script's schema.
files = sorted(glob.glob(f"{pack}/train/*.tfrecord"))
feat = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/synset": tf.io.FixedLenFeature([], tf.string),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
}
man = json.load(open(f"{pack}/manifest.json"))
n = 0
for rec in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(rec, feat)
    img = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
    assert img.shape[0] == int(ex["image/height"]) and img.shape[1] == int(ex["image/width"])
    assert (
        man["classes"][int(ex["image/class/label"]) - 1]
        == ex["image/class/synset"].numpy().decode()
    )
    n += 1
print("TensorFlow", tf.__version__, "read", n, "records of our shards; labels and sizes agree")
# 2. Our reader reads shards written by TensorFlow's own TFRecordWriter and tf.train.Example.
from datasvc.packs import open_pack  # noqa: E402 - after the sys.path line

src = open_pack(pack).split("train")
import tempfile  # noqa: E402

out = tempfile.mkdtemp(prefix="tfwritten-")
with tf.io.TFRecordWriter(f"{out}/train-00000-of-00001") as w:
    for i in range(20):
        s = src[i]
        ex = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[s.image])
                    ),
                    "image/class/label": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[s.label + 1])
                    ),
                    "image/class/synset": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[man["classes"][s.label].encode()])
                    ),
                    "image/height": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[s.height])
                    ),
                    "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[s.width])),
                    "image/filename": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[s.key.encode()])
                    ),
                    "image/object/bbox/xmin": tf.train.Feature(
                        float_list=tf.train.FloatList(value=[0.1, 0.2])
                    ),
                }
            )
        )
        w.write(ex.SerializeToString())
got = open_pack(out).split("train")
assert len(got) == 20 and all(
    got[i].image == src[i].image and got[i].label == src[i].label for i in range(20)
)
print("our reader read 20 records written by TensorFlow's TFRecordWriter: bytes and labels agree")
