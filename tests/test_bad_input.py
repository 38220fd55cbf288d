"""Bad input and misconfiguration: every command fails fast with one line that names the cause.

Each case runs the real command line (``python -m datasvc.cli`` / ``python -m trainer``) in its
own session and asserts: the exit code, one ``<prog> <command>: error:`` line naming the cause,
no traceback, no process left behind, nothing written that should not be, and an end within the
case's time bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from datasvc.errors import UsageError, UserError, run_command
from tests.damage import overwrite_pages

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 10.0


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def _session_processes(sid: int) -> list[psutil.Process]:
    """Processes still alive in the session a case was started in (its leftovers)."""
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def run_case(argv: list[str], cwd: Path | str = ROOT, timeout: float = CASE_TIMEOUT_S, env=None):
    """Run one command in a new session; assert it ended in time and left no process behind."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} did not end within {timeout} s:\n{err[-2000:]}")
    wall = time.monotonic() - t0
    left = _session_processes(proc.pid)
    for p in left:
        p.kill()
    assert not left, f"{argv} left processes behind: {left}"
    return Outcome(proc.returncode, out, err, wall)


def datasvc(*args, **kw) -> Outcome:
    return run_case([sys.executable, "-m", "datasvc.cli", *map(str, args)], **kw)


def trainer(*args, **kw) -> Outcome:
    return run_case([sys.executable, "-m", "trainer", *map(str, args)], **kw)


def assert_one_line_error(r: Outcome, prefix: str, *words: str, code: int = 1) -> str:
    """Exit ``code``; exactly one ``<prefix>: error:`` line, naming every word; no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ": error:" in ln]
    assert len(lines) == 1, f"want one error line, got:\n{r.stderr}"
    line = lines[0]
    assert line.startswith(f"{prefix}: error: "), line
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    assert r.returncode == code, (r.returncode, r.stderr)
    return line


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: what a failed command must not touch."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@pytest.fixture
def pack_copy(clean_pack, tmp_path) -> Path:
    """A private copy of a small LMDB pack, to damage."""
    dst = tmp_path / "pack"
    shutil.copytree(clean_pack, dst)
    return dst


# ---------------------------------------------------------------- the shared mechanism


def test_user_error_is_one_line_with_its_hint(capsys):
    def fails():
        raise UserError("the thing is missing\nsecond line", "make the thing")

    assert run_command("datasvc demo", fails) == 1
    err = capsys.readouterr().err
    assert err == "datasvc demo: error: the thing is missing second line (make the thing)\n"


def test_usage_error_exits_2_and_debug_reraises(capsys):
    def fails():
        raise UsageError("--x must be positive")

    assert run_command("datasvc demo", fails) == 2
    with pytest.raises(UsageError):
        run_command("datasvc demo", fails, debug=True)


def test_a_bug_keeps_its_traceback():
    def buggy():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_command("datasvc demo", buggy)


def test_debug_flag_shows_the_traceback(tmp_path):
    r = datasvc("--debug", "inspect", tmp_path / "missing")
    assert r.returncode != 0 and "Traceback" in r.stderr and "PackError" in r.stderr


def test_usage_error_exits_2(tmp_path):
    r = datasvc("sample", tmp_path / "s", "--classes", "many")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid int" in r.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- inspect and verify


def test_inspect_missing_path(tmp_path):
    r = datasvc("inspect", tmp_path / "nothing")
    assert_one_line_error(r, "datasvc inspect", "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.fixture
def sample_tree(tmp_path) -> Path:
    """A small ImageFolder source tree (not a pack)."""
    from datasvc.sample import write_sample

    write_sample(tmp_path / "src", classes=2, per_class=3, val_per_class=1)
    return tmp_path / "src"


def _not_a_pack_inputs(tmp_path: Path, sample_tree: Path, pack_copy: Path) -> dict:
    (tmp_path / "notes.txt").write_text("not a pack\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished" / ".convert").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README").write_text("hello\n")
    return {
        "missing": (tmp_path / "nothing", "does not exist"),
        "file": (tmp_path / "notes.txt", "is a file"),
        "empty": (tmp_path / "empty", "empty folder"),
        "unfinished": (tmp_path / "unfinished", "unfinished conversion"),
        "source_tree": (sample_tree, "image folder tree"),
        "manifest_itself": (pack_copy / "manifest.json", "give its folder"),
        "other_folder": (tmp_path / "other", "no manifest.json"),
    }


NOT_A_PACK = ["missing", "file", "empty", "unfinished", "source_tree", "manifest_itself",
              "other_folder"]  # fmt: skip


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("kind", NOT_A_PACK)
def test_not_a_pack(kind, command, tmp_path, sample_tree, pack_copy):
    path, cause = _not_a_pack_inputs(tmp_path, sample_tree, pack_copy)[kind]
    before = tree_state(tmp_path)
    line = assert_one_line_error(datasvc(command, path), f"datasvc {command}", cause, path.name)
    if kind != "unfinished":
        assert "re-run" not in line  # only an unfinished conversion is finished by a re-run
    assert tree_state(tmp_path) == before


def _damage_manifest(pack: Path, how: str) -> None:
    m = pack / "manifest.json"
    text = m.read_text()
    if how == "truncated":
        m.write_text(text[: len(text) // 2])
    elif how == "list":
        m.write_text("[1, 2, 3]\n")
    elif how == "binary":
        m.write_bytes(b"\xff\xfe\x00garbage")
    else:
        d = json.loads(text)
        if how == "no_num_records":
            del d["splits"]["train"]["shards"][0]["num_records"]
        elif how == "counts_disagree":
            d["splits"]["train"]["num_samples"] += 5
        elif how == "classes_not_list":
            d["classes"] = "n01440764"
        elif how == "version":
            d["format_version"] = 99
        elif how == "format":
            d["format"] = "zip"
        m.write_text(json.dumps(d))


MANIFEST_DAMAGE = {
    "truncated": "not valid JSON",
    "list": "JSON object",
    "binary": "not valid JSON",
    "no_num_records": "num_records",
    "counts_disagree": "do not add up",
    "classes_not_list": "classes",
    "version": "format_version 99",
    "format": "'zip'",
}


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.parametrize("how", list(MANIFEST_DAMAGE))
def test_damaged_manifest(how, command, pack_copy):
    _damage_manifest(pack_copy, how)
    before = tree_state(pack_copy)
    r = datasvc(command, pack_copy, *(["-q"] if command == "verify" else []))
    assert_one_line_error(r, f"datasvc {command}", "manifest", MANIFEST_DAMAGE[how])
    assert tree_state(pack_copy) == before


@pytest.fixture
def tfrecord_copy(tfrecord_pack, tmp_path) -> Path:
    dst = tmp_path / "tfr"
    shutil.copytree(tfrecord_pack, dst)
    return dst


def test_verify_deleted_tfrecord_shard(tfrecord_copy):
    shard = sorted((tfrecord_copy / "train").glob("*.tfrecord"))[0]
    shard.unlink()
    r = datasvc("verify", tfrecord_copy, "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    damaged = [ln for ln in r.stderr.splitlines() if ln.startswith("DAMAGED")]
    assert damaged == [f"DAMAGED train/{shard.name}: shard file is missing"], r.stderr
    assert "FAILED (1 problems)" in r.stdout  # the other shards were still checked


def test_inspect_deleted_tfrecord_shard(tfrecord_copy):
    shard = sorted((tfrecord_copy / "train").glob("*.tfrecord"))[0]
    shard.unlink()
    assert_one_line_error(
        datasvc("inspect", tfrecord_copy), "datasvc inspect", shard.name, "missing", "verify"
    )


# ---------------------------------------------------------------- sample, keys, convert, serve


@pytest.mark.parametrize(
    "args,cause",
    [
        (["--classes", "0"], "--classes must be in 1..10000"),
        (["--classes", "-3"], "--classes must be in 1..10000"),
        (["--per-class", "0"], "--per-class and --val-per-class must be at least 1"),
        (["--val-per-class", "0"], "--per-class and --val-per-class must be at least 1"),
    ],
)
def test_sample_empty_tree_is_refused(args, cause, tmp_path):
    r = datasvc("sample", tmp_path / "s", *args)
    assert_one_line_error(r, "datasvc sample", cause, code=2)
    assert not (tmp_path / "s").exists()


def test_sample_over_existing_files_is_refused(sample_tree):
    before = tree_state(sample_tree)
    r = datasvc("sample", sample_tree, "--classes", "5")
    assert_one_line_error(r, "datasvc sample", "already holds files", code=2)
    assert tree_state(sample_tree) == before  # the first sample is not mixed with a second


def test_keys_never_overwrite_a_pair(tmp_path):
    assert datasvc("keys", tmp_path / "k", "--name", "server").returncode == 0
    before = tree_state(tmp_path / "k")
    r = datasvc("keys", tmp_path / "k", "--name", "server")
    assert_one_line_error(r, "datasvc keys", "server.key", "already exists")
    assert tree_state(tmp_path / "k") == before  # the old secret still pairs with its public key


def test_convert_missing_source(tmp_path):
    r = datasvc("convert", tmp_path / "nosrc", tmp_path / "out", "-q")
    assert r.returncode != 0
    assert_one_line_error(r, "datasvc convert", "nosrc", code=r.returncode)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--quality", "150"), ("--workers", "0")])
def test_convert_bad_option(flag, value, sample_tree, tmp_path):
    r = datasvc("convert", sample_tree, tmp_path / "out", flag, value, "-q")
    assert r.returncode != 0
    assert_one_line_error(r, "datasvc convert", flag.lstrip("-"), code=r.returncode)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["bench", "serve"])
def test_missing_pack_for_bench_and_serve(command, tmp_path):
    r = datasvc(command, tmp_path / "nopack")
    assert_one_line_error(r, f"datasvc {command}", "nopack", "does not exist")


# ---------------------------------------------------------------- loaders (the Python API)


def _no_children_left(timeout: float = 5.0) -> None:
    gone, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=timeout)
    assert not alive, f"loader processes left behind: {alive}"


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_splits_get_eval_sampling_and_transform(split, clean_pack, tmp_path):
    """Named val/test, a split is read once, unshuffled, through the eval transform, without
    dropping the last partial batch -- unless train= says otherwise."""
    from datasvc.loaders import create_loader

    src = clean_pack
    if split == "test":  # the fixture pack has train and val; name its val split "test"
        src = tmp_path / "pack"
        shutil.copytree(clean_pack, src)
        m = json.loads((src / "manifest.json").read_text())
        m["splits"]["test"] = m["splits"].pop("val")
        (src / "manifest.json").write_text(json.dumps(m))
        (src / "val").rename(src / "test")
    n = len(__import__("datasvc").open_pack(src).split(split))
    with create_loader(
        "custom", src, split=split, batch_size=5, image_size=32, num_workers=1
    ) as ld:
        assert not ld.cfg.train and not ld.sampler.shuffle and not ld.sampler.drop_last
        ids = [int(i) for _, _, batch_ids in ld for i in batch_ids]
    assert sorted(ids) == ids == list(range(n))  # all of them, once, in order
    with create_loader(
        "custom", src, split=split, batch_size=5, image_size=32, num_workers=1, train=True
    ) as ld:
        assert ld.cfg.train and ld.sampler.shuffle and ld.sampler.drop_last
    _no_children_left()


def test_eval_split_with_a_huge_batch_still_delivers_everything(clean_pack):
    from datasvc.loaders import create_loader

    with create_loader("custom", clean_pack, split="val", batch_size=5000, image_size=32,
                       num_workers=1) as ld:  # fmt: skip
        batches = list(ld)
    assert len(batches) == 1 and len(batches[0][2]) == 12
    _no_children_left()


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"batch_size": 5000}, ["64 samples", "full batch of 5000", "batch_size <= 64"]),
        ({"batch_size": 16, "world_size": 8}, ["on each of 8 ranks", "batch_size <= 8"]),
    ],
)
@pytest.mark.parametrize("backend", ["custom", "torch"])
def test_an_epoch_without_a_batch_is_refused(backend, kw, words, clean_pack):
    from datasvc.loaders import create_loader

    with pytest.raises(UsageError) as e:
        create_loader(backend, clean_pack, split="train", image_size=32, num_workers=1, **kw)
    for w in words:
        assert w in str(e.value)
    _no_children_left()


@pytest.mark.parametrize(
    "call,err,words",
    [
        (lambda p: ("nosuch", p, {}), KeyError, ["unknown loader", "'nosuch'", "custom"]),
        (lambda p: ("custom", p, {"split": "tset"}), KeyError, ["no split 'tset'", "'val'"]),
        (lambda p: ("custom", p.parent / "nopack", {}), UserError, ["does not exist"]),
        (lambda p: ("custom", p, {"image_size": 4}), ValueError, ["image_size", "8..1024"]),
        (lambda p: ("custom", p, {"batch_size": 0}), ValueError, ["batch_size must be positive"]),
        (lambda p: ("custom", p, {"rank": 2, "world_size": 2}), ValueError, ["rank 2"]),
    ],
    ids=["backend", "split", "pack", "image_size", "batch_size", "rank"],
)
def test_loader_bad_arguments(call, err, words, clean_pack):
    """Each is a UserError (so the CLIs print one line) and the builtin type callers expect."""
    from datasvc.loaders import create_loader

    backend, source, kw = call(clean_pack)
    with pytest.raises(err) as e:
        create_loader(backend, source, num_workers=1, **kw)
    assert isinstance(e.value, UserError)
    for w in words:
        assert w in str(e.value)
    _no_children_left()


# ---------------------------------------------------------------- the trainer


def test_trainer_missing_data_source_says_so(tmp_path):
    r = trainer("train", "--config", "digits", f"train.out_dir={tmp_path / 'run'}")
    line = assert_one_line_error(r, "python -m trainer train", "data.source is not set", code=2)
    assert "num_classes" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ["digits", "digits.yaml", "trainer/configs/digits.yaml"])
def test_trainer_config_resolves_from_any_directory(config, tmp_path):
    """From a folder outside the repository, a packaged config is found by name (reaching the
    data.source check proves the file was read)."""
    r = trainer("train", "--config", config, cwd=tmp_path)
    assert_one_line_error(r, "python -m trainer train", "data.source is not set", code=2)
    assert list(tmp_path.iterdir()) == []


def test_trainer_config_relative_to_cwd_wins(tmp_path):
    (tmp_path / "digits.yaml").write_text("optim:\n  lr: fast\n")
    r = trainer("train", "--config", "digits.yaml", cwd=tmp_path)
    assert_one_line_error(r, "python -m trainer train", "optim.lr", "'fast'", code=2)


def test_trainer_unknown_config_lists_packaged_ones(tmp_path):
    r = trainer("train", "--config", "digitz", cwd=tmp_path)
    assert_one_line_error(r, "python -m trainer train", "digitz", "digits, seed001", code=2)


def test_trainer_config_with_bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("data:\n  source: [1\n")
    r = trainer("train", "--config", tmp_path / "bad.yaml")
    assert_one_line_error(r, "python -m trainer train", "bad.yaml", "not valid YAML", code=2)


def test_trainer_override_without_value(clean_pack):
    r = trainer("train", "--config", "digits", f"data.source={clean_pack}", "optim.lr")
    assert_one_line_error(r, "python -m trainer train", "optim.lr", "key=value", code=2)


def test_trainer_overrides_after_an_option(tmp_path, clean_pack):
    """``--resume-from X a=b`` still applies a=b (argparse alone would refuse it)."""
    r = trainer("train", "--config", "digits", "--resume-from", tmp_path / "missing.pt",
                f"data.source={clean_pack}", f"train.out_dir={tmp_path / 'run'}",
                "data.batch_size=8")  # fmt: skip
    assert_one_line_error(r, "python -m trainer train", "missing.pt", "no such checkpoint")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_dict"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_trainer_corrupt_checkpoint_names_the_file(command, damage, tmp_path, clean_pack):
    import torch

    run = tmp_path / "run"
    run.mkdir()
    ck = run / "last.pt"
    torch.save({"version": 1, "model": {"w": torch.zeros(4096)}}, ck)
    if damage == "truncated":
        ck.write_bytes(ck.read_bytes()[:3000])
    elif damage == "garbage":
        ck.write_bytes(os.urandom(3000))
    elif damage == "empty":
        ck.write_bytes(b"")
    else:
        torch.save([1, 2, 3], ck)
    before = ck.read_bytes()
    common = ["--config", "digits", f"data.source={clean_pack}", f"train.out_dir={run}",
              "data.batch_size=8", "data.num_workers=1"]  # fmt: skip
    args = ["--resume"] if command == "train" else ["--checkpoint", ck]
    r = trainer(command, *common, *args)
    cause = "not a trainer checkpoint" if damage == "not_a_dict" else "not a readable checkpoint"
    assert_one_line_error(r, f"python -m trainer {command}", str(ck), cause)
    assert ck.read_bytes() == before  # the damaged file is kept, for the user to look at
    assert not list(run.glob("*.pt.tmp*")) and not list(run.glob(".*.tmp-*"))


def test_trainer_epoch_without_a_batch(tmp_path, clean_pack):
    r = trainer("train", "--config", "digits", f"data.source={clean_pack}",
                f"train.out_dir={tmp_path / 'run'}", "data.batch_size=5000")  # fmt: skip
    assert_one_line_error(r, "python -m trainer train", "no full batch of 5000", code=2)
    assert not list((tmp_path / "run").glob("*.pt"))


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN_CASES = {
    # fails before torch is imported: every rank prints its line
    "before_process_group": ([], "data.source is not set"),
    # fails after init_process_group, with loader workers running: a weights-only file
    "after_process_group": (["--resume-from", "{weights}", "data.source={pack}",
                             "data.batch_size=4", "data.num_workers=1"],
                            "not a trainer checkpoint"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TORCHRUN_CASES))
def test_torchrun_one_line_per_rank_and_no_child_failed_report(case, tmp_path, clean_pack):
    """Under real torchrun an expected failure prints at most one line per rank and ends the
    job: no ChildFailedError report, no traceback, no rank or loader worker left running."""
    import torch

    from trainer.models import create_model

    weights = tmp_path / "weights.pt"
    torch.save({"version": 1, "model": create_model("resnet18", num_classes=4).state_dict()},
               weights)  # fmt: skip
    extra, cause = TORCHRUN_CASES[case]
    extra = [a.format(weights=weights, pack=clean_pack) for a in extra]
    marker = f"train.out_dir={tmp_path / 'run'}"
    torchrun = Path(sys.executable).with_name("torchrun")
    r = run_case(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "trainer", "train", "--config", "digits",
         marker, *extra],
        timeout=90,
    )  # fmt: skip
    lines = [ln for ln in r.stderr.splitlines() if ": error:" in ln]
    ranks = [ln.split("]")[0] + "]" for ln in lines]
    assert 1 <= len(lines) <= 2 and len(set(ranks)) == len(ranks), r.stderr
    assert all(ln.startswith("python -m trainer train [rank ") and cause in ln for ln in lines)
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    assert r.returncode == -signal.SIGUSR1  # torchrun ended by the rank: shells see 138
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_with(marker)
    for p in left:
        p.kill()
    assert not left, f"ranks left running: {left}"


@pytest.mark.slow
def test_trainer_checkpoint_of_another_model(tmp_path, clean_pack):
    """Weights saved for 1000 classes, evaluated with the pack's 4: one line, not torch's list
    of every mismatched key."""
    import torch

    from trainer.models import create_model

    ck = tmp_path / "other.pt"
    torch.save({"version": 1, "model": create_model("resnet18", num_classes=1000).state_dict()}, ck)
    r = trainer("eval", "--config", "digits", f"data.source={clean_pack}", "--checkpoint", ck,
                "data.num_workers=1", timeout=30)  # fmt: skip
    assert_one_line_error(r, "python -m trainer eval", str(ck), "do not fit", "2 of another shape")


# ---------------------------------------------------------------- damaged LMDB shards


def _lmdb_shard(pack: Path) -> Path:
    return sorted((pack / "train").glob("*.lmdb"))[0]


def test_verify_damaged_lmdb_pages(pack_copy):
    """Pages inside the B-tree overwritten: each unreadable record is one DAMAGED line, and a
    record after a damaged page is read with a fresh transaction (not reported as damaged
    because the last one was)."""
    shard = _lmdb_shard(pack_copy)
    overwrite_pages(shard)  # the fixture pack's B-tree pages for the first records
    r = datasvc("verify", pack_copy, "-q")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    damaged = [ln for ln in r.stderr.splitlines() if ln.startswith("DAMAGED")]
    assert damaged and all(shard.name in ln for ln in damaged), r.stderr
    assert "damaged LMDB page" in r.stderr and "MDB_BAD_TXN" not in r.stderr, r.stderr
    records = json.loads((pack_copy / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert len(damaged) < records[0]["num_records"]  # the records after it still read


@pytest.mark.parametrize("how", ["truncated", "empty", "header"])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_unreadable_lmdb_shard(how, command, pack_copy):
    shard = _lmdb_shard(pack_copy)
    if how == "truncated":
        os.truncate(shard, shard.stat().st_size // 3)  # a SIGBUS, were it mapped and read
    elif how == "empty":
        os.truncate(shard, 0)
    else:
        with open(shard, "r+b") as f:
            f.write(b"\x00" * 8192)  # both meta pages
    r = datasvc(command, pack_copy, *(["-q"] if command == "verify" else []))
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    if command == "verify":
        damaged = [ln for ln in r.stderr.splitlines() if ln.startswith("DAMAGED")]
        assert len(damaged) == 1 and shard.name in damaged[0], r.stderr
    else:
        assert_one_line_error(r, "datasvc inspect", shard.name)


# ---------------------------------------------------------------- convert (sources, outputs)


def test_convert_output_inside_source(sample_tree):
    before = tree_state(sample_tree)
    r = datasvc("convert", sample_tree, sample_tree / "out", "-q")
    assert_one_line_error(r, "datasvc convert", "inside the source")
    assert tree_state(sample_tree) == before  # no empty extra class folder for the next run


def test_convert_source_inside_output(sample_tree):
    out = sample_tree.parent
    before = tree_state(out)
    r = datasvc("convert", sample_tree, out, "-q")
    assert_one_line_error(r, "datasvc convert", "inside the output")
    assert tree_state(out) == before


@pytest.mark.parametrize("layout", ["empty", "flat", "plain_imagefolder"])
def test_convert_layouts_it_cannot_take(layout, sample_tree, tmp_path):
    src = tmp_path / layout
    if layout == "empty":
        src.mkdir()
        cause = "empty folder"
    elif layout == "flat":
        src.mkdir()
        for p in sorted(sample_tree.rglob("*.JPEG")):
            shutil.copy(p, src / f"{p.parent.name}_{p.name}")
        cause = "flat folder of images"
    else:
        shutil.copytree(sample_tree / "train", src)
        cause = "class folders at the top level"
    r = datasvc("convert", src, tmp_path / "out", "-q")
    assert_one_line_error(r, "datasvc convert", cause, "SRC/<split>/<class>/<image>")
    assert not (tmp_path / "out").exists()


def test_convert_read_only_output(sample_tree, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: a read-only file system
        out = Path("/sys/datasvc-bad-input-pack")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "pack"
    r = datasvc("convert", sample_tree, out, "-q")
    assert_one_line_error(r, "datasvc convert", str(out), "cannot write")
    assert not out.exists()


def test_convert_symlink_loop_counts_each_file_once(sample_tree, tmp_path):
    """Exit 0 (a loop is not an error), the summary says so, and the pack is the loop-free
    one: the issue's 80 images that became 880."""
    plain = datasvc("convert", sample_tree, tmp_path / "plain", "-q", timeout=60)
    assert plain.returncode == 0, plain.stderr
    cls = sorted((sample_tree / "train").iterdir())[0]
    (cls / "loop").symlink_to("..")
    looped = datasvc("convert", sample_tree, tmp_path / "looped", "-q", timeout=60)
    assert looped.returncode == 0 and "Traceback" not in looped.stderr, looped.stderr
    assert "reached twice" in looped.stdout + looped.stderr
    a, b = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("plain", "looped"))
    for split in ("train", "val"):
        assert a["splits"][split]["num_samples"] == b["splits"][split]["num_samples"]
        assert [s["digest"] for s in a["splits"][split]["shards"]] == [
            s["digest"] for s in b["splits"][split]["shards"]
        ]


# ---------------------------------------------------------------- the service


@pytest.mark.parametrize("field", ["epoch", "seed"])
def test_rejected_request_errors_within_request_timeout(field, clean_pack):
    """A request the server rejects is answered with its id: the client raises at once
    instead of waiting forever on a server that keeps answering no."""
    from datasvc.service.client import BatchClient, RemoteError
    from datasvc.service.local import LocalServer
    from datasvc.service.protocol import BatchRequest

    fields = {"seed": 0, "epoch": 0, field: -1}
    req = BatchRequest("pack", "train", True, 32, fields["seed"], fields["epoch"], 0, 1, 8, 0)
    with LocalServer([clean_pack], workers=1) as s:
        c = BatchClient(s.endpoint, dead_after=30, request_timeout=3)
        try:
            t0 = time.monotonic()
            with pytest.raises(RemoteError, match=field):
                list(c.fetch([req]))
            assert time.monotonic() - t0 < 3
        finally:
            c.close()


def test_convert_over_a_damaged_manifest_then_rebuild(sample_tree, tmp_path):
    """A re-run over a pack whose manifest.json was truncated says so; deleting it and running
    again rebuilds the manifest from the finished (checked) shards."""
    out = tmp_path / "pack"
    assert datasvc("convert", sample_tree, out, "-q", timeout=60).returncode == 0
    good = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(good[: len(good) // 3])
    shards = {p: p.read_bytes() for p in out.glob("*/*.lmdb")}
    r = datasvc("convert", sample_tree, out, "-q")
    assert_one_line_error(r, "datasvc convert", "manifest.json is damaged", "delete it")
    assert {p: p.read_bytes() for p in out.glob("*/*.lmdb")} == shards
    (out / "manifest.json").unlink()
    assert datasvc("convert", sample_tree, out, "-q", timeout=60).returncode == 0
    rebuilt = json.loads((out / "manifest.json").read_text())
    assert rebuilt["splits"] == json.loads(good)["splits"]


def test_custom_loader_reports_a_killed_worker_at_once(clean_pack):
    """A worker killed mid-epoch (the OOM killer, an operator): the loader raises within
    seconds, not after its 120 s timeout, naming the signal; no process is left."""
    from datasvc.loaders import create_loader

    # 32 batches of 2: far more than the workers build ahead of the first one
    with create_loader("custom", clean_pack, batch_size=2, image_size=32, num_workers=2) as ld:
        it = iter(ld)
        next(it)
        os.kill(ld._procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="killed by SIGKILL"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 10
    _no_children_left()


# ---------------------------------------------------------------- serve: start checks


@pytest.fixture
def curve_keys(tmp_path) -> Path:
    from datasvc.service.auth import write_keypair

    keys = tmp_path / "keys"
    write_keypair(keys / "server", "server")
    pub, _ = write_keypair(keys / "client", "client")
    (keys / "allowed").mkdir()
    shutil.copy(pub, keys / "allowed" / "client.key")
    (keys / "empty").mkdir()
    return keys


SERVE_START = {
    "missing_secret": (["--curve-secret", "server/nope.key_secret", "--curve-allow", "allowed"],
                       ["nope.key_secret", "no such file"]),
    "public_as_secret": (["--curve-secret", "server/server.key", "--curve-allow", "allowed"],
                         ["server.key", "only a public key"]),
    "misspelled_allow": (["--curve-secret", "server/server.key_secret", "--curve-allow", "alowed"],
                         ["alowed", "no such folder", "--curve-allow-any"]),
    "empty_allow": (["--curve-secret", "server/server.key_secret", "--curve-allow", "empty"],
                    ["empty", "no .key file", "--curve-allow-any"]),
    "no_curve_beyond_loopback": ([], ["beyond loopback", "--insecure"]),  # a usage error
}  # fmt: skip


@pytest.mark.parametrize("case", list(SERVE_START))
def test_serve_refuses_to_start(case, curve_keys, clean_pack):
    """Each start failure is one line and an exit within 5 s, before anything is started."""
    args, words = SERVE_START[case]
    args = [str(curve_keys / a) if not a.startswith("--") else a for a in args]
    before = tree_state(curve_keys)
    r = datasvc("serve", clean_pack, "--bind", "tcp://0.0.0.0:0", *args, timeout=5)
    code = 2 if case == "no_curve_beyond_loopback" else 1
    assert_one_line_error(r, "datasvc serve", *words, code=code)
    assert tree_state(curve_keys) == before


@pytest.mark.parametrize(
    "bind, words",
    [("tcp://127.0.0.1:99999", ["99999", "no valid port"]),
     ("tcp://127.0.0.1", ["no valid port", "none"]),
     ("foo", ["foo", "not a ZeroMQ endpoint"])],
)  # fmt: skip
def test_serve_bad_bind_is_a_usage_error(bind, words, clean_pack):
    """An endpoint that cannot be bound as written is refused, not bound somewhere else."""
    r = datasvc("serve", clean_pack, "--bind", bind, timeout=5)
    assert_one_line_error(r, "datasvc serve", *words, code=2)


def test_serve_port_in_use(clean_pack):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = datasvc("serve", clean_pack, "--bind", f"tcp://127.0.0.1:{port}", timeout=5)
    assert_one_line_error(r, "datasvc serve", str(port), "in use")


@pytest.fixture(scope="module")
def curve_server(clean_pack, tmp_path_factory):
    """A CURVE server on 127.0.0.1 that allows one client key."""
    from datasvc.service.auth import write_keypair
    from datasvc.service.local import LocalServer

    keys = tmp_path_factory.mktemp("curve")
    write_keypair(keys / "server", "server")
    pub, _ = write_keypair(keys / "alice", "alice")
    write_keypair(keys / "mallory", "mallory")
    (keys / "allowed").mkdir()
    shutil.copy(pub, keys / "allowed")
    extra = ["--curve-secret", str(keys / "server" / "server.key_secret"),
             "--curve-allow", str(keys / "allowed")]  # fmt: skip
    with LocalServer([clean_pack], workers=1, extra=extra) as s:
        yield s, keys


def _remote_trainer(endpoint: str, tmp_path: Path, *opts: str, timeout: float = 20) -> Outcome:
    return trainer("train", "--config", "digits", "data.backend=remote",
                   f"data.source={endpoint}", f"train.out_dir={tmp_path / 'run'}",
                   "data.batch_size=8", *opts, timeout=timeout)  # fmt: skip


REMOTE_MISTAKES = {
    "unknown_client_key": (["alice", "server"], "mallory", ["refused this client's CURVE key"]),
    "wrong_server_key": (["alice", "mallory"], "alice", ["not this server's"]),
    "plain_client": (None, None, ["it expects CURVE"]),
}


@pytest.mark.parametrize("case", list(REMOTE_MISTAKES))
def test_trainer_curve_mistakes_are_named(case, curve_server, tmp_path):
    """Every CURVE mistake is its own one-line error naming the server, within seconds (not
    the same 'no server answered' after 60 s)."""
    s, keys = curve_server
    names, client, words = REMOTE_MISTAKES[case]
    opts = ["data.options.pack=pack", "data.options.dead_after=30"]
    if names:
        server_pub = keys / names[1] / f"{names[1]}.key"
        opts += [f"data.options.curve_client_key={keys / client / f'{client}.key_secret'}",
                 f"data.options.curve_server_key={server_pub}"]  # fmt: skip
    t0 = time.monotonic()
    r = _remote_trainer(s.endpoint, tmp_path, *opts)
    assert_one_line_error(r, "python -m trainer train", s.endpoint, *words)
    assert time.monotonic() - t0 < 10  # the trainer pings before it imports torch


def test_trainer_unknown_remote_pack(curve_server, tmp_path):
    s, keys = curve_server
    curve = [f"data.options.curve_client_key={keys / 'alice' / 'alice.key_secret'}",
             f"data.options.curve_server_key={keys / 'server' / 'server.key'}"]  # fmt: skip
    r = _remote_trainer(s.endpoint, tmp_path, "data.options.pack=imagenet", *curve)
    assert_one_line_error(r, "python -m trainer train", "'imagenet'", "give one of: pack", code=2)


def test_trainer_dead_host(tmp_path):
    r = _remote_trainer("tcp://127.0.0.1:9", tmp_path, "data.options.pack=pack",
                        "data.options.dead_after=2")  # fmt: skip
    assert_one_line_error(r, "python -m trainer train", "tcp://127.0.0.1:9")
