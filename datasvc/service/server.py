"""``datasvc serve``: its command-line arguments and start-up. The service itself is the broker
(``broker.py``), the builder pool (``builders.py``) and the shared slot ring (``slots.py``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from datasvc.errors import UsageError, UserError
from datasvc.service.broker import Broker, BrokerConfig
from datasvc.service.protocol import DEFAULT_MAX_BATCH_MB, DEFAULT_MAX_EVAL_RESIZE, Limits

log = logging.getLogger(__name__)


def parse_pack_args(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its folder) → {name: path}."""
    packs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item.rstrip("/")).name
        if name in packs:
            raise ValueError(f"pack name {name!r} given twice")
        packs[name] = path
    if not packs:
        raise ValueError("name at least one pack to serve")
    return packs


def add_arguments(p) -> None:
    p.add_argument(
        "packs", nargs="+", help="packs to serve: PATH (named by its folder) or NAME=PATH"
    )
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="batch-building processes (default: the cores this process may use)",
    )
    p.add_argument("--curve-secret", help="server key file (from `datasvc keys`) with its secret")
    p.add_argument(
        "--curve-allow",
        help="folder of allowed clients' public .key files (SIGHUP re-reads it)",
    )
    p.add_argument(
        "--curve-allow-any",
        action="store_true",
        help="with --curve-secret: encrypt, but accept any client key (no allow-list)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to finish the batches in flight before exiting "
        "(default: %(default)s; a second SIGTERM exits at once)",
    )
    p.add_argument("--insecure", action="store_true", help="allow plain TCP beyond loopback")
    p.add_argument("--log-interval", type=float, default=10.0, help="seconds between stats lines")
    p.add_argument(
        "--engine",
        choices=["auto", "process", "thread"],
        default="auto",
        help="batch builders as processes (shared-memory slots; auto) or threads (inproc)",
    )
    p.add_argument(
        "--max-batch-mb",
        type=int,
        default=DEFAULT_MAX_BATCH_MB,
        help="refuse decoded batches over this size, n x S x S x 3 bytes (default: %(default)s)",
    )
    p.add_argument(
        "--max-eval-resize",
        type=int,
        default=DEFAULT_MAX_EVAL_RESIZE,
        help="refuse eval requests whose resize (shorter side before the center crop) is over "
        "this many px (default: %(default)s)",
    )
    p.add_argument(
        "--credits",
        type=int,
        default=None,
        help="requests one client may have queued or being built at once; more are answered "
        "'busy' (default: the builders + 2)",
    )
    _add_fleet_arguments(p)


def _add_fleet_arguments(p) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs datasvc[metrics])",
    )
    p.add_argument(
        "--metrics-addr", default="0.0.0.0", help="address for --metrics-port (default: all)"
    )
    p.add_argument(
        "--announce",
        metavar="FILE",
        help="add this server's endpoint to FILE (one a line) while it serves and remove it "
        "on stop: clients given file:FILE find it (shared storage; see the README for DNS)",
    )
    p.add_argument(
        "--advertise",
        metavar="ENDPOINT",
        help="the endpoint written by --announce (default: the bound one, with a wildcard "
        "address replaced by this host's name)",
    )


def _log_to_stderr() -> None:
    """Service log lines on stderr as ``datasvc serve: ...``, unless logging is configured."""
    logger = logging.getLogger("datasvc")
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("datasvc serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def check_curve(secret: str | None, allow: str | None, allow_any: bool) -> None:
    """Every key file and the allow folder, before anything starts: a mistake here is one line
    (``UserError``) instead of a server that refuses everyone or a traceback."""
    from datasvc.service.auth import check_allow_folder, check_secret_key

    if allow_any and allow:
        raise UsageError("--curve-allow-any and --curve-allow exclude each other", "give one")
    if (allow or allow_any) and not secret:
        raise UsageError(
            "--curve-allow needs --curve-secret", "give the server's .key_secret file too"
        )
    if secret and not (allow or allow_any):
        raise UsageError(
            "--curve-secret needs --curve-allow FOLDER (the allowed clients' public keys)",
            "or --curve-allow-any to accept any client key",
        )
    if secret:
        check_secret_key(secret)
    if allow:
        check_allow_folder(allow)


def check_bind(bind: str) -> None:
    """An endpoint that is not one, a port out of range or already in use: found before any
    process starts (libzmq would quietly bind port 99999 as some other port)."""
    import errno
    import socket
    from urllib.parse import urlparse

    if bind.startswith(("ipc://", "inproc://")):
        return
    if not bind.startswith("tcp://"):
        raise UsageError(
            f"--bind {bind} is not a ZeroMQ endpoint", "give tcp://HOST:PORT or ipc://PATH"
        )
    u = urlparse(bind)
    _, colon, port_text = u.netloc.rpartition(":")
    port_text = port_text if colon and not port_text.endswith("]") else ""  # [::1] has no port
    if port_text in ("*", "0"):
        return  # a wildcard port: ZeroMQ picks a free one
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(
            f"--bind {bind} has no valid port ({port_text or 'none'})",
            "give a port from 1 to 65535, or * for a free one",
        )
    port = int(port_text)
    host = u.hostname or ""
    host = "" if host in ("*", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"cannot bind {bind}: the port is in use",
                    "stop the other server on it or choose another --bind port",
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"cannot bind {bind}: no such address on this host",
                    "bind an address of this host, or tcp://0.0.0.0:PORT",
                ) from None


def main(a) -> int:
    """``datasvc serve``: check everything it was given, then serve until SIGTERM (drain) or
    SIGINT; exit 0. Expected failures raise ``UserError`` (one line, non-zero)."""
    _log_to_stderr()
    builders = a.workers or len(os.sched_getaffinity(0))
    if builders < 1:
        raise UsageError(f"--workers must be at least 1, got {builders}")
    check_curve(a.curve_secret, a.curve_allow, a.curve_allow_any)
    check_bind(a.bind)
    try:
        config = BrokerConfig(
            packs=parse_pack_args(a.packs),
            bind=a.bind,
            builders=builders,
            engine=a.engine,
            curve_secret=a.curve_secret,
            curve_allow=a.curve_allow,
            curve_allow_any=a.curve_allow_any,
            insecure=a.insecure,
            log_interval=a.log_interval,
            drain_timeout=a.drain_timeout,
            limits=Limits(a.max_batch_mb, a.max_eval_resize, a.credits or builders + 2),
            announce=a.announce,
            advertise=a.advertise,
            metrics_port=a.metrics_port,
            metrics_addr=a.metrics_addr,
        )
        broker = Broker(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    broker.serve_forever()
    return 0
