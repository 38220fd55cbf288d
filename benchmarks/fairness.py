"""Fairness of ``datasvc serve``: what three normal clients get with and without a greedy one
beside them, side by side in one run (issue 9).

    python -m benchmarks.fairness [PACK] --rounds 5 --json out/bench-fairness.json

One server (2 process builders) on the pack (default: the built-in benchmark sample). Each
round has two phases in alternating order: three ``remote`` clients (threads) read one epoch
each, alone, or while a greedy client asks 10x its credits every 0.2 s and never reads (its
libzmq stops reading too: receive high-water mark 1). The figure is the three clients'
images/s with the greedy one over without it, per round; the median is reported, with the busy
replies the greedy client got.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

NORMAL_CLIENTS = 3
GREEDY_FACTOR = 10  # requests per burst, in units of the server's credits


def _read_epochs(endpoint: str, pack: str, batch_size: int, image_size: int) -> tuple:
    """Images/s of ``NORMAL_CLIENTS`` clients reading one epoch each, at the same time, and the
    "busy" replies they got (each costs its client a back-off)."""
    from datasvc.loaders import create_loader

    counts, busy = [0] * NORMAL_CLIENTS, [0] * NORMAL_CLIENTS

    def client(i: int) -> None:
        loader = create_loader(
            "remote", endpoint, pack=pack, batch_size=batch_size, image_size=image_size, seed=i
        )
        with loader:
            counts[i] = sum(len(b.ids) for b in loader)
            busy[i] = loader.client.busy_replies

    threads = [threading.Thread(target=client, args=(i,)) for i in range(NORMAL_CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), sum(busy)


class Greedy:
    """Asks ``GREEDY_FACTOR`` x credits every 0.2 s and never reads, until stopped."""

    def __init__(self, endpoint: str, pack: str, credits: int, batch_size: int, image_size: int):
        import zmq

        from datasvc.service.protocol import BatchRequest, request_header

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm, self.sock.rcvbuf = 1, 1 << 16
        self.sock.sndhwm = 100_000
        self.sock.connect(endpoint)
        self.frames = [
            request_header(
                BatchRequest(pack, "train", True, image_size, 99, 0, 0, 1, batch_size, b), b
            )
            for b in range(GREEDY_FACTOR * credits)
        ]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for f in self.frames:
                self.sock.send(f)
            self._stop.wait(0.2)

    def __enter__(self) -> Greedy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close(0)
        self.ctx.term()


def _ask(endpoint: str, op: str) -> dict:
    from datasvc.service.client import BatchClient

    c = BatchClient(endpoint, dead_after=30)
    try:
        return c.call(op)
    finally:
        c.close()


def _stats(endpoint: str) -> dict:
    return _ask(endpoint, "stats")["stats"]


def run(a) -> dict:
    from benchmarks.loaders import sample_pack
    from datasvc.service.local import LocalServer

    pack = str(a.pack or sample_pack())
    rounds = []
    with LocalServer([f"bench={pack}"], workers=2) as server:
        credits = _ask(server.endpoint, "ping")["limits"]["credits"]
        _read_epochs(server.endpoint, "bench", a.batch_size, a.image_size)  # warm-up
        for r in range(a.rounds):
            got = {}
            for phase in ("alone", "greedy") if r % 2 == 0 else ("greedy", "alone"):
                busy0 = _stats(server.endpoint)["busy"]
                if phase == "greedy":
                    with Greedy(server.endpoint, "bench", credits, a.batch_size, a.image_size):
                        read = _read_epochs(server.endpoint, "bench", a.batch_size, a.image_size)
                else:
                    read = _read_epochs(server.endpoint, "bench", a.batch_size, a.image_size)
                got[phase], got[f"{phase}_normal_busy"] = read
                got[f"{phase}_busy"] = _stats(server.endpoint)["busy"] - busy0 - read[1]
            got["ratio"] = got["greedy"] / got["alone"]
            log.info("round %d: %s", r, got)
            rounds.append(got)
    ratios = [x["ratio"] for x in rounds]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "commit": commit.stdout.strip(),
        "config": vars(a) | {"pack": pack, "normal_clients": NORMAL_CLIENTS, "builders": 2},
        "rounds": rounds,
        "median_ratio": statistics.median(ratios),
        "median_alone_images_per_s": statistics.median(x["alone"] for x in rounds),
        "median_greedy_images_per_s": statistics.median(x["greedy"] for x in rounds),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fairness", description=__doc__)
    p.add_argument("pack", nargs="?", help="pack (default: the built-in benchmark sample)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(a)
    ratios = ", ".join(f"{x['ratio']:.2f}" for x in res["rounds"])
    normal_busy = [(x["alone_normal_busy"], x["greedy_normal_busy"]) for x in res["rounds"]]
    print(
        f"normal clients with a greedy one / without: {res['median_ratio']:.2f}x "
        f"(per round {ratios}); alone {res['median_alone_images_per_s']:.0f} images/s, "
        f"with greedy {res['median_greedy_images_per_s']:.0f}; greedy busy replies per phase "
        f"{[x['greedy_busy'] for x in res['rounds']]}; normal clients' busy replies per phase "
        f"(alone, with greedy) {normal_busy}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
