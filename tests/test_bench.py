"""`datasvc bench` end to end on a small pack: the JSON schema, the table and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
        "custom,torch,dali_gpu,remote",
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
    assert set(by) == {"custom", "torch", "dali_gpu", "remote"}
    for name in ("custom", "torch", "remote"):
        row = by[name]
        assert row["status"] == "ok" and row["images_per_s"] > 0
        assert 0 < row["cpu_util"] <= 1.5 and row["peak_rss_mb"] > 0
        assert len(row["memory_mb_per_epoch"]) == 4  # warm-up + 3 timed epochs
    assert by["dali_gpu"]["status"] == "unavailable" or by["dali_gpu"]["status"] == "ok"
    if by["dali_gpu"]["status"] == "unavailable":
        assert by["dali_gpu"]["reason"]
    # pixels, label and id, plus a share of the msgpack header: uint8 all the way
    assert 64 * 64 * 3 + 16 <= by["remote"]["bytes_per_image"] < 64 * 64 * 3 + 64
    assert res["decode_limit"]["images_per_s"] > 0
    assert res["config"]["workers"] == 1 and "machine" in res
    assert "| custom |" in r.stdout and "decode limit" in r.stdout
    assert png.stat().st_size > 1000
