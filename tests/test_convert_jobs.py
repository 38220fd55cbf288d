"""Spreading a conversion: array jobs (--jobs/--job-index, then --finalize), resumes after
SIGKILL, and the Ray engine; each gives the pack one process-engine run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from converters.convert import ConvertConfig, convert, make_plan
from converters.engines import ProgressFeed
from converters.sources import SourceOptions
from datasvc.packs import open_pack
from datasvc.packs.manifest import MANIFEST_NAME
from datasvc.packs.verify import verify_pack
from tests.conftest import TEST_MAX_PIXELS, make_tree
from tests.test_packs import ROOT, cli
from tests.test_sources import records, shard_digests


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("jobs") / "src", classes=8, per_class=80,
                     val_per_class=4, oddities=False)  # fmt: skip


@pytest.fixture(scope="module")
def one_job_pack(big_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "pack"
    convert(big_tree, out, ConvertConfig(shards=16, workers=2), progress=False)
    return out


def _job_args(src: Path, out: Path, index: int) -> list[str]:
    return [sys.executable, "-m", "datasvc.cli", "convert", str(src), str(out), "--shards", "16",
            "--workers", "1", "--jobs", "2", "--job-index", str(index), "-q"]  # fmt: skip


def _kill_midway(args: list[str], done: Path, at_least: int) -> None:
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.exists() and len(list(done.glob("*.json"))) >= at_least:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_array_jobs_then_finalize_equal_one_job(big_tree, one_job_pack, tmp_path):
    out = tmp_path / "pack"
    done = out / ".convert" / "done"
    _kill_midway(_job_args(big_tree, out, 0), done, at_least=2)
    killed = len(list(done.glob("*.json")))
    assert 2 <= killed < 16, "job 0 (16 of the 32 shards) should have been killed midway"
    r = subprocess.run(_job_args(big_tree, out, 0), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    assert "--finalize" in r.stdout and not (out / MANIFEST_NAME).exists()
    mine = sorted(p.name for p in done.glob("*.json"))
    assert mine == [f"{s}-{i:05d}.json" for s in ("train", "val") for i in range(0, 16, 2)]
    # the progress bar of any job counts every job's finished shards, from the done records
    planned = make_plan(big_tree, ConvertConfig(shards=16), SourceOptions())
    feed = ProgressFeed(out, planned.jobs, enabled=False)
    job0 = sum(len(j.candidates) for j in planned.jobs if j.index % 2 == 0)
    assert feed.done_images() == job0 and 0 < job0 < feed.total == 640 + 32
    feed.close()

    r = cli("convert", big_tree, out, "--shards", "16", "--finalize", "-q", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "16 of 32 shards are not finished" in r.stderr and "train-00001-of-00016" in r.stderr
    assert "train-00015-of-00016" in r.stderr and "train-00002-of-00016" not in r.stderr
    assert not (out / MANIFEST_NAME).exists()

    r = subprocess.run(_job_args(big_tree, out, 1), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli("convert", big_tree, out, "--shards", "16", "--finalize", "-q")
    assert records(out) == records(one_job_pack)
    assert shard_digests(out) == shard_digests(one_job_pack)
    a = json.loads((out / MANIFEST_NAME).read_text())["splits"]
    b = json.loads((one_job_pack / MANIFEST_NAME).read_text())["splits"]
    assert a == b and verify_pack(out).ok


def test_finalize_without_any_job_says_to_run_them(big_tree, tmp_path):
    r = cli("convert", big_tree, tmp_path / "none", "--finalize", "-q", check=False)
    assert r.returncode == 1 and "no conversion was started there" in r.stderr


@pytest.mark.slow
def test_ray_engine_equals_process_engine(tmp_path):
    """The embedded local Ray (2 CPUs) writes the same shards as the process engine."""
    src = make_tree(tmp_path / "src", classes=3, per_class=10, val_per_class=2)
    cfg = {"shards": 3, "max_pixels": TEST_MAX_PIXELS}
    ref = tmp_path / "proc"
    convert(src, ref, ConvertConfig(**cfg), progress=False)
    out = tmp_path / "ray"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = cli("convert", src, out, "--engine", "ray", "--workers", "2", "--shards", "3",
            "--max-pixels", TEST_MAX_PIXELS, env=env)  # fmt: skip
    assert "train:" in r.stdout
    assert records(out) == records(ref) and shard_digests(out) == shard_digests(ref)
    assert open_pack(out).manifest["audit"] == open_pack(ref).manifest["audit"]
    left = [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")]
    assert not [p for p in left if p.ppid() == os.getpid()], "Ray left processes running"
