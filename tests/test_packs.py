"""Packs: round trips, the audit of odd files, class order, verify, determinism, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from converters.convert import ConvertConfig, convert
from datasvc.augment import TransformConfig, train_crop
from datasvc.decode import CROP_DECODER, _jpegcrop, decode_train
from datasvc.packs import PackError, open_pack
from datasvc.packs.manifest import MANIFEST_NAME
from datasvc.packs.verify import verify_pack
from tests.conftest import TEST_MAX_PIXELS, make_tree, odd_files

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, check=True, **kw):
    r = subprocess.run(
        [sys.executable, "-m", "datasvc.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"datasvc {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.mark.parametrize("fmt", ["lmdb", "tfrecord"])
def test_round_trip(fmt, tree, request):
    pack = open_pack(request.getfixturevalue(f"{fmt}_pack"))
    assert pack.manifest["format"] == fmt
    train = pack.split("train")
    rejected = {json.loads(l)["path"] for l in open(pack.path / "train" / "rejected.jsonl")}
    candidates = [p for p in (tree / "train").rglob("*") if p.is_file() and p.suffix != ".txt"]
    assert len(train) + len(rejected) == len(candidates)
    seen = set()
    for i in range(len(train)):
        s = train[i]
        src = tree / "train" / s.key
        seen.add(s.key)
        assert pack.classes[s.label] == s.key.split("/")[0]
        arr = simplejpeg.decode_jpeg(s.image)
        assert arr.shape == (s.height, s.width, 3)
        data = src.read_bytes()
        if Image.open(src).format == "JPEG" and Image.open(src).mode == "RGB":
            # clean JPEGs pass through losslessly: the same pixels, in restart segments
            assert np.array_equal(arr, simplejpeg.decode_jpeg(data))
            if CROP_DECODER == "turbo_crop":
                assert _jpegcrop.layout(s.image) is not None, s.key
    assert seen.isdisjoint(rejected) and len(seen) == len(train)
    val = pack.split("val")
    assert len(val) == pack.manifest["splits"]["val"]["num_samples"] == 4 * 3


def test_jpeg_layouts(clean_tree, clean_pack, tmp_path):
    """--jpeg-layout original stores clean JPEGs byte for byte; the default, segmented, stores
    the same coefficients in restart segments: every crop decodes to the same pixels."""
    cli("convert", clean_tree, tmp_path / "o", "--jpeg-layout", "original", "-q")
    original, segmented = open_pack(tmp_path / "o"), open_pack(clean_pack)
    assert original.manifest["options"]["jpeg_layout"] == "original"
    assert segmented.manifest["options"]["jpeg_layout"] == "segmented"
    o, g = original.split("train"), segmented.split("train")
    assert len(o) == len(g) > 0
    cfg = TransformConfig.build(True, 64)
    out_o, out_g = np.empty((64, 64, 3), np.uint8), np.empty((64, 64, 3), np.uint8)
    clean = 0
    for i in range(len(o)):
        a, b = o[i], g[i]
        src = clean_tree / "train" / a.key
        assert a.key == b.key
        if Image.open(src).format != "JPEG" or Image.open(src).mode != "RGB":
            continue  # converted oddities: re-encoded in either layout
        clean += 1
        assert a.image == src.read_bytes()
        assert np.array_equal(simplejpeg.decode_jpeg(a.image), simplejpeg.decode_jpeg(b.image))
        for epoch in range(3):
            crop = train_crop(cfg, 0, epoch, i, a.height, a.width)
            for fast in (False, True):
                decode_train(a.image, crop, a.height, a.width, out_o, fast=fast)
                decode_train(b.image, crop, b.height, b.width, out_g, fast=fast)
                assert np.array_equal(out_o, out_g), (a.key, crop, fast)
    assert clean > 0
    with pytest.raises(ValueError, match="jpeg_layout"):
        ConvertConfig(jpeg_layout="tiles")


def test_oddities_handled(lmdb_pack):
    pack = open_pack(lmdb_pack)
    audit = pack.manifest["splits"]["train"]["audit"]
    rejected = [json.loads(l) for l in open(lmdb_pack / "train" / "rejected.jsonl")]
    by_name = {Path(r["path"]).name: r["reason"] for r in rejected}
    expected = odd_files(np.random.default_rng(0))
    train = pack.split("train")
    stored = {Path(train[i].key).name: train[i] for i in range(len(train))}
    for name, (_, outcome) in expected.items():
        if outcome.startswith("reject:"):
            assert name in by_name, f"{name} should be rejected"
            assert by_name[name].startswith(outcome[7:]), by_name[name]
            assert "/" in [r["path"] for r in rejected if r["path"].endswith(name)][0]
        else:
            s = stored[name]  # converted to an RGB JPEG, same size
            img = Image.open(__import__("io").BytesIO(s.image))
            assert img.format == "JPEG" and img.mode == "RGB"
            assert audit["converted"].get(outcome, 0) >= 1, (outcome, audit)
    assert audit["rejected"] == 4 and audit["ignored"] == 1  # README.txt
    assert "nested/deep.jpeg" in "".join(stored[n].key for n in stored if n == "deep.jpeg")
    cmyk = simplejpeg.decode_jpeg(stored["odd_cmyk.JPEG"].image).astype(float)
    assert cmyk.mean() > 40  # inverted Adobe CMYK would come out nearly black or white


def test_class_index_matches_torchvision(tree, lmdb_pack):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(tree / "train", allow_empty=True)
    pack = open_pack(lmdb_pack)
    assert pack.classes == ds.classes
    targets = {os.path.relpath(p, tree / "train"): t for p, t in ds.samples}
    train = pack.split("train")
    for i in range(len(train)):
        s = train[i]
        assert targets[s.key] == s.label


def test_strict_fails_on_rejection(tree, tmp_path):
    r = cli(
        "convert",
        tree,
        tmp_path / "p",
        "--strict",
        "--max-pixels",
        TEST_MAX_PIXELS,
        "-q",
        check=False,
    )
    assert r.returncode == 1 and "rejected" in r.stderr
    assert not (tmp_path / "p" / MANIFEST_NAME).exists()


def test_deterministic(tree, tmp_path, lmdb_pack):
    out = tmp_path / "again"
    convert(
        tree, out, ConvertConfig(shards=3, max_pixels=TEST_MAX_PIXELS, workers=1), progress=False
    )
    a = json.loads((lmdb_pack / MANIFEST_NAME).read_text())
    b = json.loads((out / MANIFEST_NAME).read_text())
    assert a["splits"] == b["splits"]


def _flip_image_byte(path: Path, image: bytes) -> None:
    data = bytearray(path.read_bytes())
    mid = len(image) // 2
    at = data.find(image[mid : mid + 64])
    assert at > 0
    data[at + 10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", ["lmdb", "tfrecord"])
def test_verify_catches_flipped_byte(fmt, request, tmp_path):
    src = request.getfixturevalue(f"{fmt}_pack")
    pack_dir = tmp_path / "pack"
    shutil.copytree(src, pack_dir)
    assert cli("verify", pack_dir, "-q").returncode == 0
    pack = open_pack(pack_dir)
    victim = pack.split("train")[5]
    shard, local = pack.split("train").locate(5)
    shard_path = pack.split("train").shard_paths[shard]
    pack.split("train").close()
    _flip_image_byte(shard_path, victim.image)
    r = cli("verify", pack_dir, "-q", check=False)
    assert r.returncode == 1
    assert shard_path.name in r.stderr and f"record {local}" in r.stderr, r.stderr
    report = verify_pack(pack_dir)
    assert not report.ok


def test_reader_refuses_unknown_version(lmdb_pack, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(lmdb_pack, d)
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["format_version"] = 99
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(PackError, match=r"format_version 99.*format_version 1"):
        open_pack(d)


def test_flat_val_with_labels_csv(tmp_path, clean_tree):
    src = tmp_path / "src"
    shutil.copytree(clean_tree / "train", src / "train")
    (src / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for p in sorted((clean_tree / "val").rglob("*.JPEG")):
        shutil.copy(p, src / "val" / p.name)
        rows.append(f"{p.stem},{p.parent.name} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "pack"
    cli("convert", src, out, "--val-labels", tmp_path / "LOC_val_solution.csv", "-q")
    pack = open_pack(out)
    val = pack.split("val")
    assert len(val) == 12
    for i in range(len(val)):
        s = val[i]
        assert (clean_tree / "val" / pack.classes[s.label] / s.key).exists()


def test_resume_after_kill9(tmp_path):
    """kill -9 mid-conversion; the re-run keeps finished shards and ends identical."""
    src = make_tree(tmp_path / "src", classes=8, per_class=80, val_per_class=4, oddities=False)
    out = tmp_path / "pack"
    args = [
        sys.executable,
        "-m",
        "datasvc.cli",
        "convert",
        str(src),
        str(out),
        "--shards",
        "16",
        "--workers",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True)
    done = out / ".convert" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and len(list(done.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    finished = sorted(done.glob("*.json"))
    assert 3 <= len(finished) < 20, "the conversion should have been interrupted midway"
    assert not (out / MANIFEST_NAME).exists()
    kept = {}
    for rec in finished:
        f = json.loads(rec.read_text())["file"]
        st = (out / f.split("-")[0] / f).stat()
        kept[f] = (st.st_ino, st.st_mtime_ns)
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    for f, stamp in kept.items():
        st = (out / f.split("-")[0] / f).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, f"{f} was rewritten"
    ref = tmp_path / "ref"
    convert(src, ref, ConvertConfig(shards=16, workers=2), progress=False)
    a = json.loads((out / MANIFEST_NAME).read_text())["splits"]
    b = json.loads((ref / MANIFEST_NAME).read_text())["splits"]
    assert a == b
    assert verify_pack(out).ok
    assert not list(out.rglob("*.partial"))


def test_sigterm_stops_conversion_cleanly(tmp_path):
    """SIGTERM to the converter alone: it stops like Ctrl-C (exit 130), its workers go with
    it, and the same command finishes the pack."""
    import psutil

    src = make_tree(tmp_path / "src", classes=6, per_class=60, val_per_class=2, oddities=False)
    out = tmp_path / "pack"
    args = [sys.executable, "-m", "datasvc.cli", "convert", str(src), str(out),
            "--shards", "12", "--workers", "2", "-q"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    done = out / ".convert" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and len(list(done.glob("*.json"))) >= 2:
            break
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers left behind: {alive}"
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    assert verify_pack(out).ok
