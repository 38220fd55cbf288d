"""A ``datasvc serve`` subprocess on 127.0.0.1 (a free port), for benchmarks and tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_READY = re.compile(r"(tcp://\S+) packs ")


class LocalServer:
    """Start ``datasvc serve PACK... --bind tcp://127.0.0.1:*``; stop on exit or ``stop()``."""

    def __init__(
        self,
        packs: list[str],
        workers: int = 2,
        bind: str = "tcp://127.0.0.1:*",
        extra: list[str] | None = None,
        startup_timeout: float = 60.0,
        prefix: list[str] | None = None,
    ):
        self.packs = [str(p) for p in packs]
        self.workers = workers
        self.bind = bind
        self.extra = extra or []
        self.startup_timeout = startup_timeout
        self.prefix = prefix or []  # e.g. ``ip netns exec NS``: where the server runs
        self.proc = None
        self.endpoint = None
        self.home = None  # the server's own temporary folder: its log, and its TMPDIR
        self.log = None

    @property
    def pack_name(self) -> str:
        first = self.packs[0]
        return first.split("=", 1)[0] if "=" in first else Path(first.rstrip("/")).name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> LocalServer:
        # The server's TMPDIR is this folder, so what it leaves when killed -9 (its builders'
        # ipc socket folder) goes with the folder in stop(), not into the machine's /tmp.
        self.home = Path(tempfile.mkdtemp(prefix="datasvc-local-"))
        self.log = self.home / "serve.log"
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "datasvc.cli",
            "serve",
            *self.packs,
            "--bind",
            self.bind,
            "--workers",
            str(self.workers),
            "--log-interval",
            "0",
            *self.extra,
        ]
        root = Path(__file__).resolve().parents[2]
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            TMPDIR=str(self.home),
        )
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self.endpoint = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> str:
        """The endpoint the server printed once it listens; raises if it exits or is slow."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            m = _READY.search(self.log.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"datasvc serve exited ({self.proc.returncode}):\n{self.log.read_text()}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"datasvc serve did not start in {self.startup_timeout}s")

    def kill(self) -> None:
        """kill -9 the server and all its workers (its whole process group)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def raw_stats(self) -> dict:
        """The server's ``stats`` reply, as it sends it."""
        from datasvc.service.client import BatchClient

        c = BatchClient(self.endpoint, dead_after=10)
        try:
            return c.call("stats")["stats"]
        finally:
            c.close()

    def stats(self) -> dict:
        st = self.raw_stats()
        return {
            "server_images_per_s": st["images_per_s"],
            "bytes_per_image": st["bytes_per_image"],
            "server_worker_busy": st["worker_busy"],
        }

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
