"""Two hosts on one machine: two network namespaces joined by a veth pair, shaped by ``tc tbf``
(this kernel has no netem, so faults come from taking the link down). The server runs in one
namespace, the client in the other; traffic goes only between them (private 10.x addresses
that exist nowhere else). Everything is deleted on exit, after a failure too, and leftovers of
a run that was killed are deleted by the next one.

Needs root and iproute2 (``ip``, ``tc``); ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

PREFIX = "dsvl"  # namespace and interface names start with this, then the creating pid


def unavailable() -> str | None:
    """Why a link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (iproute2; scripts/install-apt.sh installs it)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_stale() -> None:
    """Delete namespaces left by runs whose process is gone (a kill -9 skips every cleanup)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].rstrip("sc").split("x")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name, check=False)


class Link:
    """``with Link(rate="1gbit") as link:`` ``link.server_ns``/``link.client_ns`` joined by a
    veth pair with addresses ``link.server_ip``/``link.client_ip``; ``link.down()``/``up()``.

    ``rate`` shapes both directions with tbf (``burst`` bytes, ``latency`` queueing bound)."""

    _count = 0

    def __init__(self, rate: str = "1gbit", burst: str = "512kb", latency: str = "50ms"):
        Link._count += 1
        tag = f"{os.getpid()}x{Link._count}"
        self.server_ns, self.client_ns = f"{PREFIX}{tag}s", f"{PREFIX}{tag}c"
        # veth names are at most 15 characters
        self._dev_s, self._dev_c = f"dl{tag}s"[-15:], f"dl{tag}c"[-15:]
        net = (os.getpid() * 7 + Link._count) % 250 + 1
        self.server_ip, self.client_ip = f"10.213.{net}.1", f"10.213.{net}.2"
        self.rate, self.burst, self.latency = rate, burst, latency
        self._made = False
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Link:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        remove_stale()
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        self._made = True
        _ip("netns", "add", self.server_ns)
        _ip("netns", "add", self.client_ns)
        _ip("link", "add", self._dev_s, "type", "veth", "peer", "name", self._dev_c)
        for ns, dev, ip in (
            (self.server_ns, self._dev_s, self.server_ip),
            (self.client_ns, self._dev_c, self.client_ip),
        ):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", self.rate, "burst", self.burst, "latency", self.latency],
                check=True, capture_output=True,
            )  # fmt: skip
        log.info("link %s <-> %s at %s", self.server_ip, self.client_ip, self.rate)

    def exec_prefix(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def popen(self, ns: str, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside ``ns`` in its own process group; ended by ``close()``."""
        proc = subprocess.Popen([*self.exec_prefix(ns), *cmd], start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def down(self) -> None:
        """Take the link down (both ends): packets stop, sockets stay open."""
        _ip("-n", self.server_ns, "link", "set", self._dev_s, "down")
        _ip("-n", self.client_ns, "link", "set", self._dev_c, "down")

    def up(self) -> None:
        _ip("-n", self.server_ns, "link", "set", self._dev_s, "up")
        _ip("-n", self.client_ns, "link", "set", self._dev_c, "up")

    def tx_bytes(self, ns: str) -> int:
        """Bytes sent by namespace ``ns``'s end of the link (its qdisc counter)."""
        dev = self._dev_s if ns == self.server_ns else self._dev_c
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return int(out.split("Sent ", 1)[1].split(" bytes", 1)[0])

    def close(self) -> None:
        """End the processes started with ``popen`` and delete both namespaces (the veth pair
        goes with them)."""
        import signal

        for proc in self._procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._procs = []
        if not self._made:
            return
        self._made = False
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "del", ns, check=False)
        atexit.unregister(self.close)
