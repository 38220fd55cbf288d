"""``datasvc convert``: registered with the ``datasvc`` CLI through the ``datasvc.commands``
entry point (pyproject.toml), so that the reading side never imports the converter."""

from __future__ import annotations

import argparse

from converters.layout import JPEG_LAYOUTS
from datasvc.cli import Command
from datasvc.errors import UsageError

HELP = (
    "convert the ImageNet you downloaded (the extracted tree, the ILSVRC2012 tarballs, "
    "parquet or webdataset shards) into an LMDB or TFRecord pack"
)


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "src",
        help="SRC/<split>/<class>/<image> tree, or the folder holding ILSVRC2012_img_train.tar "
        "and ILSVRC2012_img_val.tar (+ devkit or LOC_val_solution.csv), parquet shards "
        "(train-*.parquet) or webdataset tars (train-*.tar): detected from what is there",
    )
    c.add_argument("out")
    c.add_argument("--format", default="lmdb", choices=["lmdb", "tfrecord"])
    c.add_argument("--split", action="append", help="split to convert (repeatable)")
    c.add_argument("--shards", type=int, default=None, help="shards per split")
    c.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--max-side", type=int, default=None, help="store longest side at most PX")
    c.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    c.add_argument("--max-pixels", type=int, default=178_956_970, help="decompression-bomb cap")
    c.add_argument("--strict", action="store_true", help="any rejected file is an error")
    c.add_argument("--seed", type=int, default=0, help="seed of the train shard order")
    c.add_argument(
        "--jpeg-layout",
        default="segmented",
        choices=JPEG_LAYOUTS,
        help="segmented (default): re-encode JPEGs losslessly (same pixels) with restart "
        "markers, so that a random crop entropy-decodes only its part; original: keep the "
        "files' bytes",
    )
    c.add_argument(
        "--val-labels",
        help="labels of a flat val folder (LOC_val_solution.csv or "
        "ILSVRC2012_validation_ground_truth.txt)",
    )
    c.add_argument("--val-synsets", help="devkit ID → wnid list, with the ground-truth file")
    s = c.add_argument_group("parquet and webdataset sources")
    s.add_argument("--classes", help="class names, one per line (line i = label i)")
    s.add_argument("--image-column", default="image", help="parquet column of image bytes")
    s.add_argument("--label-column", default="label", help="parquet column of integer labels")
    s.add_argument("--key-column", help="parquet column of file names (default: image.path)")
    r = c.add_argument_group("spreading the work")
    r.add_argument("--engine", default="process", choices=["process", "ray"])
    r.add_argument(
        "--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    r.add_argument("--jobs", type=int, default=1, help="array jobs sharing the work (N)")
    r.add_argument("--job-index", type=int, default=0, help="this job's number, 0..N-1")
    r.add_argument(
        "--finalize",
        action="store_true",
        help="after the array jobs: check every shard and write manifest.json",
    )


def _config(a):
    from converters.convert import ConvertConfig
    from converters.sources import SourceOptions

    try:
        cfg = ConvertConfig(
            format=a.format,
            shards=a.shards,
            shard_size=a.shard_size,
            workers=a.workers,
            max_side=a.max_side,
            quality=a.quality,
            max_pixels=a.max_pixels,
            strict=a.strict,
            seed=a.seed,
            jpeg_layout=a.jpeg_layout,
            engine=a.engine,
            ray_address=a.ray_address,
            jobs=a.jobs,
            job_index=a.job_index,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    opts = SourceOptions(
        tuple(a.split) if a.split else None,
        a.val_labels,
        a.val_synsets,
        a.classes,
        a.image_column,
        a.label_column,
        a.key_column,
    )
    return cfg, opts


def summary_lines(manifest: dict) -> list[str]:
    lines = []
    for name, s in manifest["splits"].items():
        au = s["audit"]
        line = (
            f"{name}: {s['num_samples']} images in {len(s['shards'])} shards; passed "
            f"{au['passed']}, converted {au['converted']}, rejected {au['rejected']}, "
            f"ignored {au['ignored']}"
        )
        if au.get("reached_twice"):
            line += f"; {au['reached_twice']} path(s) reached twice (symlink loop?), counted once"
        lines.append(line)
    return lines


def run(a) -> int:
    from converters.convert import convert

    cfg, opts = _config(a)
    m = convert(a.src, a.out, cfg, progress=not a.quiet, source=opts, finalize=a.finalize)
    if "splits" not in m:  # one of several array jobs
        print(
            f"job {m['job_index']} of {m['jobs']}: its {m['shards']} shards are done; when every "
            f"job is, run: datasvc convert {a.src} {a.out} --finalize (same options)"
        )
        return 0
    print("\n".join(summary_lines(m)))
    print(f"wrote {a.out}/manifest.json")
    return 0


COMMAND = Command(HELP, add_arguments, run)
