"""``datasvc bench``: every loader backend on the same pack, batch size, image size and cores,
beside the machine's bound (full JPEG decode of the same files, no resize, same cores).

The backends and the bound take turns for ``--repeats`` rounds; in each round a backend gets a
fresh loader, ``--warmup`` untimed epochs (2: caches, heaps and pools reach their steady
state) and three timed epochs. Images/s is the median over
rounds, ratios are medians of per-round ratios. Memory is the proportional set size (PSS) of
the loader's whole process tree, so shared pages are not counted twice.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import psutil

from benchmarks.cli import add_arguments
from benchmarks.report import bar_plot, machine, markdown_table, write_json

log = logging.getLogger(__name__)
CACHE = Path(os.environ.get("DATASVC_CACHE", Path.home() / ".cache" / "datasvc"))


def sample_pack() -> Path:
    """The built-in sample, made and converted once, cached."""
    from converters.convert import ConvertConfig, convert
    from datasvc.packs import MANIFEST_NAME
    from datasvc.sample import write_sample

    pack = CACHE / "bench-sample-v2" / "pack"
    if (pack / MANIFEST_NAME).exists():
        return pack
    tree = CACHE / "bench-sample-v2" / "tree"
    shutil.rmtree(tree.parent, ignore_errors=True)
    log.info("making the benchmark sample under %s (once)", tree.parent)
    write_sample(tree, classes=10, per_class=100, val_per_class=25, seed=0)
    convert(tree, pack, ConvertConfig(workers=2), progress=False)
    shutil.rmtree(tree, ignore_errors=True)
    return pack


# --- measurement helpers -------------------------------------------------------------------


class TreeMonitor:
    """Samples PSS (or RSS) of a process and all its descendants; tracks CPU time.

    Reading PSS costs ~9 ms per torch-sized process (smaps_rollup), so it is sampled every
    ``interval`` seconds (and at each epoch's end by the caller), not more often: sampling every
    0.25 s took ~7% of this 2-core machine from the loaders being measured."""

    def __init__(self, pid: int | None = None, interval: float = 2.0, exclude: int | None = None):
        self.proc = psutil.Process(pid or os.getpid())
        self.exclude = exclude  # a child whose whole subtree is not ours to count
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = None

    def procs(self):
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            if self.exclude:
                skip = psutil.Process(self.exclude)
                gone = {skip.pid, *(c.pid for c in skip.children(recursive=True))}
                procs = [p for p in procs if p.pid not in gone]
            return procs
        except psutil.NoSuchProcess:
            return []

    def memory_mb(self) -> float:
        total = 0
        for p in self.procs():
            try:
                mi = p.memory_full_info()
                total += getattr(mi, "pss", mi.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.memory_mb())

    def __enter__(self):
        self.peak_mb = self.memory_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.memory_mb())


def _decode_share(args) -> float:
    from datasvc.decode import decode_full
    from datasvc.packs import open_pack

    pack, split, ids, reuse = args
    sp = open_pack(pack).split(split)
    images = [sp[i].image for i in ids]
    buffer = None
    if reuse:  # one reused, cache-hot buffer: the decoder's own cost, the strict bound
        buffer = bytearray(max(s.height * s.width * 3 for s in map(sp.__getitem__, ids)))
    t = time.perf_counter()
    for data in images:
        decode_full(data, buffer)  # buffer None: a new array per image, the library default
    return time.perf_counter() - t


class DecodeLimit:
    """Full JPEG decode only (no resize) of the split's images over ``workers`` processes:
    into one reused buffer (``reuse``, the bound) or into a new array per image."""

    def __init__(self, pack: str, split: str, workers: int):
        from datasvc.packs import open_pack

        self.n = len(open_pack(pack).split(split))
        self.workers = workers
        self.ids = [list(range(w, self.n, workers)) for w in range(workers)]
        self.pack, self.split = pack, split
        self.pool = mp.get_context("fork").Pool(workers)
        self.once(True)  # warm-up: page cache, imports

    def once(self, reuse: bool = True) -> float:
        shares = [(self.pack, self.split, ids, reuse) for ids in self.ids]
        t = time.perf_counter()
        self.pool.map(_decode_share, shares)
        return self.n / (time.perf_counter() - t)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def bench_backend(
    backend: str,
    source: str,
    a,
    workers: int,
    epochs: int,
    exclude: int | None = None,
    warmup: int = 2,
    **kw,
) -> dict:
    """One run: build the loader, ``warmup`` untimed epochs, then ``epochs`` timed epochs."""
    from datasvc.loaders import create_loader

    try:
        loader = create_loader(
            backend,
            source,
            split=a.split,
            batch_size=a.batch_size,
            image_size=a.image_size,
            train=not a.eval,
            num_workers=workers,
            **kw,
        )
    except (ImportError, RuntimeError, KeyError) as e:
        return {"status": "unavailable", "reason": str(e).splitlines()[0]}

    def one_epoch(epoch: int) -> int:
        return sum(len(batch.ids) for batch in loader)

    mon = TreeMonitor(exclude=exclude)  # this process and its children (workers, a server)
    try:
        return time_epochs(one_epoch, mon, workers, epochs, warmup, loader.set_epoch)
    finally:
        loader.close()


def time_epochs(one_epoch, monitor, workers: int, epochs: int, warmup: int, set_epoch=None) -> dict:
    """``warmup`` untimed epochs, then ``epochs`` timed ones of ``one_epoch(epoch) -> images``:
    images/s and CPU use per worker of each timed epoch, and memory after every epoch.
    ``set_epoch(epoch)``, if given, runs before each epoch's clock starts."""
    rates, mems, cpu, n = [], [], [], 0
    with monitor:
        for epoch in range(warmup + epochs):
            if set_epoch is not None:
                set_epoch(epoch)
            c0, t0 = monitor.cpu_seconds(), time.perf_counter()
            n = one_epoch(epoch)
            dt = time.perf_counter() - t0
            used = monitor.cpu_seconds() - c0
            mems.append(round(monitor.memory_mb(), 1))
            if epoch >= warmup:
                rates.append(n / dt)
                cpu.append(used / dt / workers)
    return {
        "status": "ok",
        "rates": rates,
        "cpu": cpu,
        "peak_mb": monitor.peak_mb,
        "memory_mb_per_epoch": mems,
        "epoch_images": n,
    }


# Entries that are not loader backends: a backend with other options, or DALI's own pipeline.
VARIANTS = {"torch_tensor": ("torch", {"decode": "tensor"})}
NOTES = {
    "torch_tensor": "torchvision.io tensor decode (decode_jpeg for JPEGs), v2 transforms on "
    "tensors",
    "dali_native": "DALI's own reader, shuffle and fused image_random_crop (not our sampler: "
    "no exactly-once, no resume)",
}


def bench_entry(name, source, a, workers, epochs, exclude, warmup, **kw) -> dict:
    """``bench_backend`` for a backend or a variant; ``dali_native`` runs DALI's own pipeline
    on the pack's TFRecord twin."""
    if name == "dali_native":
        from benchmarks.dali_native import bench_dali_native
        from benchmarks.storage import tfrecord_twin

        twin = tfrecord_twin(source, a.split)
        return bench_dali_native(twin, a, workers, epochs, warmup, TreeMonitor(exclude=exclude))
    backend, options = VARIANTS.get(name, (name, {}))
    return bench_backend(backend, source, a, workers, epochs, exclude, warmup, **options, **kw)


def _local_server(backends: list[str], pack: str, workers: int):
    """A ``datasvc serve`` of the pack on 127.0.0.1 when ``remote`` is benchmarked."""
    if "remote" not in backends:
        return None
    try:
        from datasvc.service.local import LocalServer

        return LocalServer([pack], workers=workers).start()
    except Exception as e:  # noqa: BLE001 - reported as the remote row's reason
        log.warning("remote: local server failed: %s", e)
        return None


def _one_round(rnd: int, a, pack: str, backends, workers: int, server, runs, limit) -> tuple:
    """Each backend once, beside the decode bounds measured at the start of the round (the
    reusing and the plain decode); returns those two."""
    bound, plain = limit.once(reuse=True), limit.once(reuse=False)
    for backend in backends:
        kw, source = {}, pack
        if backend == "remote":
            if server is None:
                runs[backend].append(
                    {"status": "unavailable", "reason": "local server did not start"}
                )
                continue
            source, kw = server.endpoint, {"pack": server.pack_name}
        # 3 timed epochs a round: ~1.5 s of work, so start-up noise weighs little;
        # round 1 also shows that memory stays flat.
        other = server.pid if server is not None and backend != "remote" else None
        r = bench_entry(backend, source, a, workers, 3, other, a.warmup, **kw)
        r["limit"], r["plain"] = bound, plain
        runs[backend].append(r)
        rate = statistics.median(r["rates"]) if r["status"] == "ok" else None
        msg = f"{rate:.0f} images/s" if rate else f"unavailable: {r['reason']}"
        log.info("round %d: %s: %s (decode limit %.0f)", rnd + 1, backend, msg, bound)
    return bound, plain


def _summary_row(backend: str, rs: list[dict], pack: str, workers: int, server_stats) -> dict:
    """One backend's rounds → its row: medians over rounds, ratios taken within a round."""
    if not rs or rs[0]["status"] != "ok":
        reason = rs[0]["reason"] if rs else "not run"
        return {"backend": backend, "status": "unavailable", "reason": reason}
    per_round = [statistics.median(r["rates"]) for r in rs]
    ips = statistics.median(per_round)
    row = {
        "backend": backend,
        "status": "ok",
        "reason": "",
        "images_per_s": ips,
        "images_per_s_per_core": ips / workers,
        "vs_decode_limit": statistics.median(x / r["limit"] for x, r in zip(per_round, rs)),
        "vs_plain_decode": statistics.median(x / r["plain"] for x, r in zip(per_round, rs)),
        "cpu_util": statistics.median(c for r in rs for c in r["cpu"]),
        "peak_rss_mb": round(max(r["peak_mb"] for r in rs), 1),
        "memory_mb_per_epoch": rs[0]["memory_mb_per_epoch"],
        "rounds": per_round,
    }
    row.update(_backend_details(backend, pack, workers))
    if backend in NOTES:
        row["note"] = NOTES[backend] + (f"; {row['dali']}" if "dali" in row else "")
    if backend == "remote":
        row.update(server_stats or {})
    return row


def _backend_details(backend: str, pack: str, workers: int) -> dict:
    """What the row should say about the backend's libraries and the pack's layout."""
    if backend == "torch":
        from datasvc.loaders.torchvision_loader import pil_info

        return {"pil": pil_info()}
    if backend == "custom":
        from datasvc.decode import CROP_DECODER
        from datasvc.packs import open_pack

        # packs written before the option existed hold the files' own bytes
        layout = open_pack(pack).manifest["options"].get("jpeg_layout", "original")
        return {"decoder": CROP_DECODER, "jpeg_layout": layout}
    if backend.startswith("dali"):
        import nvidia.dali

        return {"dali": f"DALI {nvidia.dali.__version__}, {workers} threads"}
    return {}


def _add_ratios(results: list[dict]) -> None:
    """``vs_<reference>`` on every row: the median of per-round ratios against DALI's CPU
    pipelines and the torch baseline (the stronger of PIL and tensor decode, round by round)."""
    ok = {r["backend"]: r for r in results if r["status"] == "ok"}
    refs = {k: ok[k]["rounds"] for k in ("dali_cpu", "dali_native") if k in ok}
    torches = [ok[k]["rounds"] for k in ("torch", "torch_tensor") if k in ok]
    if torches:
        refs["torch"] = [max(xs) for xs in zip(*torches)]
    for r in ok.values():
        for ref, ys in refs.items():
            r[f"vs_{ref}"] = statistics.median(x / y for x, y in zip(r["rounds"], ys))


def run(a) -> dict:
    """Backends and the decode limit are measured round-robin, ``repeats`` rounds, so that
    whatever else the machine does weighs on all of them alike; ratios are taken within a
    round and their median reported."""
    from datasvc.memory import recycle_large_allocations

    recycle_large_allocations()  # as the trainer does in its own process (see there)
    pack = str(a.pack or sample_pack())
    workers = a.workers or len(os.sched_getaffinity(0))
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    log.info(
        "pack %s, split %s, batch %d, image %d, %d workers, %d rounds (warm-up excluded)",
        *(pack, a.split, a.batch_size, a.image_size, workers, a.repeats),
    )
    limit = DecodeLimit(pack, a.split, workers)
    server = _local_server(backends, pack, workers)
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    server_stats, limits, plain = None, [], []
    try:
        for rnd in range(a.repeats):
            bound, plain_rate = _one_round(rnd, a, pack, backends, workers, server, runs, limit)
            limits.append(bound)
            plain.append(plain_rate)
        server_stats = server.stats() if server is not None else None
    finally:
        limit.close()
        if server is not None:
            server.stop()
    results = [_summary_row(b, runs[b], pack, workers, server_stats) for b in backends]
    _add_ratios(results)
    return _report(a, pack, workers, results, (limits, plain, limit.n))


def _report(a, pack: str, workers: int, results: list[dict], bounds: tuple) -> dict:
    limits, plain, n_images = bounds
    config = {
        "pack": pack,
        "split": a.split,
        "batch_size": a.batch_size,
        "image_size": a.image_size,
        "workers": workers,
        "rounds": a.repeats,
        "train": not a.eval,
    }
    lim = {
        "images_per_s": statistics.median(limits),
        "rounds": limits,
        "images": n_images,
        "workers": workers,
        "decoder": "simplejpeg (libjpeg-turbo), full image, no resize",
    }
    plain_decode = {"images_per_s": statistics.median(plain), "rounds": plain,
                    "decoder": "simplejpeg.decode_jpeg(data): a new array per image"}  # fmt: skip
    return {"results": results, "decode_limit": lim, "plain_decode": plain_decode,
            "config": config, "machine": machine()}  # fmt: skip


COLUMNS = [
    ("backend", "backend"),
    ("images_per_s", "images/s"),
    ("images_per_s_per_core", "per core"),
    ("vs_decode_limit", "vs decode limit"),
    ("vs_plain_decode", "vs plain decode"),
    ("vs_torch", "vs torch"),
    ("vs_dali_cpu", "vs dali_cpu"),
    ("vs_dali_native", "vs dali_native"),
    ("cpu_util", "CPU util"),
    ("peak_rss_mb", "peak MB"),
    ("reason", "note"),
]


def format_table(res: dict) -> str:
    rows = []
    for r in res["results"]:
        row = dict(r)
        ratios = ("vs_decode_limit", "vs_plain_decode", "vs_torch", "vs_dali_cpu", "vs_dali_native")
        for k in (*ratios, "cpu_util"):
            if k in row:
                row[k] = f"{row[k]:.2f}"
        if r["status"] != "ok":
            row["reason"] = f"unavailable: {r['reason']}"
        elif r.get("note"):
            row["reason"] = r["note"]
        elif r.get("pil"):
            row["reason"] = r["pil"]
        elif r.get("dali"):
            row["reason"] = r["dali"]
        elif r.get("decoder"):
            row["reason"] = f"decoder {r['decoder']}, {r['jpeg_layout']} JPEGs"
        elif r.get("bytes_per_image"):
            row["reason"] = f"{r['bytes_per_image'] / 1024:.0f} KiB/image on the wire"
        rows.append(row)
    lim = res["decode_limit"]
    rows.append(
        {
            "backend": "decode limit",
            "images_per_s": lim["images_per_s"],
            "images_per_s_per_core": lim["images_per_s"] / lim["workers"],
            "vs_decode_limit": "1.00",
            "reason": "full decode into one reused buffer, no resize (the bound)",
        }
    )
    plain = res["plain_decode"]["images_per_s"]
    rows.append(
        {
            "backend": "plain decode",
            "images_per_s": plain,
            "images_per_s_per_core": plain / lim["workers"],
            "vs_decode_limit": f"{plain / lim['images_per_s']:.2f}",
            "vs_plain_decode": "1.00",
            "reason": "simplejpeg.decode_jpeg(data): a new array per image, no resize",
        }
    )
    return markdown_table(rows, COLUMNS)


def main(a) -> int:
    res = run(a)
    print(format_table(res))
    if a.json:
        write_json(a.json, res)
        print(f"wrote {a.json}")
    if a.plot:
        ok = [r for r in res["results"] if r["status"] == "ok"]
        bar_plot(
            a.plot,
            [r["backend"] for r in ok],
            [r["images_per_s"] for r in ok],
            f"Loader throughput, {res['config']['workers']} workers, batch "
            f"{res['config']['batch_size']}, {res['config']['image_size']}px",
            "images/s",
            ("full-decode bound", res["decode_limit"]["images_per_s"]),
        )
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
