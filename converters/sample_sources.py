"""An extracted tree (the built-in sample, say) rewritten as the files users download: ImageNet's
flat val folder with its ground truth, the ILSVRC2012 tarballs (a train tar of per-class tars, a
flat val tar, the devkit or Kaggle's CSV), Hugging Face-style parquet shards and webdataset
tars, all holding the same files. The tests and ``benchmarks.convert`` build their sources
with these."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return buf.getvalue()


def flatten_val(root: Path) -> dict:
    """Make ``root`` the tree as ImageNet extracts: train/<wnid>/ as it is, val/<wnid>/ files
    moved into a flat val/ as ILSVRC2012_val_<n>.JPEG, with the devkit's ground truth
    (gt.txt, synsets.txt); returns what the other layouts are built from."""
    wnids = sorted(os.listdir(root / "train"))
    val_files = sorted((root / "val").rglob("*.JPEG"))
    val = {}
    for n, p in enumerate(val_files, 1):
        val[f"ILSVRC2012_val_{n:08d}.JPEG"] = (p.read_bytes(), p.parent.name)
        p.unlink()
    for d in (root / "val").iterdir():
        d.rmdir()
    for name, (data, _) in val.items():
        (root / "val" / name).write_bytes(data)
    synsets = wnids[::-1]  # the devkit's ID order is not the sorted order
    (root / "gt.txt").write_text("".join(f"{synsets.index(w) + 1}\n" for _, w in val.values()))
    (root / "synsets.txt").write_text("".join(f"{w}\n" for w in synsets))
    train = {
        w: {
            str(p.relative_to(root / "train" / w)): p.read_bytes()
            for p in sorted((root / "train" / w).rglob("*"))
            if p.is_file()
        }
        for w in wnids
    }
    return {"root": root, "wnids": wnids, "synsets": synsets, "train": train, "val": val}


def _meta_mat(synsets: list[str]) -> bytes:
    """The devkit's data/meta.mat: leaf synsets by ILSVRC2012_ID, plus one inner node."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height",
              "num_train_images"]  # fmt: skip
    rows = [(i, w, f"class {w}", "", 0, 0, 10) for i, w in enumerate(synsets, 1)]
    rows.append((len(synsets) + 1, "n00001740", "entity", "", 3, 5, 0))
    arr = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for j, row in enumerate(rows):
        for f, v in zip(fields, row):
            arr[0, j][f] = np.array(v)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def ilsvrc_tarballs(src: dict, out: Path, labels: str = "devkit") -> Path:
    """ILSVRC2012_img_train.tar (a tar of <wnid>.tar), ILSVRC2012_img_val.tar (flat), and the
    devkit (``labels="devkit"``) or Kaggle's LOC_val_solution.csv (``"kaggle"``)."""
    out.mkdir(parents=True)
    with tarfile.open(out / "ILSVRC2012_img_train.tar", "w") as tar:
        for w in src["wnids"][::-1]:  # archive order is not sorted order
            _add(tar, f"{w}.tar", _tar_bytes(src["train"][w]))
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, (data, _) in src["val"].items():
            _add(tar, name, data)
    if labels == "devkit":
        gt = (src["root"] / "gt.txt").read_bytes()
        with tarfile.open(out / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
            _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(src["synsets"]))
    else:
        lines = ["ImageId,PredictionString"]
        lines += [f"{n[:-5]},{w} 10 20 100 200" for n, (_, w) in src["val"].items()]
        (out / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return out


def parquet_shards(src: dict, out: Path, row_group_size: int = 5) -> Path:
    """data/train-0000{0,1}-of-00002.parquet and data/validation-00000-of-00001.parquet, rows
    {image: {bytes, path}, label}, class names in the Hugging Face metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wnids = src["wnids"]
    # HF stores file names; one in a sub-folder keeps its whole tree key
    train = [
        (data, f"{w}/{name}" if "/" in name else name, label)
        for label, w in enumerate(wnids)
        for name, data in src["train"][w].items()
        if not name.endswith(".txt")
    ]
    rng = np.random.default_rng(0)
    train = [train[i] for i in rng.permutation(len(train))]  # HF's train files are shuffled
    val = [(d, n, wnids.index(w)) for n, (d, w) in src["val"].items()]
    names = {"info": {"features": {"label": {"names": wnids, "_type": "ClassLabel"}}}}
    meta = {b"huggingface": json.dumps(names).encode()}
    (out / "data").mkdir(parents=True)
    half = len(train) // 2
    for fname, rows in (
        ("train-00000-of-00002.parquet", train[:half]),
        ("train-00001-of-00002.parquet", train[half:]),
        ("validation-00000-of-00001.parquet", val),
    ):
        table = pa.table(
            {
                "image": [{"bytes": d, "path": n} for d, n, _ in rows],
                "label": pa.array([lab for _, _, lab in rows], pa.int64()),
            }
        ).replace_schema_metadata(meta)
        pq.write_table(table, out / "data" / fname, row_group_size=row_group_size)
    return out


def webdataset_tars(src: dict, out: Path) -> Path:
    """train-000{0,1}.tar and val-0000.tar: members <key>.<ext> and <key>.cls."""
    wnids = src["wnids"]
    train = [
        (f"{w}/{name}", data, label)
        for label, w in enumerate(wnids)
        for name, data in src["train"][w].items()
        if not name.endswith(".txt")
    ]
    val = [(n, d, wnids.index(w)) for n, (d, w) in src["val"].items()]
    out.mkdir(parents=True)
    half = len(train) // 2
    for fname, rows in (
        ("train-0000.tar", train[:half]),
        ("train-0001.tar", train[half:]),
        ("val-0000.tar", val),
    ):
        with tarfile.open(out / fname, "w") as tar:
            for name, data, label in rows:
                key = name.rsplit("/", 1)
                stem = (key[0] + "/" if len(key) == 2 else "") + key[-1].split(".", 1)[0]
                _add(tar, name, data)
                _add(tar, f"{stem}.cls", str(label).encode())
    return out
