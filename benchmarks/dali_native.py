"""``dali_native``: DALI at its best, written as DALI's own users write it — a benchmark entry,
not a loader backend.

``fn.readers.tfrecord`` reads our TFRecord pack through its DALI index with DALI's own
shuffling, ``fn.decoders.image_random_crop`` decodes only a random crop window (fused),
``fn.resize`` and a random flip follow, with ``num_threads`` = workers. It keeps none of our
sampler's promises (its own shuffle buffer, not a permutation of ``(seed, epoch)``; no
exactly-once over ranks, no resume from a cursor; crops drawn by DALI, not a pure function of
the sample id), which is why it is not a backend; the loaders table shows it beside
``dali_cpu`` (DALI fed by our sampler) so that the ratio users read is against DALI at its best.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.loaders import time_epochs


def native_pipeline(tfrecord_pack, split: str, batch_size: int, image_size: int, threads: int):
    """The pipeline of DALI's ImageNet examples, on CPU: reader → fused crop decode → resize →
    flip. Returns (pipeline, batches per epoch)."""
    from datasvc.loaders.dali import import_dali
    from datasvc.packs import open_pack
    from datasvc.packs.tfrecord import index_path

    dali = import_dali()
    import nvidia.dali.tfrecord as tfrec

    fn, types = dali.fn, dali.types
    sp = open_pack(tfrecord_pack).split(split)
    paths = [str(p) for p in sp.shard_paths]
    indices = [str(index_path(p)) for p in sp.shard_paths]

    @dali.pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=0)
    def pipe():
        rec = fn.readers.tfrecord(
            path=paths,
            index_path=indices,
            features={
                "image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1),
            },
            random_shuffle=True,
            initial_fill=min(1024, len(sp)),
            name="Reader",
        )
        images = fn.decoders.image_random_crop(
            rec["image/encoded"],
            device="cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
        )
        images = fn.resize(
            images,
            resize_x=image_size,
            resize_y=image_size,
            antialias=True,
            interp_type=types.INTERP_LINEAR,
        )
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        return images, rec["image/class/label"] - 1  # TF's schema counts labels from 1

    p = pipe()
    p.build()
    return p, len(sp) // batch_size


def bench_dali_native(tfrecord_pack, a, workers: int, epochs: int, warmup: int, monitor) -> dict:
    """Like ``bench_backend``: ``warmup`` untimed epochs, then ``epochs`` timed ones; each batch
    is turned into a torch tensor as the ``dali_cpu`` backend does."""
    import torch

    try:
        pipe, per_epoch = native_pipeline(
            Path(tfrecord_pack), a.split, a.batch_size, a.image_size, workers
        )
    except (ImportError, RuntimeError) as e:
        return {"status": "unavailable", "reason": str(e).splitlines()[0]}

    def one_epoch(epoch: int) -> int:
        n = 0
        for _ in range(per_epoch):
            images, labels = pipe.run()
            batch = torch.from_numpy(np.array(images.as_tensor())).permute(0, 3, 1, 2)
            n += len(batch)
        return n

    return time_epochs(one_epoch, monitor, workers, epochs, warmup)  # pipe freed on return
