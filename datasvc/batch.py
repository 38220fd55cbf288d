"""The Batch contract and the one function that builds a batch from sample ids."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from datasvc.augment import TransformConfig, train_crop
from datasvc.corrupt import CorruptRecordError, OnCorrupt, corrupt_record, read_sample
from datasvc.decode import DecodeError, decode_eval, decode_train, image_size


class Batch(NamedTuple):
    """One batch, as every loader backend yields it (``images, labels, ids = batch``).

    Args:
        images: uint8 RGB, shape ``(N, 3, S, S)`` (N = batch size, S = image size), values
            0..255, not normalized. The memory is channels-last: ``images`` is a permuted view
            of an ``(N, S, S, 3)`` buffer, so ``images.is_contiguous()`` is False and
            ``images.is_contiguous(memory_format=torch.channels_last)`` is True. Pass it as is
            to a model in channels-last format (``model.to(memory_format=torch.channels_last)``,
            the fast layout for convolutions on GPUs), or call ``images.contiguous()`` for a
            contiguous NCHW copy; ``images.permute(0, 2, 3, 1)`` is the NHWC array without a
            copy. On ``dali_gpu`` it is already on the GPU.
        labels: int64, shape ``(N,)``: 0-based class indices (the pack's ``classes`` order).
        ids: int64, shape ``(N,)``: the samples' ids, indices into the pack's split (what
            augmentation is drawn from, with the seed and the epoch).

    A loader may lend ``images`` from a shared slot that it reuses once every view of it has
    been dropped; keep a batch as long as you need it, or copy it.
    """

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
