"""Crop-segment batches: the server's cut and the client's decode give server decoding's
pixels, bit for bit, for a whole epoch, in fewer bytes than the images."""

from __future__ import annotations

import numpy as np
import pytest

from datasvc import decode
from datasvc.augment import TransformConfig
from datasvc.batch import fill_batch
from datasvc.packs import open_pack
from datasvc.sampling import EpochSampler
from datasvc.segments import cut_batch, decode_batch

pytestmark = pytest.mark.skipif(
    decode._jpegcrop is None, reason="the crop decoder did not build (make install builds it)"
)


@pytest.mark.parametrize("image_size", [64, 224])
def test_whole_epoch_same_pixels_as_server_decoding(clean_pack, image_size):
    split = open_pack(clean_pack).split("train")
    cfg = TransformConfig(train=True, image_size=image_size)
    sampler = EpochSampler(len(split), 8, seed=5)
    sampler.set_epoch(2)
    cut_images, sent_bytes, seen = 0, 0, []
    for b in range(len(sampler)):
        ids = sampler.batch(b)
        want = np.empty((len(ids), image_size, image_size, 3), np.uint8)
        want_labels = np.empty(len(ids), np.int64)
        fill_batch(split, ids, cfg, 5, 2, want, want_labels)

        meta, jpegs = cut_batch(split, ids, cfg, 5, 2)
        got = np.zeros_like(want)
        got_labels = np.empty_like(want_labels)
        got_ids = decode_batch(meta, b"".join(jpegs), cfg, got, got_labels)

        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_labels, want_labels)
        np.testing.assert_array_equal(got_ids, ids)
        for sid, jpeg in zip(ids, jpegs):
            whole = split[int(sid)].image
            cut_images += len(jpeg) < len(whole)
            sent_bytes += len(jpeg)
        seen.extend(got_ids.tolist())
    assert len(seen) == len(set(seen)) == len(sampler) * 8
    assert cut_images > len(seen) // 2, "most crops leave segments out"
    whole_bytes = sum(len(split[i].image) for i in seen)
    assert sent_bytes < whole_bytes


def test_eval_is_refused_and_bad_replies_raise(clean_pack):
    split = open_pack(clean_pack).split("train")
    cfg = TransformConfig(train=True, image_size=32)
    with pytest.raises(ValueError, match="train batches"):
        cut_batch(split, np.arange(2), TransformConfig(train=False, image_size=32), 0, 0)
    meta, jpegs = cut_batch(split, np.arange(2), cfg, 0, 0)
    images, labels = np.empty((2, 32, 32, 3), np.uint8), np.empty(2, np.int64)
    with pytest.raises(ValueError, match="past the reply's end"):
        decode_batch(meta, b"".join(jpegs)[:-10], cfg, images, labels)
    with pytest.raises(ValueError, match="announced for a batch"):
        decode_batch(meta, b"".join(jpegs), cfg, images[:1], labels[:1])


def test_cutting_decodes_nothing(clean_pack, monkeypatch):
    """The server's half walks markers only: with every decoding entry point broken it still
    cuts the whole batch."""

    class CutOnly:
        cut_segments = staticmethod(decode._jpegcrop.cut_segments)
        info = staticmethod(decode._jpegcrop.info)

        def __getattr__(self, name):
            raise AssertionError(f"_jpegcrop.{name} called while cutting")

    def no_decoding(*a, **k):
        raise AssertionError("decoded while cutting")

    split = open_pack(clean_pack).split("train")
    monkeypatch.setattr(decode, "_jpegcrop", CutOnly())
    monkeypatch.setattr(decode, "decode_full", no_decoding)
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", no_decoding)
    meta, jpegs = cut_batch(split, np.arange(16), TransformConfig(train=True), 0, 0)
    assert len(meta) == len(jpegs) == 16
