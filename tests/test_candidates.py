"""The plan's columnar candidate table: it gives the candidates a list of them gave, pickles
compactly, stays small per image, and leaves every listing digest and shard plan as it was."""

from __future__ import annotations

import pickle
from pathlib import Path

import google_crc32c
import pytest

from converters.convert import ConvertConfig, make_plan
from converters.sources import SourceOptions
from converters.sample_sources import ilsvrc_tarballs, parquet_shards, webdataset_tars

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _fake_src(root: Path) -> dict:
    """A tiny ImageNet-like source of few-byte files (listing reads no image): ImageNet's
    names, a nested folder, a non-ASCII name, an ignored file, a flat val out of order."""
    train = {w: {f"{w}_{i}.JPEG": bytes([65 + i]) * i for i in range(1, 13)} for w in WNIDS}
    train[WNIDS[1]]["nested/deep.jpeg"] = b"d"
    train[WNIDS[2]]["\u00e9t\u00e9_\u00fc.JPEG"] = b"u"
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": (b"v" * n, WNIDS[n % 3]) for n in range(9, 0, -1)}
    for w, files in train.items():
        for name, data in files.items():
            (root / "train" / w / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "train" / w / name).write_bytes(data)
    (root / "train" / WNIDS[0] / "README.txt").write_text("not an image")
    (root / "val").mkdir()
    for name, (data, _) in val.items():
        (root / "val" / name).write_bytes(data)
    lines = ["ImageId,PredictionString"] + [f"{n[:-5]},{w} 1 2 3 4" for n, (_, w) in val.items()]
    (root.parent / "val.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "wnids": WNIDS, "synsets": WNIDS, "train": train, "val": val}


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> dict[str, tuple[Path, SourceOptions]]:
    base = tmp_path_factory.mktemp("plan")
    src = _fake_src(base / "tree")
    return {
        "tree": (src["root"], SourceOptions(val_labels=str(base / "val.csv"))),
        "ilsvrc": (ilsvrc_tarballs(src, base / "ilsvrc", labels="kaggle"), SourceOptions()),
        "parquet": (parquet_shards(src, base / "parquet", row_group_size=4), SourceOptions()),
        "webdataset": (webdataset_tars(src, base / "wds"), SourceOptions()),
    }


def _shards_digest(jobs) -> str:
    crc = 0
    for job in jobs:
        for c in job.candidates:
            line = f"{job.split}\t{job.index}/{job.count}\t{c.path}\t{c.label}\t{c.loc}\n"
            crc = google_crc32c.extend(crc, line.encode())
    return f"{crc:08x}"


# Taken with the list-of-Candidate plan (before the columnar table): a resume of a conversion
# started then must find the same plan.json and the same shards.
SAME = {
    "train": {"candidates": 38, "listing": "1c667f7e"},
    "val": {"candidates": 9, "listing": "f8c817b7"},
}
PINNED = {
    "tree": (SAME, "24d56cb1"),
    "ilsvrc": (SAME, "a5d1e01d"),
    "parquet": (
        {
            "train": {"candidates": 38, "listing": "183f6eb6"},
            "val": {"candidates": 9, "listing": "dc9b7657"},
        },
        "b14b35fd",
    ),
    "webdataset": (SAME, "16899b25"),
}


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_listing_digest_and_shards_are_as_before(kind, fake_sources):
    src, opts = fake_sources[kind]
    planned = make_plan(src, ConvertConfig(shards=3), opts)
    got = (planned.plan["splits"], _shards_digest(planned.jobs))
    assert got == PINNED[kind]
