"""Bad input and misconfiguration: every command fails fast with one line that names the cause.

Each case runs the real command line (``python -m datasvc.cli`` / ``python -m trainer``) in its
own session and asserts: the exit code, one ``<prog> <command>: error:`` line naming the cause,
no traceback, no process left behind, nothing written that should not be, and an end within the
case's time bound.
"""

from __future__ import annotations

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
