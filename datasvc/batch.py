"""The Batch contract and the one function that builds a batch from sample ids."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from datasvc.augment import TransformConfig, train_crop
from datasvc.decode import DecodeError, decode_eval, decode_train, image_size
from datasvc.packs import CorruptSampleError


class Batch(NamedTuple):
    """``images`` uint8 N×3×S×S RGB (channels-last in memory), ``labels`` int64 N, ``ids``
    int64 N (indices into the pack's split)."""

    images: object
    labels: object
    ids: object


def fill_batch(
    split,
    ids: np.ndarray,
    cfg: TransformConfig,
    seed: int,
    epoch: int,
    images: np.ndarray,
    labels: np.ndarray,
    decoder: str | None = None,
) -> None:
    """Decode and augment the samples ``ids`` of ``split`` into ``images`` (N×S×S×3 uint8)
    and ``labels`` (N int64). Augmentation is a pure function of (seed, epoch, id)."""
    for i, sid in enumerate(ids):
        sample = split[int(sid)]
        h, w = (sample.height, sample.width) if sample.height else image_size(sample.image)
        try:
            if cfg.train:
                crop = train_crop(cfg, seed, epoch, int(sid), h, w)
                decode_train(sample.image, crop, h, w, images[i], decoder, cfg.fast_decode)
            else:
                decode_eval(sample.image, cfg, h, w, images[i])
        except DecodeError as e:
            raise CorruptSampleError(f"sample {int(sid)} ({sample.key}): {e}") from None
        labels[i] = sample.label
