"""The base install: in a fresh virtual environment without torch, ``pip install datasvc``
converts the sample and serves it, bit for bit the batches the ``custom`` loader builds here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST_MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"(tcp://\S+) packs ")


def _run(*cmd, timeout=900, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def _source_copy(dest: Path) -> Path:
    """The tracked files of this checkout (what a user's clone has), without build outputs."""
    files = _run("git", "ls-files", cwd=ROOT).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


def _site_size(venv: Path) -> int:
    return sum(p.stat().st_size for p in (venv / "lib").rglob("*") if p.is_file())


def _clean_env() -> dict:
    """No PYTHONPATH: the venv must run its own installed copy, not this checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("install")
    src = _source_copy(work / "src")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", str(venv))  # no system site-packages
    empty = _site_size(venv)
    _run(str(venv / "bin" / "pip"), "install", "-q", str(src), env=_clean_env())
    size_mb = (_site_size(venv) - empty) / 2**20
    print(f"\nbase install: {size_mb:.0f} MB of packages (venv {venv})")
    (work / "base-install-mb").write_text(f"{size_mb:.1f}\n")
    return venv


@pytest.mark.slow
def test_base_install_converts_and_serves_without_torch(base_venv, clean_tree, clean_pack):
    py = str(base_venv / "bin" / "python")
    env = _clean_env()
    probe = _run(
        py,
        "-c",
        "import importlib.util as u, datasvc.service.server, datasvc.decode as d;"
        "print([m for m in ('torch', 'torchvision', 'timm') if u.find_spec(m)], d.CROP_DECODER)",
        env=env,
        cwd="/",
    ).stdout.split("\n")[0]
    assert probe == "[] turbo_crop", probe  # no torch at all; the crop decoder was built
    out = base_venv.parent / "pack"
    cli = str(base_venv / "bin" / "datasvc")
    # the fixture pack's options (tests/conftest.py): the same tree gives the same pack
    convert = [cli, "convert", str(clean_tree), str(out), "--shards", "2", "--workers", "1"]
    _run(*convert, "--max-pixels", str(TEST_MAX_PIXELS), "-q", env=env)
    _run(cli, "verify", str(out), "--decode", "-q", env=env)
    server = subprocess.Popen(
        [cli, "serve", f"sample={out}", "--bind", "tcp://127.0.0.1:*", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        endpoint = _wait_ready(server)
        _same_batches_as_custom(endpoint, clean_pack)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def _wait_ready(server: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        seen.append(line)
        m = READY.search(line)
        if m:
            return m.group(1)
    raise AssertionError(f"the torch-free server did not start:\n{''.join(seen)}")


def _same_batches_as_custom(endpoint: str, clean_pack: Path) -> None:
    """The fresh venv converted the tree the fixture pack came from, with its options: the
    server's batches equal the custom loader's on the fixture pack."""
    from datasvc.loaders import create_loader

    kw = {"batch_size": 8, "image_size": 64, "seed": 4, "num_workers": 1}
    with create_loader("remote", endpoint, pack="sample", **kw) as remote:
        served = list(remote)
    with create_loader("custom", clean_pack, **kw) as local:
        built = list(local)
    assert len(served) == len(built) > 0
    for a, b in zip(served, built):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.images)
