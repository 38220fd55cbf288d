"""The Batch contract and the one function that builds a batch from sample ids."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from datasvc.augment import TransformConfig, train_crop
from datasvc.corrupt import CorruptRecordError, OnCorrupt, corrupt_record, read_sample
from datasvc.decode import DecodeError, decode_eval, decode_train, image_size


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
    on_corrupt: OnCorrupt = "raise",
) -> tuple[np.ndarray, list[dict]]:
    """Decode and augment the samples ``ids`` of ``split`` into ``images`` (N×S×S×3 uint8)
    and ``labels`` (N int64). Augmentation is a pure function of (seed, epoch, id).

    Returns the ids filled (rows ``0..k-1``) and the skipped-record entries: a corrupt record
    raises ``CorruptRecordError`` (``on_corrupt="raise"``) or is left out (``"skip"``)."""
    kept: list[int] = []
    skipped: list[dict] = []
    for sid in ids:
        try:
            labels[len(kept)] = _fill_one(
                split, int(sid), cfg, seed, epoch, images[len(kept)], decoder
            )
        except CorruptRecordError as e:
            if on_corrupt != "skip":
                raise
            skipped.append(e.entry)
            continue
        kept.append(int(sid))
    return np.asarray(kept, np.int64), skipped


def _fill_one(split, sid: int, cfg, seed: int, epoch: int, out: np.ndarray, decoder) -> int:
    """One sample into ``out``; returns its label."""
    sample = read_sample(split, sid)
    try:
        h, w = (sample.height, sample.width) if sample.height else image_size(sample.image)
        if cfg.train:
            crop = train_crop(cfg, seed, epoch, sid, h, w)
            decode_train(sample.image, crop, h, w, out, decoder, cfg.fast_decode)
        else:
            decode_eval(sample.image, cfg, h, w, out)
    except DecodeError as e:
        raise corrupt_record(split, sid, f"undecodable image ({sample.key}): {e}") from None
    return sample.label
