"""Which servers a job talks to, re-resolved while it runs.

An endpoints spec is a comma list of items, each one of:

- ``tcp://HOST:PORT`` (or any ZeroMQ address): that server, always;
- ``dns:NAME:PORT``: every address ``NAME`` resolves to (A and AAAA records), re-resolved, so
  a Kubernetes headless Service (one record per ready pod) is the server pool;
- ``file:PATH``: one endpoint a line (blank lines and ``#`` comments ignored), re-read, so
  servers that ``datasvc serve --announce PATH`` on shared storage join and leave.

``Membership.current()`` gives the set of endpoints now, re-resolving at most every
``refresh`` seconds. A name that does not resolve or a file that cannot be read keeps the
last set it gave (a DNS hiccup must not empty the pool), and logs the reason once.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 2.0


def parse_spec(spec) -> list[str]:
    """A comma list (or a list of strings) → its items, checked."""
    items = [e.strip() for e in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [e for e in items if e]
    if not items:
        raise ValueError("give at least one endpoint: tcp://HOST:PORT, dns:NAME:PORT or file:PATH")
    for item in items:
        if item.startswith("dns:"):
            _dns_parts(item)
        elif not item.startswith("file:") and "://" not in item:
            raise ValueError(
                f"endpoint {item!r} is not tcp://HOST:PORT (or another ZeroMQ address), "
                "dns:NAME:PORT or file:PATH"
            )
    return items


def _dns_parts(item: str) -> tuple[str, int]:
    name, _, port = item[len("dns:") :].rpartition(":")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r}: write dns:NAME:PORT, e.g. dns:datasvc.ml.svc:5555")
    return name, int(port)


def tcp_endpoint(address: str, port: int) -> str:
    """An IP address and port → a ZeroMQ tcp endpoint (IPv6 in brackets)."""
    if ipaddress.ip_address(address).version == 6:
        return f"tcp://[{address}]:{port}"
    return f"tcp://{address}:{port}"


def resolve_dns(item: str) -> list[str]:
    """``dns:NAME:PORT`` → one tcp endpoint per address, sorted. Raises ``OSError``."""
    name, port = _dns_parts(item)
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({tcp_endpoint(info[4][0], port) for info in infos})


def read_endpoints_file(item: str) -> list[str]:
    """``file:PATH`` → its endpoints, one a line. Raises ``OSError``."""
    out = []
    for line in Path(item[len("file:") :]).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


class Membership:
    """The endpoints of a spec now; ``changed`` tells whether the last ``current()`` differed."""

    def __init__(self, spec, refresh: float = DEFAULT_REFRESH_S, clock=time.monotonic):
        self.items = parse_spec(spec)
        self.refresh = refresh
        self.dynamic = any(i.startswith(("dns:", "file:")) for i in self.items)
        self._clock = clock
        self._last: dict[str, list[str]] = {}  # item → what it gave last time it resolved
        self._failing: set[str] = set()
        self._resolved_at = None
        self._current: list[str] = []

    def current(self, force: bool = False) -> list[str]:
        now = self._clock()
        if force or self._resolved_at is None or now - self._resolved_at >= self.refresh:
            self._resolved_at = now
            self._current = self._resolve()
        return self._current

    def _resolve(self) -> list[str]:
        seen: dict[str, None] = {}
        for item in self.items:
            for endpoint in self._resolve_item(item):
                seen.setdefault(endpoint)
        return list(seen)

    def _resolve_item(self, item: str) -> list[str]:
        if not item.startswith(("dns:", "file:")):
            return [item]
        try:
            got = resolve_dns(item) if item.startswith("dns:") else read_endpoints_file(item)
        except (OSError, UnicodeDecodeError) as e:
            if item not in self._failing:
                log.warning(
                    "%s: %s; keeping its last %d endpoints", item, e, len(self._last.get(item, []))
                )
                self._failing.add(item)
            return self._last.get(item, [])
        if item in self._failing:
            log.info("%s resolves again: %d endpoints", item, len(got))
            self._failing.discard(item)
        bad = [e for e in got if "://" not in e]
        if bad:
            log.warning("%s: ignoring %s (not an endpoint such as tcp://HOST:PORT)", item, bad)
            got = [e for e in got if "://" in e]
        self._last[item] = got
        return got


# --- announcing: a server adds its own endpoint to a shared file ----------------------------


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit(lines) -> lines`` to ``path`` under a lock (``PATH.lock``), replacing the
    file atomically so that a client re-reading it sees the old list or the new one."""
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = path.read_text().splitlines() if path.exists() else []
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in edit(lines)))
        os.replace(tmp, path)


def announce(path, endpoint: str) -> None:
    """Add ``endpoint`` to the endpoints file ``path`` (once)."""
    _rewrite(
        Path(path),
        lambda lines: lines if endpoint in (x.strip() for x in lines) else [*lines, endpoint],
    )
    log.info("announced %s in %s", endpoint, path)


def withdraw(path, endpoint: str) -> None:
    """Remove ``endpoint`` from the endpoints file ``path``."""
    _rewrite(Path(path), lambda lines: [x for x in lines if x.strip() != endpoint])
    log.info("withdrew %s from %s", endpoint, path)


def advertised_endpoint(bound: str, advertise: str | None = None) -> str:
    """The endpoint clients should use for a socket bound at ``bound``: ``advertise`` if
    given, else ``bound`` with a wildcard address replaced by this host's name."""
    if advertise:
        return advertise
    for wildcard in ("0.0.0.0", "[::]", "*"):
        if f"://{wildcard}:" in bound:
            return bound.replace(f"://{wildcard}:", f"://{socket.getfqdn()}:")
    return bound
