"""``datasvc serve``: its command-line arguments and start-up. The service itself is the broker
(``broker.py``), the builder pool (``builders.py``) and the shared slot ring (``slots.py``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
    p.add_argument("--curve-allow", help="folder of allowed clients' public .key files")
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


def main(a) -> int:
    _log_to_stderr()
    builders = a.workers or len(os.sched_getaffinity(0))
    try:
        broker = Broker(
            BrokerConfig(
                packs=parse_pack_args(a.packs),
                bind=a.bind,
                builders=builders,
                engine=a.engine,
                curve_secret=a.curve_secret,
                curve_allow=a.curve_allow,
                insecure=a.insecure,
                log_interval=a.log_interval,
                limits=Limits(a.max_batch_mb, a.max_eval_resize, a.credits or builders + 2),
                announce=a.announce,
                advertise=a.advertise,
                metrics_port=a.metrics_port,
                metrics_addr=a.metrics_addr,
            )
        )
    except (ValueError, KeyError, OSError) as e:
        print(f"datasvc serve: error: {e}", file=sys.stderr)
        return 2
    broker.serve_forever()
    return 0
