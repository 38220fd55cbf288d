"""Conversion throughput: against the machine's JPEG decode bound, per source layout, per engine,
and its peak memory against the source's size.

    python -m benchmarks.convert [--suite decode,sources,ray,memory,plan] [--workers 2]
                                 [--rounds 3] [--ray-scale 4] [--plan-images 100000]
                                 [--memory-scales 1,4]
                                 [--json F] [--plot F]

All on the built-in sample (10 classes x 160 train + 40 val images, ImageNet-like sizes), 2
workers, LMDB. Cases run in turns, round after round, and ratios are medians of per-round
ratios. ``decode``: the audit entropy-decodes every image (the segmented layout's lossless
transcode) or decodes it fully, so the decode rate of the same files bounds conversion; the
target is 0.7 of that bound per worker. ``sources``: the same images as the extracted tree, the
ILSVRC2012 tarballs, parquet and webdataset shards (target: tarballs >= 0.9 of the tree).
``ray``: the Ray engine on 2 local CPUs against the process engine (target >= 0.85), on an
already running Ray, and embedded (each run starts and stops its own Ray) on the tree
``--ray-scale`` times over, with and without the seconds its ``ray.init``/``ray.shutdown`` took.
``memory``: peak PSS of the whole conversion (driver and workers, and each on its own) for a
source and the same source ``--memory-scales`` times as large, at the same shard size (200
images). ``plan``: the bytes per image
the driver's plan holds (listings and shard jobs; tracemalloc) and the peak while making it,
for ImageNet-named few-byte files (``--plan-images`` of them) as a tree, the tarballs and
webdataset tars.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import simplejpeg

from benchmarks.report import bar_plot, commit, markdown_table, write_json
from converters import sample_sources
from converters.convert import ConvertConfig, convert

SUITES = ("decode", "sources", "ray", "memory", "plan")


def _decode_files(paths: list[str]) -> int:
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        try:
            simplejpeg.decode_jpeg(data)
        except ValueError:  # PNG/CMYK oddities: the audit uses PIL there; count them as decoded
            pass
    return len(paths)


def decode_bound(paths: list[str], workers: int) -> None:
    chunks = [paths[i::workers] for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_files, chunks)


CPU_TIMES: dict[str, list[float]] = {}  # CPU seconds per case per round, from rounds_of


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rounds_of(cases: dict, rounds: int) -> dict[str, list[float]]:
    """Wall seconds per case per round (CPU seconds go to ``CPU_TIMES``); every case runs once
    per round (after one warm-up round), in an order rotated each round so no case always
    runs first."""
    names = list(cases)
    times = {n: [] for n in names}
    for n in names:
        CPU_TIMES[n] = []
    for r in range(rounds + 1):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t, c = time.perf_counter(), _cpu_seconds()
            cases[n]()
            if r:
                times[n].append(time.perf_counter() - t)
                CPU_TIMES[n].append(_cpu_seconds() - c)
    return times


def _converter(src: Path, work: Path, workers: int, val_labels=None, val_synsets=None, **kw):
    """A timed case: convert ``src`` into a fresh pack with these options."""

    def once():
        out = work / "pack"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ConvertConfig(workers=workers, shards=4 * workers, **kw)
        convert(src, out, cfg, val_labels=val_labels, val_synsets=val_synsets, progress=False)

    return once


def _ratio(times: dict, case: str, ref: str) -> float:
    """Median over rounds of ref's seconds / case's seconds (the case's relative speed)."""
    return statistics.median(_per_round(times, case, ref))


def _per_round(times: dict, case: str, ref: str) -> list[float]:
    return [round(r / c, 3) for c, r in zip(times[case], times[ref])]


def suite_decode(tree: Path, work: Path, workers: int, rounds: int, n: int) -> list[dict]:
    paths = sorted(str(p) for p in tree.rglob("*") if p.is_file())
    cases = {
        "JPEG decode only, 1 core": lambda: _decode_files(paths),
        f"JPEG decode only, {workers} processes": lambda: decode_bound(paths, workers),
        "convert, segmented (default)": _converter(tree, work, workers),
        "convert --jpeg-layout original": _converter(tree, work, workers, jpeg_layout="original"),
        "convert --max-side 512": _converter(tree, work, workers, max_side=512),
    }
    times = rounds_of(cases, rounds)
    single, bound = list(cases)[:2]
    rows = []
    for name, ts in times.items():
        row = {"case": name, "images_per_s": n / statistics.median(ts)}
        row["cpu_us_per_image"] = 1e6 * statistics.median(CPU_TIMES[name]) / n
        if name.startswith("convert"):
            row["per_worker_vs_1core_decode"] = _ratio(times, name, single) / workers
            row["vs_decode_bound"] = _ratio(times, name, bound)
            row["cpu_vs_decode"] = _ratio(CPU_TIMES, name, single)
            row["rounds_cpu_vs_decode"] = _per_round(CPU_TIMES, name, single)
        rows.append(row)
    return rows


def _sources(tree: Path, base: Path) -> dict:
    """The sample as every layout: the extracted tree (flat val), tarballs, parquet, wds."""
    flat = base / "tree"
    shutil.copytree(tree, flat)
    src = sample_sources.flatten_val(flat)
    return {
        "src": src,
        "extracted tree": flat,
        "ILSVRC2012 tarballs": sample_sources.ilsvrc_tarballs(src, base / "ilsvrc"),
        "parquet (HF layout)": sample_sources.parquet_shards(src, base / "pq", row_group_size=256),
        "webdataset tars": sample_sources.webdataset_tars(src, base / "wds"),
    }


def suite_sources(tree: Path, work: Path, workers: int, rounds: int, n: int) -> list[dict]:
    layouts = _sources(tree, work / "sources")
    flat = layouts["extracted tree"]
    labels = {"val_labels": str(flat / "gt.txt"), "val_synsets": str(flat / "synsets.txt")}
    cases = {"extracted tree": _converter(flat, work, workers, **labels)}
    for name in ("ILSVRC2012 tarballs", "parquet (HF layout)", "webdataset tars"):
        cases[name] = _converter(layouts[name], work, workers)
    times = rounds_of(cases, rounds)
    return [
        {
            "case": f"convert from {name}",
            "images_per_s": n / statistics.median(ts),
            "s_per_1000": 1000 * statistics.median(ts) / n,
            "vs_tree": _ratio(times, name, "extracted tree"),
            "rounds_vs_tree": _per_round(times, name, "extracted tree"),
            "cpu_us_per_image": 1e6 * statistics.median(CPU_TIMES[name]) / n,
            "cpu_vs_tree": _ratio(CPU_TIMES, name, "extracted tree"),
        }
        for name, ts in times.items()
    ]


class _RayStartup:
    """Times every ``ray.init`` and ``ray.shutdown`` made while installed (the embedded
    engine's own calls, with its own options): the startup an embedded run pays."""

    def __init__(self, ray):
        self.ray, self.seconds = ray, []

    def __enter__(self):
        self._init, self._shutdown = self.ray.init, self.ray.shutdown
        self.ray.init, self.ray.shutdown = self._timed(self._init), self._timed(self._shutdown)
        return self

    def __exit__(self, *exc):
        self.ray.init, self.ray.shutdown = self._init, self._shutdown

    def _timed(self, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - t)

        return call


def _scaled_tree(tree: Path, dest: Path, factor: int) -> Path:
    """The tree ``factor`` times over: each class folder copied under new names (real copies:
    a link would be the same file, counted once)."""
    for split in ("train", "val"):
        for cls in sorted(p for p in (tree / split).iterdir() if p.is_dir()):
            for j in range(factor):
                shutil.copytree(cls, dest / split / f"{cls.name}{j}")
    return dest


def _embedded_ray(tree: Path, work: Path, workers: int, rounds: int, factor: int) -> list[dict]:
    """The embedded engine (starts and stops its own Ray every run) against the process engine
    on the tree ``factor`` times over, with and without the seconds its ray.init and
    ray.shutdown took in that same run."""
    import ray

    big = _scaled_tree(tree, work / f"ray-x{factor}", factor) if factor > 1 else tree
    images = sum(1 for p in big.rglob("*") if p.is_file())
    cases = {
        "process engine": _converter(big, work, workers),
        "Ray engine, embedded": _converter(big, work, workers, engine="ray"),
    }
    with _RayStartup(ray) as startup:
        times = rounds_of(cases, rounds)
    # one init and one shutdown per embedded run; the warm-up round's pair is dropped
    pairs = startup.seconds[2:]
    starts = [pairs[i] + pairs[i + 1] for i in range(0, len(pairs), 2)]
    without = [t - s for t, s in zip(times["Ray engine, embedded"], starts)]
    proc = times["process engine"]
    incl = _per_round(times, "Ray engine, embedded", "process engine")
    excl = [round(p / w, 3) for p, w in zip(proc, without)]
    label = f"{images} images"
    return [
        {"case": f"process engine, {label}", "images_per_s": images / statistics.median(proc)},
        {
            "case": f"Ray engine, embedded, {label}, including Ray's startup",
            "images_per_s": images / statistics.median(times["Ray engine, embedded"]),
            "vs_process": statistics.median(incl),
            "rounds_vs_process": incl,
            "startup_s": statistics.median(starts),
            "rounds_startup_s": [round(s, 2) for s in starts],
        },
        {
            "case": f"Ray engine, embedded, {label}, excluding Ray's startup",
            "images_per_s": images / statistics.median(without),
            "vs_process": statistics.median(excl),
            "rounds_vs_process": excl,
        },
    ]


def suite_ray(
    tree: Path, work: Path, workers: int, rounds: int, n: int, factor: int = 4
) -> list[dict]:
    import ray

    rows = _embedded_ray(tree, work, workers, rounds, factor)
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        cases = {
            "process engine": _converter(tree, work, workers),
            "Ray engine, Ray running": _converter(tree, work, workers, engine="ray"),
        }
        times = rounds_of(cases, rounds)
    finally:
        ray.shutdown()
    running = [
        {
            "case": f"{name}, {n} images",
            "images_per_s": n / statistics.median(ts),
            "vs_process": _ratio(times, name, "process engine"),
            "rounds_vs_process": _per_round(times, name, "process engine"),
        }
        for name, ts in times.items()
    ]
    return running + rows


def peak_pss_mb(argv: list[str]) -> dict:
    """Run a command and sample its process tree's PSS every 50 ms. Returns (in MB) the peak of
    the whole tree (what the machine saw: it depends on whether the workers' transient peaks, a
    row group or a transaction, happened to coincide, which a longer run makes likelier), the
    sum of each process's own peak (which bounds it whatever the timing), the driver's own peak
    (where the O(N) plan lives) and the largest worker's, and the seconds it ran."""
    import psutil

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, own, t0 = 0.0, {}, time.perf_counter()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                pss = p.memory_full_info().pss
                total += pss
                own[p.pid] = max(own.get(p.pid, 0), pss)
        except psutil.Error:
            pass
        peak = max(peak, total / 2**20)
        time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"{argv} failed with {proc.returncode}")
    driver = own.pop(proc.pid, 0)
    return {
        "peak_pss_mb": peak,
        "sum_of_peaks_mb": (driver + sum(own.values())) / 2**20,
        "driver_peak_mb": driver / 2**20,
        "worker_peak_mb": max(own.values(), default=0) / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def _scaled(src: dict, factor: int) -> dict:
    """The same images ``factor`` times over, under new class names and val file names."""
    wnids = [f"{w}{j}" for j in range(factor) for w in src["wnids"]]
    train = {f"{w}{j}": src["train"][w] for j in range(factor) for w in src["wnids"]}
    items = list(src["val"].values())
    val = {
        f"ILSVRC2012_val_{k + 1:08d}.JPEG": (data, f"{w}{j}")
        for k, (j, (data, w)) in enumerate((j, it) for j in range(factor) for it in items)
    }
    return {**src, "wnids": sorted(wnids), "synsets": sorted(wnids), "train": train, "val": val}


def _memory_source(name: str, scaled: dict, dest: Path) -> Path:
    if name == "ILSVRC2012 tarballs":
        return sample_sources.ilsvrc_tarballs(scaled, dest, labels="kaggle")
    return sample_sources.parquet_shards(scaled, dest, row_group_size=256)


def suite_memory(
    tree: Path, work: Path, workers: int, rounds: int, n: int, scales=(1, 4)
) -> list[dict]:
    src = sample_sources.flatten_val(shutil.copytree(tree, work / "mem-tree"))
    rows = []
    for factor in scales:
        scaled = _scaled(src, factor)
        images = sum(len(v) for v in scaled["train"].values()) + len(scaled["val"])
        for name in ("ILSVRC2012 tarballs", "parquet (HF layout)"):
            path = _memory_source(name, scaled, work / f"mem-src{factor}")
            out = work / f"mem-out-{factor}"
            # a fixed shard size: a writer's mapped shard pages count in its PSS
            argv = [sys.executable, "-m", "datasvc.cli", "convert", str(path), str(out), "-q",
                    "--workers", str(workers), "--shard-size", "200"]  # fmt: skip
            row = {"case": f"{name}, {images} images", **peak_pss_mb(argv)}
            row["plan_mb"] = _plan_mb(path)
            row["driver_less_plan_mb"] = row["driver_peak_mb"] - row["plan_mb"]
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(path, ignore_errors=True)  # the largest sources are GBs
    return rows


def _plan_mb(path: Path) -> float:
    """MB of the plan the driver holds for ``path``: the listings' columns, and the 8 bytes an
    image of train's permuted view."""
    from converters.convert import make_plan
    from converters.sources import SourceOptions

    planned = make_plan(path, ConvertConfig(shard_size=200), SourceOptions(workers=1))
    held = sum(l.candidates.nbytes for l in planned.listings)
    permuted = [l for l in planned.listings if l.name == "train" and not l.ordered]
    held += sum(8 * len(l.candidates) for l in permuted)
    return held / 2**20


def _named_files(images: int, classes: int = 100) -> dict:
    """ImageNet-named train files of a few bytes (a plan reads no image), one val per 25."""
    wnids = [f"n{4000000 + 1931 * c:08d}" for c in range(classes)]
    per = images // classes
    train = {w: {f"{w}_{10000 + i}.JPEG": b"x" for i in range(per)} for w in wnids}
    val = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": (b"v", wnids[k % classes]) for k in range(per)}
    return {"wnids": wnids, "synsets": wnids, "train": train, "val": val}


def _write_tree(src: dict, root: Path) -> Path:
    for w, files in src["train"].items():
        (root / "train" / w).mkdir(parents=True)
        for name, data in files.items():
            (root / "train" / w / name).write_bytes(data)
    return root


def _plan_bytes(path: Path) -> tuple[int, int, int]:
    """(images planned, bytes the plan holds, peak bytes while making it), by tracemalloc."""
    import gc
    import tracemalloc

    from converters.convert import make_plan
    from converters.sources import SourceOptions

    gc.collect()
    tracemalloc.start()
    planned = make_plan(path, ConvertConfig(shard_size=1024), SourceOptions(splits=("train",)))
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return sum(len(j.candidates) for j in planned.jobs), held, peak


def suite_plan(tree: Path, work: Path, workers: int, rounds: int, n: int, images: int) -> list:
    rows = []
    for scale in (images // 4, images):
        src = _named_files(scale)
        paths = {
            "tree": _write_tree(src, work / f"plan-tree{scale}"),
            "ILSVRC2012 tarballs": sample_sources.ilsvrc_tarballs(
                src, work / f"plan-ilsvrc{scale}", labels="kaggle"
            ),
            "webdataset tars": sample_sources.webdataset_tars(src, work / f"plan-wds{scale}"),
        }
        for name, path in paths.items():
            count, held, peak = _plan_bytes(path)
            rows.append(
                {
                    "case": f"{name}, {count} images",
                    "plan_b_per_image": held / count,
                    "peak_b_per_image": peak / count,
                    "plan_mb": held / 2**20,
                }
            )
            shutil.rmtree(path)
    return rows


def _sample(n_classes: int, per_class: int) -> Path:
    from datasvc.sample import write_sample

    tmp = Path(tempfile.mkdtemp(prefix="convsample-"))
    write_sample(tmp, classes=n_classes, per_class=per_class)
    return tmp


COLUMNS = [
    ("case", "case"),
    ("images_per_s", "images/s"),
    ("per_worker_vs_1core_decode", "per worker / 1-core decode"),
    ("vs_decode_bound", "vs N-process decode"),
    ("cpu_us_per_image", "CPU µs per image"),
    ("cpu_vs_decode", "1-core decode CPU / convert CPU"),
    ("s_per_1000", "s per 1,000 images"),
    ("cpu_vs_tree", "vs tree, CPU"),
    ("vs_tree", "vs extracted tree"),
    ("vs_process", "vs process engine"),
    ("startup_s", "Ray startup s"),
    ("peak_pss_mb", "peak PSS MB"),
    ("sum_of_peaks_mb", "sum of per-process peaks MB"),
    ("driver_peak_mb", "driver peak MB"),
    ("worker_peak_mb", "largest worker peak MB"),
    ("seconds", "seconds"),
    ("plan_b_per_image", "plan bytes per image"),
    ("peak_b_per_image", "peak bytes per image while planning"),
    ("plan_mb", "plan MB"),
    ("driver_less_plan_mb", "driver peak less its plan MB"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="ImageFolder tree (default: the built-in sample)")
    ap.add_argument("--suite", default=",".join(SUITES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--ray-scale",
        type=int,
        default=4,
        help="the embedded-Ray case converts the tree this many times over (startup amortised)",
    )
    ap.add_argument("--plan-images", type=int, default=100_000, help="images of the plan suite")
    ap.add_argument(
        "--memory-scales",
        default="1,4",
        help="the memory suite converts the sample this many times over, each (comma list)",
    )
    ap.add_argument("--json", default="out/bench-convert.json")
    ap.add_argument("--plot", default="out/bench-convert.png")
    a = ap.parse_args(argv)
    tree = a.tree or _sample(10, 160)
    work = Path(tempfile.mkdtemp(prefix="convbench-"))
    n = sum(1 for p in tree.rglob("*") if p.is_file())
    results = {}
    try:
        for suite in a.suite.split(","):
            kw = {
                "ray": {"factor": a.ray_scale},
                "plan": {"images": a.plan_images},
                "memory": {"scales": [int(x) for x in a.memory_scales.split(",")]},
            }.get(suite, {})
            rows = globals()[f"suite_{suite}"](tree, work, a.workers, a.rounds, n, **kw)
            results[suite] = rows
            cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
            for r in rows:
                for k, v in r.items():
                    if isinstance(v, float):
                        r[k] = round(v, 3 if "vs" in k or k.startswith("per") else 1)
            print(f"\n{suite}: {n} images, {a.workers} workers, median of {a.rounds} rounds")
            print(markdown_table(rows, cols), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if a.tree is None:
            shutil.rmtree(tree, ignore_errors=True)
    config = vars(a) | {"tree": str(a.tree), "commit": commit()}
    write_json(a.json, {"benchmark": "convert", "config": config, "images": n, **results})
    rows = [r for rs in results.values() for r in rs if "images_per_s" in r]
    if rows:  # --suite memory alone has no rates to plot
        bar_plot(a.plot, [r["case"] for r in rows], [r["images_per_s"] for r in rows],
                 "Conversion", "images/s")  # fmt: skip
    print(f"wrote {a.json}" + (f" and {a.plot}" if rows else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
