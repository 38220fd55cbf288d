"""`datasvc bench` end to end on a small pack: the JSON schema, the table and the plot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.slow
def test_bench_writes_json_table_and_plot(clean_pack, tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    cmd = [
        sys.executable,
        "-m",
        "datasvc.cli",
        "bench",
        str(clean_pack),
        "--backends",
        "custom,torch,torch_tensor,dali_native,dali_gpu,remote",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "16",
        "--image-size",
        "64",
        "--workers",
        "1",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    by = {x["backend"]: x for x in res["results"]}
    assert set(by) == {"custom", "torch", "torch_tensor", "dali_native", "dali_gpu", "remote"}
    for name in ("custom", "torch", "torch_tensor", "remote"):
        row = by[name]
        assert row["status"] == "ok" and row["images_per_s"] > 0
        assert 0 < row["cpu_util"] <= 1.5 and row["peak_rss_mb"] > 0
        assert len(row["memory_mb_per_epoch"]) == 4  # warm-up + 3 timed epochs
    assert "tensor decode" in by["torch_tensor"]["note"]
    if by["dali_native"]["status"] == "ok":  # DALI installed (the default extras)
        assert by["dali_native"]["images_per_s"] > 0 and "own reader" in by["dali_native"]["note"]
        assert by["custom"]["vs_dali_native"] > 0
    else:
        assert "DALI" in by["dali_native"]["reason"]
    # dali_gpu runs exactly where DALI and a GPU are there; elsewhere it says which is missing
    if _has_dali() and torch.cuda.is_available():
        assert by["dali_gpu"]["status"] == "ok" and by["dali_gpu"]["images_per_s"] > 0
    else:
        assert by["dali_gpu"]["status"] == "unavailable"
        assert ("GPU" if _has_dali() else "DALI") in by["dali_gpu"]["reason"]
    # pixels, label and id, plus a share of the msgpack header: uint8 all the way
    assert 64 * 64 * 3 + 16 <= by["remote"]["bytes_per_image"] < 64 * 64 * 3 + 64
    assert res["decode_limit"]["images_per_s"] > 0
    assert res["config"]["workers"] == 1 and "machine" in res
    assert "| custom |" in r.stdout and "decode limit" in r.stdout
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_bench_io_writes_storage_tables_and_json(clean_pack, tmp_path):
    """`datasvc bench --io` on a tiny pack: the pack mirrored to TFRecord and exported as files,
    each read warm and cold; the cold epochs really started cold (mincore < 10%)."""
    out, png = tmp_path / "io.json", tmp_path / "io.png"
    # Its own copy: pages that another process of this session has mapped (the shared pack's LMDB
    # environments stay open in the test process) cannot be dropped, so it could never be cold.
    pack = tmp_path / "pack"
    shutil.copytree(clean_pack, pack)
    cmd = [sys.executable, "-m", "datasvc.cli", "bench", "--io", str(pack)]
    cmd += ["--repeats", "1", "--batch-size", "8", "--image-size", "32", "--workers", "1"]
    cmd += ["--read-ahead-methods", "fadvise,thread", "--json", str(out), "--plot", str(png)]
    env = {**os.environ, "DATASVC_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {(x["storage"], x["cache"]): x for x in res["storage"]}
    assert set(rows) == {(s, c) for s in ("lmdb", "tfrecord", "folder") for c in ("warm", "cold")}
    for (storage, cache), row in rows.items():
        assert row["mb_per_s"] > 0 and row["records_per_s"] > 0 and row["images_per_s"] > 0
        assert (row["read_ahead_mb_per_s"] is None) == (storage == "folder")
        assert row["loader"] == ("custom" if storage != "folder" else "torch (ImageFolder, PIL)")
        if cache == "cold":
            assert row["resident_before"] < 0.10, row  # it really was cold
        else:
            assert row["resident_before"] > 0.90, row
    ahead = {(x["storage"], x["read_ahead"]): x for x in res["read_ahead"]}
    assert set(ahead) == {
        (s, m) for s in ("lmdb", "tfrecord") for m in ("none", "fadvise", "thread")
    }
    for row in ahead.values():
        assert row["resident_before"] < 0.10 and row["cold_vs_warm"] > 0
        assert row["warm_resident_before"] > 0.90
    cfg = res["config"]
    assert cfg["images"] == 64 and cfg["workers"] == 1 and "commit" in res and "machine" in res
    # the three storages hold the same bytes
    assert rows["lmdb", "warm"]["rounds"][0]["mb_per_s"] > 0
    assert "| lmdb | cold |" in r.stdout and "| tfrecord | fadvise |" in r.stdout
    assert png.stat().st_size > 1000


def test_compare_takes_ratios_within_each_round():
    """benchmarks.compare: after/before per backend and the within-tree ratios, round by round."""
    from benchmarks.compare import round_row, summarize

    def report(custom, torch, limit):
        ok = [{"backend": "custom", "status": "ok", "images_per_s": custom}]
        ok += [{"backend": "torch", "status": "ok", "images_per_s": torch}]
        ok += [{"backend": "dali_cpu", "status": "unavailable", "reason": "not installed"}]
        return {"results": ok, "decode_limit": {"images_per_s": limit}}

    rows = [
        round_row(report(100, 50, 200), report(120, 40, 200)),
        round_row(report(10, 5, 20), report(9, 5, 20)),  # a slow round: ratios, not rates
        round_row(report(100, 25, 100), report(100, 25, 100)),
    ]
    assert rows[0]["after_over_before"] == {"custom": 1.2, "torch": 0.8, "decode_limit": 1.0}
    assert rows[0]["after"] == {"custom/decode_limit": 0.6, "custom/torch": 3.0}
    assert "custom/dali_cpu" not in rows[0]["before"]  # an unavailable backend gives no ratio
    med = summarize(rows)
    assert med["after_over_before"]["custom"] == 1.0  # median of 1.2, 0.9, 1.0
    assert med["before"]["custom/torch"] == 2.0 and med["after"]["custom/torch"] == 3.0
