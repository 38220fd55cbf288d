"""Crop-segment batches (``decode="client"``): the server cuts, per train image, the restart
segments of its segmented JPEG that cover the crop; the client decodes them.

A train crop of a 500x375 ImageNet JPEG covers a fraction of its segments, so the bytes per
image on the wire are a fraction of the JPEG's and far below the 150 KB of a uint8 224x224x3
image, and the server does no decoding at all (marker walking only). The client decodes with
the same libjpeg calls on the same bytes as server decoding, so the pixels are bit-identical.
"""

from __future__ import annotations

import numpy as np

from datasvc.augment import Crop, TransformConfig, train_crop
from datasvc.decode import DecodeError, cut_train_crop, decode_train_cut, image_size
from datasvc.packs import CorruptSampleError

#: Per image in a reply's ``meta``: these fields, in this order.
META_FIELDS = (
    "id",
    "label",
    "nbytes",
    "height",
    "width",
    "top",
    "left",
    "crop_h",
    "crop_w",
    "flip",
)


def cut_batch(
    split, ids: np.ndarray, cfg: TransformConfig, seed: int, epoch: int
) -> tuple[list[list[int]], list[bytes]]:
    """Samples ``ids`` of ``split`` → (one ``META_FIELDS`` row per image, the cut JPEGs)."""
    if not cfg.train:
        raise ValueError("crop segments are for train batches; eval batches are decoded")
    meta, jpegs = [], []
    for sid in ids:
        sample = split[int(sid)]
        h, w = (sample.height, sample.width) if sample.height else image_size(sample.image)
        crop = train_crop(cfg, seed, epoch, int(sid), h, w)
        jpeg, moved = cut_train_crop(sample.image, crop, cfg.image_size, cfg.fast_decode)
        if jpeg is not sample.image:
            h, w = _cut_size(jpeg)
        meta.append([int(sid), int(sample.label), h, w, len(jpeg), *moved[:4], int(moved.flip)])
        jpegs.append(jpeg)
    return meta, jpegs


def _cut_size(jpeg: bytes) -> tuple[int, int]:
    """The cut JPEG's height and width, from its SOF (the cut keeps the original's headers)."""
    from datasvc.decode import _jpegcrop

    w, h, _, _ = _jpegcrop.info(jpeg)
    return h, w


def decode_batch(
    meta: list, blob, cfg: TransformConfig, images: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """The client's half: ``meta`` rows and the concatenated JPEGs → ``images`` (N×S×S×3
    uint8) and ``labels``; returns the sample ids. Raises ``CorruptSampleError`` naming the
    sample whose bytes do not decode."""
    if len(meta) != len(images):
        raise ValueError(f"{len(meta)} images announced for a batch of {len(images)}")
    view = memoryview(blob)
    offset = 0
    ids = np.empty(len(meta), np.int64)
    for i, (sid, label, h, w, nbytes, top, left, ch, cw, flip) in enumerate(meta):
        if offset + nbytes > len(view):
            raise ValueError(f"sample {sid}: {nbytes} bytes announced past the reply's end")
        jpeg = view[offset : offset + nbytes]
        offset += nbytes
        try:
            decode_train_cut(
                jpeg, Crop(top, left, ch, cw, bool(flip)), h, w, images[i], cfg.fast_decode
            )
        except DecodeError as e:
            raise CorruptSampleError(f"sample {sid}: {e}") from None
        labels[i] = label
        ids[i] = sid
    return ids
