"""``datasvc status ENDPOINT...``: a live table of servers for an operator, one line each.

Endpoints are a membership spec (``tcp://``, ``dns:NAME:PORT``, ``file:PATH``), re-resolved
at every refresh, so the table follows servers joining and leaving. Rates are over the last
interval; a server that does not answer within the timeout shows as ``down``.
"""

from __future__ import annotations

import logging
import sys
import time

from datasvc.service.client import BatchClient, NoServerError, RemoteError
from datasvc.service.membership import Membership

log = logging.getLogger(__name__)

COLUMNS = (
    ("endpoint", 28), ("state", 6), ("uptime", 8), ("img/s", 8), ("MB/s", 7), ("B/img", 7),
    ("images", 10), ("clients", 7), ("queued", 6), ("busy", 5), ("errors", 6), ("restarts", 8),
)  # fmt: skip


def poll(client: BatchClient, timeout: float) -> dict | None:
    """A server's stats, or None when it does not answer."""
    try:
        return client.call("stats", timeout=timeout)["stats"]
    except (NoServerError, RemoteError, OSError) as e:
        log.debug("%s: %s", client.membership.items[0], e)
        return None


def row(endpoint: str, st: dict | None, before: dict | None, dt: float) -> list[str]:
    if st is None:
        return [endpoint, "down", *["-"] * (len(COLUMNS) - 2)]
    rate = mbs = 0.0
    if before is not None and dt > 0:
        rate = (st["images"] - before["images"]) / dt
        mbs = (st["bytes"] - before["bytes"]) / dt / 1e6
    return [
        endpoint,
        "up",
        _duration(st["uptime_s"]),
        f"{rate:.0f}",
        f"{mbs:.1f}",
        str(st.get("bytes_per_image", 0)),
        str(st["images"]),
        str(len(st.get("clients", {}))),
        str(st.get("queued", "-")),
        f"{st.get('worker_busy', 0):.2f}",
        str(st["errors"]),
        str(st.get("builder_restarts", 0)),
    ]


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_table(rows: list[list[str]]) -> str:
    lines = [
        "  ".join(name.rjust(w) if i else name.ljust(w) for i, (name, w) in enumerate(COLUMNS))
    ]
    for r in rows:
        lines.append(
            "  ".join(
                v.rjust(w) if i else v.ljust(w) for i, (v, (_, w)) in enumerate(zip(r, COLUMNS))
            )
        )
    return "\n".join(lines)


class StatusBoard:
    """Keeps one client per server and the previous stats, for rates."""

    def __init__(self, spec, timeout: float = 2.0):
        self.membership = Membership(spec, refresh=0)
        self.timeout = timeout
        self._clients: dict[str, BatchClient] = {}
        self._last: dict[str, tuple[float, dict | None]] = {}

    def table(self) -> str:
        rows = []
        for endpoint in self.membership.current():
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = BatchClient(endpoint, dead_after=self.timeout)
            now = time.monotonic()
            st = poll(client, self.timeout)
            t0, before = self._last.get(endpoint, (now, None))
            rows.append(row(endpoint, st, before, now - t0))
            self._last[endpoint] = (now, st)
        return format_table(rows)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


def add_arguments(p) -> None:
    p.add_argument("endpoints", nargs="+", help="tcp://HOST:PORT, dns:NAME:PORT or file:PATH")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a server")
    p.add_argument("--once", action="store_true", help="print one table (with rates) and exit")


def main(a) -> int:
    board = StatusBoard(",".join(a.endpoints), timeout=a.timeout)
    live = sys.stdout.isatty() and not a.once
    try:
        board.table()  # the first poll only sets the baseline for rates
        while True:
            time.sleep(a.interval)
            text = board.table()
            print(("\x1b[H\x1b[2J" if live else "") + text, flush=True)
            if a.once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        board.close()
