"""Fleet-scale service benchmarks (issue 10), each a ratio from one run, written as JSON.

    python -m benchmarks.fleet make-pack out/packs/tiny200k --records 200000
    python -m benchmarks.fleet listings out/packs/tiny200k      # CPU/image: 64 ranks vs 2
    python -m benchmarks.fleet link out/packs/sample-lmdb       # shaped 1 Gbit/s link (root)
    python -m benchmarks.fleet load out/packs/tiny200k --seconds 60   # 64 ranks x 2 servers

``listings``: server CPU seconds per image served (broker and builders, from /proc) with 64
ranks over 2 ranks, same images per round, a fresh epoch each round, median of rounds.
``link``: over a veth pair shaped by tc tbf, images/s of one ``remote`` rank as a fraction of
what the link can carry at the measured bytes per image, for uint8 batches and for crop
segments. ``load``: 64 rank threads against 2 servers for a fixed time: errors, exactly-once
per epoch, server memory first vs last window, per-rank data-wait p50/p99.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


# --- a pack of many small records -------------------------------------------------------------


def make_pack(out: Path, records: int, classes: int = 100, shards: int = 8) -> Path:
    """``records`` small (48x40) segmented JPEGs in ``classes`` classes, written straight to
    LMDB shards (64 distinct images, cycled: what is measured is the listing, not the bytes)."""
    from PIL import Image

    from converters.layout import transcode_segmented
    from datasvc.packs import Sample
    from datasvc.packs.lmdb import LMDBShardWriter
    from datasvc.packs.manifest import FORMAT_VERSION, write_json_atomic

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpegs.append(transcode_segmented(buf.getvalue()))
    (out / "train").mkdir(parents=True, exist_ok=True)
    per = -(-records // shards)
    infos = []
    for s in range(shards):
        name = f"train-{s:05d}-of-{shards:05d}.lmdb"
        w = LMDBShardWriter(out / "train" / name)
        for i in range(s * per, min(records, (s + 1) * per)):
            w.write(Sample(jpegs[i % 64], i % classes, f"img{i:07d}", 40, 48))
        infos.append({"file": name, **w.close()})
    manifest = {
        "format": "lmdb",
        "format_version": FORMAT_VERSION,
        "created_by": "benchmarks.fleet make-pack",
        "classes": [f"c{c:04d}" for c in range(classes)],
        "splits": {"train": {"num_samples": records, "shards": infos}},
        "options": {"format": "lmdb", "jpeg_layout": "segmented", "synthetic": True},
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out


# --- server CPU -----------------------------------------------------------------------------


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (alive ones)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _fetch(client, pack, rank, world, epoch, batches, batch_size, image_size) -> int:
    from datasvc.service.protocol import BatchRequest

    reqs = [
        BatchRequest(pack, "train", True, image_size, 0, epoch, rank, world, batch_size, b)
        for b in range(batches)
    ]
    return sum(h["n"] for h, _ in client.fetch(reqs))


def listings(pack: Path, rounds: int = 5, images: int = 25_600, batch_size: int = 16) -> dict:
    """Server CPU per image, 64 ranks over 2 ranks (alternating rounds, median). Each rank is
    a client connected once, as in a job; every round is a fresh epoch, so each pays for its
    listing (once per builder process)."""
    from datasvc.service.client import BatchClient
    from datasvc.service.local import LocalServer

    name = pack.name
    per_image = {2: [], 64: []}
    with LocalServer([pack], workers=2) as server:
        clients = {w: [BatchClient(server.endpoint, pack=name, credits=2) for _ in range(w)]
                   for w in per_image}  # fmt: skip
        try:
            for group in clients.values():
                for c in group:
                    c.wait_ready()
            _fetch(clients[2][0], name, 0, 1, 10_000, 4, batch_size, 32)  # warm-up
            epoch = 0
            for _ in range(rounds):
                for world, group in clients.items():
                    epoch += 1
                    per_rank = images // (world * batch_size)
                    cpu0 = process_tree_cpu(server.pid)
                    with concurrent.futures.ThreadPoolExecutor(world) as pool:
                        served = sum(
                            pool.map(
                                lambda r, w=world, g=group, n=per_rank, e=epoch: _fetch(
                                    g[r], name, r, w, e, n, batch_size, 32
                                ),
                                range(world),
                            )
                        )
                    per_image[world].append((process_tree_cpu(server.pid) - cpu0) / served)
        finally:
            for group in clients.values():
                for c in group:
                    c.close()
        stats = server.raw_stats()
    med = {w: statistics.median(v) for w, v in per_image.items()}
    return {
        "records": stats["packs"][name]["train"] if "packs" in stats else None,
        "images_per_round": images,
        "rounds": rounds,
        "cpu_us_per_image": {str(w): round(v * 1e6, 1) for w, v in med.items()},
        "ratio_64_over_2": round(med[64] / med[2], 3),
        "listings_by_builder": stats.get("listings_by_builder"),
        "epochs": epoch + 1,
    }


# --- the shaped link --------------------------------------------------------------------------


def _link_round(link, server, pack, decode, epochs, batch_size, num_workers) -> dict:
    """One client run over the link; with the server's CPU seconds (broker and builders) per
    image it served meanwhile and the client's (its timed batches)."""
    import subprocess

    cmd = [
        sys.executable, "-m", "benchmarks.link_client", server.endpoint, "--pack", pack,
        "--decode", decode, "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--num-workers", str(num_workers), "--no-digests",
    ]  # fmt: skip
    cpu0 = process_tree_cpu(server.pid)
    proc = link.popen(link.client_ns, cmd, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=600)
    server_cpu = process_tree_cpu(server.pid) - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"link client failed:\n{out[-2000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    keys = ("images", "seconds", "images_per_s", "bytes_per_image", "client_cpu_s_per_image")
    return {**{k: got[k] for k in keys}, "server_cpu_s_per_image": server_cpu / got["images_total"]}


def link_bench(
    pack: Path, rate: str = "1gbit", rounds: int = 3, epochs: int = 2, modes=("server", "client")
) -> dict:
    """images/s of one remote rank over a tbf-shaped veth link, per transport mode, as a
    fraction of the link's capacity at the measured bytes per image."""
    from benchmarks import netns
    from datasvc.service.local import LocalServer

    rate_bytes = _rate_bytes(rate)
    results: dict[str, list] = {m: [] for m in modes}
    with netns.Link(rate=rate) as link:
        server = LocalServer(
            [pack], workers=2, bind=f"tcp://{link.server_ip}:*", extra=["--insecure"],
            prefix=link.exec_prefix(link.server_ns),
        )  # fmt: skip
        with server:
            for _ in range(rounds):
                for mode in results:
                    results[mode].append(_link_round(link, server, pack.name, mode, epochs, 32, 2))
    out = {"rate": rate, "rate_bytes_per_s": rate_bytes, "rounds": rounds}
    for mode, runs in results.items():
        ips = statistics.median(r["images_per_s"] for r in runs)
        bpi = statistics.median(r["bytes_per_image"] for r in runs)
        out[mode] = {
            "images_per_s": round(ips, 1),
            "bytes_per_image": round(bpi),
            "link_capacity_images_per_s": round(rate_bytes / bpi, 1),
            "fraction_of_capacity": round(ips / (rate_bytes / bpi), 3),
            # where the cores went: CPU seconds per image on each host (median of rounds)
            "server_cpu_ms_per_image": _median_ms(runs, "server_cpu_s_per_image"),
            "client_cpu_ms_per_image": _median_ms(runs, "client_cpu_s_per_image"),
        }
        for host in ("server", "client"):  # cores kept busy at that rate
            ms = out[mode][f"{host}_cpu_ms_per_image"]
            out[mode][f"{host}_cores_busy"] = round(ips * ms / 1e3, 2)
    if "client" in out and "server" in out:
        out["bytes_ratio_client_over_server"] = round(
            out["client"]["bytes_per_image"] / out["server"]["bytes_per_image"], 3
        )
    return out


def link_table(result: dict) -> str:
    """The link result as a table: rate, share of the link, and where the CPU went."""
    cols = ("images_per_s", "link_capacity_images_per_s", "fraction_of_capacity",
            "bytes_per_image", "server_cpu_ms_per_image", "client_cpu_ms_per_image",
            "server_cores_busy", "client_cores_busy")  # fmt: skip
    rows = [("mode", "img/s", "capacity", "fraction", "B/img", "server ms/img",
             "client ms/img", "server cores", "client cores")]  # fmt: skip
    for mode in ("server", "client"):
        if mode in result:
            rows.append((mode, *(str(result[mode][c]) for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return f"link {result['rate']}, median of {result['rounds']} rounds\n" + "\n".join(lines)


def _median_ms(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs) * 1e3, 3)


def _rate_bytes(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f / 8
    raise ValueError(f"rate {rate!r}: write e.g. 1gbit or 500mbit")


# --- the load run ---------------------------------------------------------------------------


def _server_memory(pids: list[int]) -> dict[str, int]:
    """Bytes resident in the servers' process trees, by kind (``/proc/PID/status``): ``anon``
    (heaps: what a leak grows), ``file`` (mapped pack pages: the page cache's), ``shmem``
    (the shared slot ring, counted once per process that touched it); and the heaps by process
    role, summed over servers: ``anon_brokers``, ``anon_spawners``, ``anon_builders``."""
    import psutil

    total = dict.fromkeys(("anon", "file", "shmem", *(f"anon_{r}" for r in _ROLES)), 0)
    for pid in pids:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                role = _ROLES[0 if p.pid == pid else 1 if p.ppid() == pid else 2]
            except (OSError, psutil.Error):
                continue
            for line in status.splitlines():
                key, _, value = line.partition(":")
                kind = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}.get(key)
                if kind:
                    total[kind] += int(value.split()[0]) * 1024
                if kind == "anon":
                    total[f"anon_{role}"] += int(value.split()[0]) * 1024
    return total


_ROLES = ("brokers", "spawners", "builders")  # a server's process, its child, their children


def _load_rank(endpoints, pack, rank, world, stop, batch_size, image_size, step_s) -> dict:
    from datasvc.loaders import create_loader

    loader = create_loader(
        "remote", endpoints, pack=pack, rank=rank, world_size=world, batch_size=batch_size,
        image_size=image_size, seed=0, dead_after=60, request_timeout=30,
    )  # fmt: skip
    waits, by_epoch, finished = [], {}, []
    with loader:
        epoch = 0
        while not stop.is_set():
            loader.set_epoch(epoch)
            ids = by_epoch.setdefault(epoch, [])
            t = time.perf_counter()
            for b in loader:
                waits.append(time.perf_counter() - t)
                ids.extend(b.ids.tolist())
                if stop.is_set():
                    break
                time.sleep(step_s)  # the training step this rank's GPU would take
                t = time.perf_counter()
            else:
                finished.append(epoch)
            epoch += 1
    return {"waits": waits[1:], "by_epoch": by_epoch, "finished": finished}


def load_run(
    pack: Path, seconds: float = 60.0, world: int = 64, servers: int = 2, step_ms: float = 0.0
) -> dict:
    """``world`` rank threads against ``servers`` servers on loopback for ``seconds``; each
    rank takes ``step_ms`` per batch (0: as fast as the servers give, a saturation run)."""
    from contextlib import ExitStack

    from datasvc.packs import open_pack
    from datasvc.service.local import LocalServer

    n = len(open_pack(pack).split("train"))
    batch_size, image_size = 16, 32
    with ExitStack() as stack:
        live = [stack.enter_context(LocalServer([pack], workers=1)) for _ in range(servers)]
        endpoints = ",".join(s.endpoint for s in live)
        stop = threading.Event()
        memory: list[dict] = []
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(world) as pool:
            futures = [
                pool.submit(
                    _load_rank,
                    endpoints,
                    pack.name,
                    r,
                    world,
                    stop,
                    batch_size,
                    image_size,
                    step_ms / 1e3,
                )
                for r in range(world)
            ]
            while time.monotonic() - t0 < seconds:
                memory.append((time.monotonic() - t0, _server_memory([s.pid for s in live])))
                time.sleep(1.0)
            stop.set()
            ranks = [f.result() for f in futures]
        server_stats = [s.raw_stats() for s in live]
    out = _load_summary(ranks, memory, server_stats, n, world, batch_size, seconds)
    return {"step_ms": step_ms, **out}


def _load_summary(ranks, memory, server_stats, n, world, batch_size, seconds) -> dict:
    per_epoch = (n // (batch_size * world)) * batch_size * world
    duplicates, complete = 0, []
    epochs = sorted({e for r in ranks for e in r["by_epoch"]})
    for e in epochs:
        ids = [i for r in ranks for i in r["by_epoch"].get(e, [])]
        duplicates += len(ids) - len(set(ids))
        if all(e in r["finished"] for r in ranks):
            complete.append(len(set(ids)) == per_epoch)
    p50 = [float(np.percentile(r["waits"], 50)) for r in ranks if r["waits"]]
    p99 = [float(np.percentile(r["waits"], 99)) for r in ranks if r["waits"]]
    images = sum(len(r["waits"]) + 1 for r in ranks) * batch_size
    return {
        "seconds": seconds,
        "world": world,
        "servers": len(server_stats),
        "images": images,
        "images_per_s": round(images / seconds, 1),
        "server_errors": sum(s["errors"] for s in server_stats),
        "server_images": [s["images"] for s in server_stats],
        "duplicates": duplicates,
        "complete_epochs": len(complete),
        "complete_epochs_exact": all(complete),
        "server_memory": memory_summary(memory, seconds),
        "data_wait_ms_p50_median_rank": round(statistics.median(p50) * 1e3, 2),
        "data_wait_ms_p99_median_rank": round(statistics.median(p99) * 1e3, 2),
        "data_wait_ms_p99_worst_rank": round(max(p99) * 1e3, 2),
    }


def _mean_mb(samples, lo: float, hi: float, kinds=("anon",)) -> float | None:
    rows = [m for t, m in samples if lo <= t < hi]
    return (
        round(statistics.mean(sum(r[k] for k in kinds) for r in rows) / 2**20, 2) if rows else None
    )


def memory_summary(samples, seconds: float, warmup_s: float = 10.0, window_s: float = 10.0):
    """The servers' heaps (RssAnon of both process trees, MB, sampled every second at ``t`` s
    from the ranks' start), compared two ways: the first window after ``warmup_s`` (start-up:
    imports, the pack opened, first batches) against the last window; and, for runs of two
    minutes or more, the first minute against the last (the issue's "first and last minute
    within 5%"; the first minute includes start-up)."""
    end = seconds
    first = _mean_mb(samples, warmup_s, warmup_s + window_s)
    last = _mean_mb(samples, end - window_s, end + 1)
    out = {
        "kind": "RssAnon (heaps), both servers' process trees",
        "anon_mb_every_10s": [round(m["anon"] / 2**20, 1) for t, m in samples[::10]],
        "anon_mb_every_10s_by_role": {
            role: [round(m.get(f"anon_{role}", 0) / 2**20, 1) for t, m in samples[::10]]
            for role in _ROLES
        },
        "rss_mb_first_last_window": [
            _mean_mb(samples, warmup_s, warmup_s + window_s, ("anon", "file", "shmem")),
            _mean_mb(samples, end - window_s, end + 1, ("anon", "file", "shmem")),
        ],
        f"anon_mb_{window_s:g}s_window_after_{warmup_s:g}s_warmup": first,
        f"anon_mb_last_{window_s:g}s_window": last,
        "last_window_over_first_after_warmup": round(last / first, 4) if first and last else None,
    }
    if seconds >= 120:
        first_min, last_min = _mean_mb(samples, 0, 60), _mean_mb(samples, end - 60, end + 1)
        out["anon_mb_first_minute"], out["anon_mb_last_minute"] = first_min, last_min
        out["last_minute_over_first_minute"] = round(last_min / first_min, 4)
    return out


# --- command line -----------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-pack")
    mk.add_argument("out", type=Path)
    mk.add_argument("--records", type=int, default=200_000)
    for name in ("listings", "link", "load"):
        q = sub.add_parser(name)
        q.add_argument("pack", type=Path)
        q.add_argument("--json", type=Path, help="write the result here too")
        q.add_argument("--rounds", type=int, default=3)
        if name == "load":
            q.add_argument("--seconds", type=float, default=60.0)
            q.add_argument("--step-ms", type=float, default=0.0, help="each rank's step time")
        if name == "link":
            q.add_argument("--rate", default="1gbit")
            q.add_argument("--epochs", type=int, default=2, help="epochs per round")
            q.add_argument("--modes", default="server,client", help="transport modes to run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.cmd == "make-pack":
        print(make_pack(a.out, a.records))
        return 0
    if a.cmd == "listings":
        result = listings(a.pack, rounds=a.rounds)
    elif a.cmd == "link":
        modes = tuple(a.modes.split(","))
        result = link_bench(a.pack, rate=a.rate, rounds=a.rounds, epochs=a.epochs, modes=modes)
    else:
        result = load_run(a.pack, seconds=a.seconds, step_ms=a.step_ms)
    text = json.dumps(result, indent=1)
    print(text)
    if a.cmd == "link":
        print(link_table(result), file=sys.stderr)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
