"""The corrupt-record policy: one behaviour for every backend (skip or raise, the skipped list,
the per-epoch cap, exactly-once accounting) and damaged shard files found at open, never a
signal."""

from __future__ import annotations

import faulthandler
import json
import logging
import subprocess
import sys
import time

import pytest

from converters.convert import ConvertConfig, convert
from datasvc.corrupt import CorruptLedger, CorruptRecordError, TooManyCorruptError, corrupt_limit
from datasvc.loaders import create_loader
from tests.damage import copy_pack, damage_records, overwrite_pages, truncate_shard

DAMAGED = [5, 40]  # train ids of the clean pack (64 samples in 2 shards) whose bytes are flipped


@pytest.fixture(scope="module")
def damaged(clean_pack, tmp_path_factory):
    """A copy of the clean pack with two records damaged after conversion, and their entries."""
    pack = copy_pack(clean_pack, tmp_path_factory.mktemp("damaged") / "pack")
    return pack, damage_records(pack, "train", DAMAGED)


def _no_reason(entries):
    return sorted(
        ({k: e[k] for k in ("id", "shard", "record")} for e in entries), key=lambda e: e["id"]
    )


def _epoch(loader):
    """Every id delivered in one epoch, and the batch sizes."""
    ids, sizes = [], []
    for images, labels, batch_ids in loader:
        assert images.shape[0] == labels.shape[0] == batch_ids.shape[0]
        ids += batch_ids.tolist()
        sizes.append(len(batch_ids))
    return ids, sizes


# DALI runs in a subprocess (test_dali_cpu_follows_the_policy): a torch DataLoader forked
# after DALI's threads started in the same process can crash.
BACKENDS = [("custom", {"engine": "process"}), ("custom", {"engine": "thread"}), ("torch", {})]


# --- the ledger --------------------------------------------------------------------------------


def test_limit_is_a_count_or_a_fraction():
    assert corrupt_limit(None, 10_000) == 10  # default 0.1%
    assert corrupt_limit(0.01, 1_000) == 10
    assert corrupt_limit(3, 10) == 3
    assert corrupt_limit(0, 10) == 0
    for bad in (-1, 1.5, "1", True):
        with pytest.raises((ValueError, TypeError)):
            corrupt_limit(bad, 10)


def test_ledger_logs_each_record_once_and_names_them_past_the_cap(caplog):
    ledger = CorruptLedger(1000, max_corrupt=2)
    ledger.start_epoch(0)
    e = [{"id": i, "shard": "s-0.lmdb", "record": i, "reason": "CRC"} for i in (7, 8, 9)]
    with caplog.at_level(logging.WARNING, logger="datasvc.corrupt"):
        ledger.add(e[:1])
        ledger.add(e[:2])  # 7 again: counted and logged once
    assert [r.getMessage().count("sample 7") for r in caplog.records] == [1, 0]
    assert len(ledger.entries) == 2
    with pytest.raises(TooManyCorruptError, match=r"3 corrupt records.*\b9 \(s-0.lmdb record 9\)"):
        ledger.add(e)
    ledger.start_epoch(1)
    assert ledger.entries == []


# --- every backend, one policy -------------------------------------------------------------------


@pytest.mark.parametrize("backend,opts", BACKENDS)
def test_skip_reports_each_damaged_record_and_delivers_the_rest_once(damaged, backend, opts):
    pack, expected = damaged
    loader = create_loader(
        backend, pack, batch_size=8, train=False, num_workers=2, on_corrupt="skip",
        max_corrupt=2, **opts,
    )  # fmt: skip
    try:
        ids, sizes = _epoch(loader)
        skipped = loader.skipped
    finally:
        loader.close()
    assert _no_reason(skipped) == _no_reason(expected)
    assert all("CRC" in e["reason"] for e in skipped)
    # Exactly once: every sample of the epoch is delivered once or reported skipped.
    assert len(ids) == len(set(ids)) == 64 - 2
    assert sorted(ids + [e["id"] for e in skipped]) == list(range(64))
    assert sorted(sizes) == [7, 7] + [8] * 6  # ids 5 and 40 sit in different batches of 8


@pytest.mark.parametrize("backend,opts", BACKENDS)
def test_raise_names_the_record(damaged, backend, opts):
    pack, expected = damaged
    loader = create_loader(backend, pack, batch_size=8, train=False, num_workers=2, **opts)
    try:
        with pytest.raises(CorruptRecordError) as info:
            _epoch(loader)
    finally:
        loader.close()
    first = {"id": info.value.id, "shard": info.value.shard, "record": info.value.record}
    assert first == _no_reason(expected)[0]  # id 5 comes first in eval order
    assert "sample 5" in str(info.value) and expected[0]["shard"] in str(info.value)


@pytest.mark.parametrize("backend,opts", BACKENDS)
def test_above_max_corrupt_stops_with_the_records_named(damaged, backend, opts):
    pack, _ = damaged
    loader = create_loader(
        backend, pack, batch_size=8, train=False, num_workers=1, on_corrupt="skip",
        max_corrupt=1, **opts,
    )  # fmt: skip
    try:
        with pytest.raises(TooManyCorruptError, match=r"2 corrupt records.*\b5 \(.*\b40 \("):
            _epoch(loader)
    finally:
        loader.close()


def test_train_skip_keeps_exactly_once_across_epochs_and_resume(damaged):
    pack, expected = damaged
    kw = dict(batch_size=8, num_workers=2, on_corrupt="skip", max_corrupt=2, seed=3)
    with create_loader("custom", pack, **kw) as loader:
        it = iter(loader)
        first = [next(it).ids.tolist() for _ in range(4)]
        state = loader.state_dict()
        it.close()
    with create_loader("custom", pack, **kw) as resumed:
        resumed.load_state_dict(state)
        rest, _ = _epoch(resumed)
        ids = sum(first, []) + rest
        assert sorted(ids + [e["id"] for e in resumed.skipped]) == list(range(64))
        assert _no_reason(resumed.skipped) == _no_reason(expected)
        _epoch(resumed)  # the next epoch starts a fresh list
        assert _no_reason(resumed.skipped) == _no_reason(expected)
        assert resumed.epoch == 1


def test_on_corrupt_is_checked(damaged):
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        create_loader("custom", damaged[0], on_corrupt="ignore")


# --- damaged shard files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_tfrecord(clean_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfr") / "pack"
    convert(clean_tree, out, ConvertConfig(format="tfrecord", shards=2), progress=False)
    return out


@pytest.mark.parametrize("fmt", ["lmdb", "tfrecord"])
@pytest.mark.parametrize("engine", ["process", "thread"])
def test_truncated_shard_is_corrupt_records_never_a_signal(
    clean_pack, clean_tfrecord, tmp_path, fmt, engine
):
    """An interrupted copy: shard 1 cut to 60% of its size. LMDB's last page is then past the
    file's end (found at open, before any page is touched: all the shard's records are
    reported); TFRecord's index puts its last records past the end (those are reported)."""
    pack = copy_pack(clean_pack if fmt == "lmdb" else clean_tfrecord, tmp_path / "pack")
    path = truncate_shard(pack, "train", 1, keep=0.6)
    kw = dict(batch_size=8, train=False, num_workers=2, engine=engine)
    with create_loader("custom", pack, on_corrupt="skip", max_corrupt=1.0, **kw) as loader:
        ids, _ = _epoch(loader)
        skipped = loader.skipped
    assert skipped and {e["shard"] for e in skipped} == {path.name}
    assert all("shard truncated" in e["reason"] for e in skipped)
    assert sorted(ids + [e["id"] for e in skipped]) == list(range(64))
    if fmt == "lmdb":
        assert len(skipped) == 32  # the whole shard: its pages cannot be trusted
    else:
        assert 0 < len(skipped) < 32 and min(e["record"] for e in skipped) > 0
    with create_loader("custom", pack, **kw) as loader:
        with pytest.raises(CorruptRecordError, match=f"{path.name} record .*shard truncated"):
            _epoch(loader)


def _epoch_and_skipped(pack, engine):
    kw = dict(batch_size=4, train=False, num_workers=2, engine=engine)
    with create_loader("custom", pack, on_corrupt="skip", max_corrupt=1.0, **kw) as loader:
        ids, _ = _epoch(loader)
        return sorted(ids), sorted(e["id"] for e in loader.skipped)


def test_damaged_lmdb_pages_cost_thread_workers_only_their_own_records(clean_pack, tmp_path):
    """B-tree pages overwritten: the thread engine's workers read one shard at once, and the one
    that meets a damaged page must not leave the others a transaction that fails their healthy
    records (MDB_BAD_TXN). Every round loses exactly what the process engine loses; before each
    thread had its own transaction, 6 of 20 rounds here lost 1-2 healthy records more."""
    pack = copy_pack(clean_pack, tmp_path / "pack")
    overwrite_pages(sorted((pack / "train").glob("*.lmdb"))[0])
    delivered, lost = _epoch_and_skipped(pack, "process")
    assert lost and sorted(delivered + lost) == list(range(64))
    rounds = [_epoch_and_skipped(pack, "thread") for _ in range(20)]
    assert all(r == (delivered, lost) for r in rounds), [r[1] for r in rounds if r[1] != lost]


def test_shard_shrunk_under_a_running_loader_reports_the_signal_and_shard(clean_pack, tmp_path):
    """A shard cut short after the worker mapped it: the worker dies of SIGBUS, and the
    loader says so within seconds (not after its timeout), naming the signal and the shard."""
    pack = copy_pack(clean_pack, tmp_path / "pack")
    # The worker is forked from pytest, whose faulthandler would dump the expected SIGBUS's
    # traceback into the test log as if something had crashed: the worker starts without it.
    faulthandler.disable()
    try:
        loader = create_loader("custom", pack, batch_size=8, train=False, num_workers=1)
        _epoch(loader)  # the worker has opened (mapped) both shards
    finally:
        faulthandler.enable(sys.__stderr__)  # where pytest had it: the real stderr
    with loader:
        path = truncate_shard(pack, "train", 0, keep=0.3)
        t = time.monotonic()
        with pytest.raises(
            RuntimeError, match=f"killed by SIGBUS while reading sample .*{path.name}"
        ):
            _epoch(loader)
        assert time.monotonic() - t < 10
        assert loader.timeout >= 100


_DALI_SCRIPT = """
import json, sys
from converters.convert import ConvertConfig, convert
from datasvc.corrupt import CorruptRecordError
from datasvc.loaders import create_loader
out = {}
for policy in ("skip", "raise"):
    loader = create_loader("dali_cpu", sys.argv[1], batch_size=8, train=False, num_workers=2,
                           on_corrupt=policy, max_corrupt=2)
    ids = []
    try:
        for batch in loader:
            ids += batch.ids.tolist()
        out[policy] = {"ids": ids, "skipped": loader.skipped}
    except CorruptRecordError as e:
        out[policy] = {"ids": ids, "error": e.entry}
print(json.dumps(out))
"""


@pytest.mark.dali
def test_dali_cpu_follows_the_policy(damaged):
    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    pack, expected = damaged
    run = subprocess.run(
        [sys.executable, "-c", _DALI_SCRIPT, str(pack)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    out = json.loads(run.stdout.splitlines()[-1])
    skip, raised = out["skip"], out["raise"]
    assert _no_reason(skip["skipped"]) == _no_reason(expected)
    assert sorted(skip["ids"] + DAMAGED) == list(range(64))
    assert _no_reason([raised["error"]]) == _no_reason(expected)[:1]


# --- the server and remote -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_server(damaged):
    from datasvc.service.local import LocalServer

    with LocalServer([damaged[0]], workers=1) as server:
        yield server


def _remote(server, **kw):
    kw = {"batch_size": 8, "train": False, "request_timeout": 5.0, "dead_after": 30.0, **kw}
    return create_loader("remote", server.endpoint, pack="pack", **kw)


@pytest.mark.parametrize("decode", ["server", "client"])
@pytest.mark.parametrize("world", [1, 2])
def test_remote_skip_reports_what_the_server_left_out(damaged_server, damaged, decode, world):
    """The request carries on_corrupt; the builders skip, the reply header lists the records,
    the client merges them into loader.skipped: across ranks, every id once or skipped."""
    _, expected = damaged
    ids, skipped = [], []
    for rank in range(world):
        train = decode == "client"  # crop segments are a train transport
        kw = dict(rank=rank, world_size=world, on_corrupt="skip", max_corrupt=2, decode=decode)
        with _remote(damaged_server, **{**kw, "train": train}) as loader:
            got, sizes = _epoch(loader)
            ids += got
            skipped += loader.skipped
    assert _no_reason(skipped) == _no_reason(expected)
    assert all("CRC" in e["reason"] for e in skipped)
    assert len(ids) == len(set(ids))
    if decode == "server":  # eval: every sample once, or skipped
        assert sorted(ids + [e["id"] for e in skipped]) == list(range(64))


def test_remote_raise_names_the_record_and_the_cap_holds(damaged_server, damaged):
    _, expected = damaged
    with _remote(damaged_server) as loader:
        with pytest.raises(CorruptRecordError) as info:
            _epoch(loader)
    assert info.value.entry["id"] == 5 and info.value.shard == expected[0]["shard"]
    with _remote(damaged_server, on_corrupt="skip", max_corrupt=1) as loader:
        with pytest.raises(TooManyCorruptError, match=r"\b5 \(.*\b40 \("):
            _epoch(loader)


def test_truncated_shard_served_by_remote_is_reported_not_a_dead_server(clean_pack, tmp_path):
    """The server's builders open shards with the same check: a truncated LMDB shard gives
    skipped records (skip) or a named error (raise), and the server keeps serving."""
    from datasvc.service.local import LocalServer

    pack = copy_pack(clean_pack, tmp_path / "pack")
    path = truncate_shard(pack, "train", 1, keep=0.6)
    with LocalServer([pack], workers=1) as server:
        with _remote(server, on_corrupt="skip", max_corrupt=1.0) as loader:
            ids, _ = _epoch(loader)
            skipped = loader.skipped
        assert len(skipped) == 32 and {e["shard"] for e in skipped} == {path.name}
        assert sorted(ids + [e["id"] for e in skipped]) == list(range(64))
        with _remote(server) as loader:
            with pytest.raises(CorruptRecordError, match="shard truncated"):
                _epoch(loader)
        with _remote(server, split="val") as loader:  # still serving
            assert len(_epoch(loader)[0]) == 12
            assert loader.stats()["corrupt_skipped"] == 32  # counted in the server's stats
