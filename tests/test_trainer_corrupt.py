"""Training through damaged records: a digits pack with two train records and one val record
whose bytes were flipped after conversion. Two gloo ranks under torchrun finish with ``custom``
and with ``remote``, report the damaged ids with their shards, and reach the usual accuracy;
with ``on_corrupt=raise`` or past ``max_corrupt`` the job stops with the records named.

The digits config's learning rate is the stable one (0.05 peak, a 2-epoch warm-up): at twice
that the first two epochs sat at chance and the outcome swung with any change to the data
(clean pack: 96.9% with seed 0, 90.3% with seed 1; with the two train records left out, seed 0:
77.2%), which is why these runs once halved it themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.damage import copy_pack, damage_records
from tests.test_trainer import CONFIGS, ROOT, _env, _records, _run, _torchrun

TRAIN_DAMAGED = [10, 1000]  # one in each train shard (1437 records in 2 shards)
VAL_DAMAGED = [50]


@pytest.fixture(scope="module")
def damaged_digits(tmp_path_factory):
    """(pack, expected train entries, expected val entries)."""
    from tests.digits import make_digits_pack

    clean = make_digits_pack(tmp_path_factory.mktemp("digits"))
    pack = copy_pack(clean, tmp_path_factory.mktemp("damaged") / "pack")
    train = damage_records(pack, "train", TRAIN_DAMAGED)
    val = damage_records(pack, "val", VAL_DAMAGED)
    return pack, train, val


def _named(entries):
    return [(e["id"], e["shard"], e["record"]) for e in entries]


def _check_run(out: Path, stdout: str, train: list, val: list) -> None:
    """Finished with every epoch's damaged records reported and the usual accuracy."""
    recs = _records(out / "metrics.jsonl")
    skipped = [r for r in recs if r["kind"] == "skipped"]
    vals = [r for r in recs if r["kind"] == "val"]
    assert len(skipped) == len(vals) == 6  # every epoch: both train records (on either rank)
    assert all(_named(r["records"]) == _named(train) for r in skipped)
    assert all(r["count"] == 360 - 1 and r["skipped"] == 1 for r in vals)  # not in the denominator
    assert all(_named(r["skipped_records"]) == _named(val) for r in vals)
    assert vals[-1]["top1"] >= 90.0, vals[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert _named(summary["skipped"]["train"]) == _named(train)
    line = f"1 skipped as corrupt: 50 ({val[0]['shard']} record {val[0]['record']})"
    assert line in stdout
    assert f"2 skipped as corrupt: 10 ({train[0]['shard']} record {train[0]['record']})" in stdout


@pytest.mark.slow
def test_torchrun_custom_trains_through_damaged_records(damaged_digits, tmp_path):
    pack, train, val = damaged_digits
    out = tmp_path / "custom"
    cmd = _torchrun(out, "unused", "data.backend=custom", f"data.source={pack}")
    cmd += ["data.max_corrupt=2", "data.options={}"]
    _check_run(out, _run(cmd), train, val)


@pytest.mark.slow
def test_torchrun_remote_trains_through_damaged_records(damaged_digits, tmp_path):
    from datasvc.service.local import LocalServer

    pack, train, val = damaged_digits
    out = tmp_path / "remote"
    with LocalServer([f"digits={pack}"], workers=1) as server:
        stdout = _run(_torchrun(out, server.endpoint, "data.max_corrupt=2"))
    _check_run(out, stdout, train, val)


def _train_one_process(pack: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(CONFIGS / "digits.yaml")]
    cmd += ["data.backend=custom", f"data.source={pack}", f"train.out_dir={out}", "train.epochs=1"]
    return subprocess.run(
        [*cmd, *extra], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_on_corrupt_raise_stops_the_job_naming_the_record(damaged_digits, tmp_path):
    pack, train, _ = damaged_digits
    p = _train_one_process(pack, tmp_path / "raise", "data.on_corrupt=raise")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "corrupt record: sample " in p.stderr
    first = next(e for e in train if f"sample {e['id']} " in p.stderr)
    assert f"{first['shard']} record {first['record']}" in p.stderr


@pytest.mark.slow
def test_past_max_corrupt_the_job_stops_with_a_clear_error(damaged_digits, tmp_path):
    pack, train, _ = damaged_digits
    p = _train_one_process(pack, tmp_path / "cap", "data.max_corrupt=1")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "2 corrupt records skipped this epoch, more than max_corrupt allows" in p.stderr
    for e in train:
        assert f"{e['id']} ({e['shard']} record {e['record']})" in p.stderr
