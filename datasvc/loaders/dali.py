"""``dali_cpu`` and ``dali_gpu``: one DALI pipeline definition, fed from our sampler.

Sample ids and crop windows come from ``EpochSampler`` and ``train_crop`` (the same pure
functions as every other backend), so exactly-once and resume hold; DALI decodes only the crop
window (``decoders.image_slice``: libjpeg-turbo on CPU, nvJPEG with ``mixed``), resizes with
antialiasing and flips. ``dali_gpu`` runs the same graph with ``mixed``/GPU operators and
leaves the images on the GPU; without a GPU it fails at once with a clear message.
"""

from __future__ import annotations

import numpy as np
import torch

from datasvc.augment import TransformConfig, eval_geometry, train_crop
from datasvc.batch import Batch
from datasvc.corrupt import CorruptRecordError, read_sample
from datasvc.loaders import register_loader
from datasvc.loaders.base import Loader, default_workers, renamed
from datasvc.packs import open_pack
from datasvc.packs.readahead import read_ahead_for

INSTALL_HINT = (
    "NVIDIA DALI is not installed: pip install 'datasvc[dali]' "
    "(nvidia-dali-cuda120; or the [dali-cuda130] / [dali-cuda110] extras)"
)


def import_dali():
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return dali


def require_gpu(device_id: int | None) -> int:
    """The CUDA device to use, or a clear error when there is none."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise RuntimeError(
            "dali_gpu needs a CUDA GPU, and none is visible to this process "
            "(torch.cuda.is_available() is False); use the dali_cpu backend on CPU-only machines"
        )
    return 0 if device_id is None else int(device_id)


def build_pipeline(
    cfg: TransformConfig,
    *,
    device: str,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    source,
    prefetch: int = 2,
):
    """The pipeline both backends share: ``device`` is 'cpu' or 'gpu'.

    ``source(batch_info)`` returns (jpegs, labels, ids, anchors, shapes, flips) per train
    batch, anchors/shapes as (x, y)/(w, h) in source pixels, and (jpegs, labels, ids) per eval
    batch; it raises StopIteration at the end.
    """
    dali = import_dali()
    fn, types = dali.fn, dali.types
    decoder_device = "mixed" if device == "gpu" else "cpu"

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        py_start_method="fork",
    )
    def pipe():
        dtypes = [types.UINT8, types.INT64, types.INT64]
        dtypes += [types.FLOAT, types.FLOAT, types.INT32] if cfg.train else [types.FLOAT] * 2
        jpegs, labels, ids, *crop = fn.external_source(
            source=source, num_outputs=len(dtypes), batch=True, batch_info=True, dtype=dtypes
        )
        graph = _train_images if cfg.train else _eval_images
        images = graph(dali, jpegs, crop, decoder_device, cfg.image_size)
        return images, labels, ids

    return pipe()


def _train_images(dali, jpegs, crop, decoder_device: str, size: int):
    """Train graph: decode only the crop (ROI decode), resize it to ``size``, flip."""
    fn, types = dali.fn, dali.types
    anchors, shapes, flips = crop
    images = fn.decoders.image_slice(
        jpegs,
        anchors,
        shapes,
        device=decoder_device,
        output_type=types.RGB,
        normalized_anchor=False,
        normalized_shape=False,
        axis_names="WH",
    )
    images = fn.resize(
        images, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR
    )
    return fn.flip(images, horizontal=flips)


def _eval_images(dali, jpegs, crop, decoder_device: str, size: int):
    """Eval graph: sizes and crop offsets exactly as torchvision's Resize + CenterCrop compute."""
    fn, types = dali.fn, dali.types
    sizes, anchors = crop
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, size=sizes, antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.slice(
        images,
        anchors,
        np.array([size, size], np.float32),
        axis_names="WH",
        normalized_anchor=False,
        normalized_shape=False,
    )


def dali_inputs(cfg: TransformConfig, jpegs: list, labels, ids, geometry: list) -> tuple:
    """One batch of external-source inputs. ``geometry`` per sample: a ``Crop`` (train) or
    ``(resized h, resized w, top, left)`` (eval)."""
    enc = [np.frombuffer(j, np.uint8) for j in jpegs]
    lab = [np.array(x, np.int64) for x in labels]
    idx = [np.array(x, np.int64) for x in ids]
    if cfg.train:
        anchors = [np.array([c.left, c.top], np.float32) for c in geometry]
        shapes = [np.array([c.width, c.height], np.float32) for c in geometry]
        flips = [np.array(int(c.flip), np.int32) for c in geometry]
        return enc, lab, idx, anchors, shapes, flips
    sizes = [np.array([g[0], g[1]], np.float32) for g in geometry]  # fn.resize size is (H, W)
    anchors = [np.array([g[3], g[2]], np.float32) for g in geometry]
    return enc, lab, idx, sizes, anchors


def run_pipeline(
    cfg: TransformConfig,
    *,
    device: str,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    batches,
    count: int,
    prefetch: int = 2,
):
    """Yield ``count`` ``Batch`` objects; ``batches`` is an iterator of ``dali_inputs``."""

    def source(info):
        try:
            return next(batches)
        except StopIteration:
            raise StopIteration from None

    pipe = build_pipeline(
        cfg,
        device=device,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        source=source,
        prefetch=prefetch,
    )
    pipe.build()
    try:
        for _ in range(count):
            images, labels, ids = pipe.run()
            yield Batch(
                _images_to_torch(images, device, device_id),
                torch.from_numpy(np.array(labels.as_tensor())),
                torch.from_numpy(np.array(ids.as_tensor())),
            )
    finally:
        del pipe


def _images_to_torch(images, device: str, device_id: int | None) -> torch.Tensor:
    if device == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = images.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=f"cuda:{device_id}")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device_id))
        return out.permute(0, 3, 1, 2)
    return torch.from_numpy(np.array(images.as_tensor())).permute(0, 3, 1, 2)


class DaliLoader(Loader):
    """A DALI pipeline per epoch pass, fed batch by batch from the sampler's listing.

    ``num_workers`` is DALI's thread count; ``prefetch_factor`` its prefetch queue depth (DALI's
    threads build one batch together, so this is the batches in flight, default 2);
    ``read_ahead`` (default 'fadvise', or None) names the next batches' records to the kernel
    while the feeder reads the current one. ``workers`` and ``prefetch`` are their deprecated
    names."""

    device = "cpu"

    def __init__(
        self,
        source,
        *,
        split="train",
        num_workers: int | None = None,
        device_id: int | None = None,
        prefetch_factor: int | None = None,
        read_ahead: str | None = "fadvise",
        workers: int | None = None,
        prefetch: int | None = None,
        **common,
    ):
        num_workers = renamed("workers", "num_workers", workers, num_workers)
        prefetch_factor = renamed("prefetch", "prefetch_factor", prefetch, prefetch_factor)
        import_dali()
        self.device_id = require_gpu(device_id) if self.device == "gpu" else None
        self.pack = open_pack(source)
        self.split = self.pack.split(split)
        super().__init__(
            len(self.split),
            **common,
        )
        self.num_workers = max(1, num_workers or default_workers())
        self.prefetch_factor = max(1, prefetch_factor or 2)
        self.read_ahead = read_ahead
        self._spans: dict = {}

    def _read(self, ids) -> tuple[list[int], list]:
        """The batch's samples that read cleanly; corrupt ones raise or are skipped (DALI
        needs whole images, so damage is caught when the record is read, before decoding)."""
        kept, samples, skipped = [], [], []
        for sid in ids:
            try:
                samples.append(read_sample(self.split, int(sid)))
                kept.append(int(sid))
            except CorruptRecordError as e:
                if self.on_corrupt != "skip":
                    raise
                skipped.append(e.entry)
        self.ledger.add(skipped)
        if not samples:
            raise CorruptRecordError.from_entry(skipped[0])  # DALI cannot run an empty batch
        return kept, samples

    def _inputs(self, start: int, end: int, epoch: int):
        ra = read_ahead_for(
            self.split, self.sampler, start, end, self.read_ahead, spans=self._spans
        )
        try:
            for b in range(start, end):
                if ra is not None:
                    ra.fill()  # the feeder reads batch b; the kernel fetches the next ones
                inputs = self._batch_inputs(b, epoch)
                if ra is not None:
                    ra.done(b)
                yield inputs
        finally:
            if ra is not None:
                ra.close()

    def _batch_inputs(self, b: int, epoch: int) -> tuple:
        """External-source inputs of batch ``b``: its samples' bytes and crop geometry."""
        cfg = self.cfg
        ids, samples = self._read(self.sampler.batch(b))
        if cfg.train:
            geo = [
                train_crop(cfg, self.seed, epoch, int(i), s.height, s.width)
                for i, s in zip(ids, samples)
            ]
        else:
            geo = [eval_geometry(cfg, s.height, s.width) for s in samples]
        return dali_inputs(cfg, [s.image for s in samples], [s.label for s in samples], ids, geo)

    def _batches(self, start: int):
        end = len(self.sampler)
        if start >= end:
            return
        yield from run_pipeline(
            self.cfg,
            device=self.device,
            batch_size=self.batch_size,
            num_threads=self.num_workers,
            device_id=self.device_id,
            batches=self._inputs(start, end, self.sampler.epoch),
            count=end - start,
            prefetch=self.prefetch_factor,
        )


@register_loader("dali_cpu")
class DaliCpuLoader(DaliLoader):
    """DALI on CPU threads (``device_id=None``); ``num_workers`` is DALI's thread count."""

    backend = "dali_cpu"
    device = "cpu"


@register_loader("dali_gpu")
class DaliGpuLoader(DaliLoader):
    """DALI with nvJPEG (``mixed``) and GPU resize/flip; images arrive on the GPU."""

    backend = "dali_gpu"
    device = "gpu"
