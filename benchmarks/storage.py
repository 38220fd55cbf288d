"""``datasvc bench --io``: storage backends side by side on the same images, warm and cold.

The same train images as an LMDB pack, a TFRecord pack and ImageFolder files (the packs'
own bytes, one file per record). For each, warm (the files read once, so the page cache holds
them) and cold (their pages dropped with ``posix_fadvise(DONTNEED)`` right before the timed
epoch, and ``mincore`` asked how much is still resident, reported): a bare read loop over the
epoch's random order (MB/s, records/s) and the images/s of a whole loader epoch: ``custom``
for the packs, the ``torch`` backend's folder mode for the files. A second table measures
``custom`` cold against warm with each read-ahead method and without one: a warm and a cold
epoch back to back for each, their ratio taken pair by pair.

Every measurement is the first epoch of a fresh loader (so no worker keeps pages mapped, and
cold and warm pay the same start-up); storages, states and methods take turns within each
of ``--repeats`` rounds, and ratios are medians of per-round ratios.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import machine, markdown_table, write_json

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("DATASVC_CACHE", Path.home() / ".cache" / "datasvc"))
STORAGES = ["lmdb", "tfrecord", "folder"]


def add_arguments(p) -> None:
    p.add_argument(
        "--io",
        nargs="?",
        const="",
        default=None,
        metavar="PACK_OR_TREE",
        help="benchmark storage backends (LMDB, TFRecord, ImageFolder files) warm and cold "
        "instead of loaders; on a pack, a source tree, or (no value) the built-in sample",
    )
    p.add_argument(
        "--read-ahead-methods",
        default="fadvise,madvise,thread",
        help="read-ahead methods --io compares, cold, against none (comma-separated)",
    )


# --- the same images in three storages ---------------------------------------------------


def mirror_pack(src, fmt: str, out: Path, split: str) -> Path:
    """Write ``split`` of pack ``src`` again in format ``fmt``: same records, same order,
    same shard boundaries, same bytes."""
    from datasvc.packs import MANIFEST_NAME, PACK_FORMATS, open_pack, shard_name
    from datasvc.packs.manifest import write_json_atomic

    pack = open_pack(src)
    sp, form = pack.split(split), PACK_FORMATS.get(fmt)
    (out / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for k, count in enumerate(sp.counts):
        name = shard_name(split, k, len(sp.counts), form.suffix)
        writer = form.writer(out / split / name, pack.classes)
        for i in range(count):
            writer.write(sp.shard(k)[i])
        shards.append({"file": name, **writer.close()})
    manifest = {k: v for k, v in pack.manifest.items() if k not in ("plan", "splits")}
    manifest.update(format=fmt, mirrored_from=str(src))
    manifest["splits"] = {split: {"num_samples": len(sp), "shards": shards}}
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return out


def export_folder(src, out: Path, split: str) -> Path:
    """Write every record of ``split`` as a file ``out/<split>/<class>/<name>``: the pack's
    own bytes, in an ImageFolder tree."""
    from datasvc.packs import open_pack

    pack = open_pack(src)
    sp = pack.split(split)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in pack.classes:
        (tmp / split / c).mkdir(parents=True, exist_ok=True)
    for i in range(len(sp)):
        s = sp[i]
        (tmp / split / pack.classes[s.label] / f"{i:08d}-{Path(s.key).name}").write_bytes(s.image)
    os.replace(tmp, out)
    return out


def _cache_root(source) -> Path:
    key = hashlib.sha1(os.path.realpath(source).encode()).hexdigest()[:10]
    return CACHE / "bench-io" / f"{Path(source).name}-{key}"


def tfrecord_twin(pack, split: str) -> Path:
    """``pack`` itself when it is a TFRecord pack, otherwise its TFRecord mirror (cached)."""
    from datasvc.packs import MANIFEST_NAME, open_pack

    if open_pack(pack).manifest["format"] == "tfrecord":
        return Path(pack)
    out = _cache_root(pack) / "tfrecord"
    if not (out / MANIFEST_NAME).exists():
        mirror_pack(pack, "tfrecord", out, split)
    return out


def _builtin_tree(root: Path) -> Path:
    from datasvc.sample import write_sample

    tree = root / "tree"
    if not (tree / "train").is_dir():
        print(f"making the storage sample under {root} (once)", file=sys.stderr)
        write_sample(root / "tree.part", classes=10, per_class=200, val_per_class=1, seed=0)
        os.replace(root / "tree.part", tree)
    return tree


def storage_set(source: str | None, split: str) -> dict[str, Path]:
    """{'lmdb', 'tfrecord', 'folder'} → paths holding the same images, made once and cached.

    ``source``: a pack (mirrored into the other format and exported as files), a source tree
    (converted to LMDB first), or None (the built-in sample: 2,000 train images)."""
    from converters.convert import ConvertConfig, convert
    from datasvc.packs import MANIFEST_NAME, open_pack

    if source:
        root = _cache_root(source)
    else:
        root = CACHE / "bench-io" / "sample-2000"
    root.mkdir(parents=True, exist_ok=True)
    given = Path(source) if source else None
    if given is not None and (given / MANIFEST_NAME).exists():
        base, fmt = given, open_pack(given).manifest["format"]
    else:
        tree = given or _builtin_tree(root)
        base, fmt = root / "lmdb", "lmdb"
        if not (base / MANIFEST_NAME).exists():
            convert(tree, base, ConvertConfig(workers=2), [split], progress=False)
    out = {fmt: base}
    other = "tfrecord" if fmt == "lmdb" else "lmdb"
    if not (root / other / MANIFEST_NAME).exists():
        mirror_pack(base, other, root / other, split)
    out[other] = root / other
    if not (root / "folder").is_dir():
        export_folder(base, root / "folder", split)
    out["folder"] = root / "folder"
    return {k: out[k] for k in STORAGES}


# --- cache states ---------------------------------------------------------------------------


def storage_files(kind: str, path: Path, split: str) -> list[Path]:
    """The files an epoch reads."""
    from datasvc.packs import open_pack

    if kind == "folder":
        # named <record index>-<key>: by name is the pack's record order
        return sorted((p for p in (path / split).rglob("*") if p.is_file()), key=lambda p: p.name)
    return list(open_pack(path).split(split).shard_paths)


def set_cache(files: list[Path], state: str) -> float:
    """Make ``files`` warm or cold; returns the resident fraction (mincore) right after."""
    from datasvc.packs import lmdb as lmdb_format
    from datasvc.packs.pagecache import drop_cache, resident_fraction, warm_cache

    lmdb_format.close_environments()  # this process's maps would pin their pages
    if state == "cold":
        drop_cache(files)
    else:
        warm_cache(files)
    return resident_fraction(files)


# --- measurements -----------------------------------------------------------------------------


def read_loop(kind: str, path: Path, split: str, order, read_ahead=None) -> tuple[int, float]:
    """Read every record's bytes in ``order``, one after another: (bytes, seconds); on a pack,
    ``read_ahead`` (a method) advises the next records as ``custom`` does, one batch of 64 at
    a time within its 64 MiB window."""
    from datasvc.packs import open_pack
    from datasvc.packs.readahead import ReadAhead

    if kind == "folder":
        files = storage_files(kind, path, split)
        t, n = time.perf_counter(), 0
        for i in order:
            with open(files[i], "rb") as f:
                n += len(f.read())
        return n, time.perf_counter() - t
    sp = open_pack(path).split(split)
    batches = [order[b : b + 64] for b in range(0, len(order), 64)]
    t, n = time.perf_counter(), 0
    ra = (
        ReadAhead(sp, batches.__getitem__, 0, len(batches), method=read_ahead)
        if read_ahead
        else None
    )
    for b, ids in enumerate(batches):
        if ra is not None:
            ra.fill()
        for i in ids:
            shard, local = sp.locate(int(i))
            n += len(sp.shard(shard).raw(local))
        if ra is not None:
            ra.done(b)
    dt = time.perf_counter() - t
    if ra is not None:
        ra.close()
    sp.close()
    return n, dt


def loader_epoch(kind: str, path: Path, a, workers: int, read_ahead: str | None) -> float:
    """Images/s of the first epoch of a fresh loader (``custom`` on packs, ``torch`` on files);
    worker start-up included, as it is for warm and cold alike."""
    from datasvc.loaders import create_loader

    kw = {"read_ahead": read_ahead} if kind != "folder" else {}
    backend = "torch" if kind == "folder" else "custom"
    loader = create_loader(
        backend,
        str(path),
        split=a.split,
        batch_size=a.batch_size,
        image_size=a.image_size,
        num_workers=workers,
        seed=0,
        **kw,
    )
    try:
        loader.set_epoch(0)
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch.ids)
        return n / (time.perf_counter() - t)
    finally:
        loader.close()


def measure_storage(kind, path, a, workers, state, order) -> dict:
    """One round of one storage in one cache state: read loop, then a loader epoch."""
    files = storage_files(kind, path, a.split)
    resident_read = set_cache(files, state)
    nbytes, dt = read_loop(kind, path, a.split, order)
    ahead_mb = None
    if kind != "folder":  # the same loop with read-ahead: IO alone, without decoding
        resident_ahead = set_cache(files, state)
        resident_read = max(resident_read, resident_ahead) if state == "cold" else resident_read
        ahead_bytes, ahead_dt = read_loop(kind, path, a.split, order, "fadvise")
        ahead_mb = ahead_bytes / ahead_dt / 1e6
    resident_epoch = set_cache(files, state)
    ips = loader_epoch(kind, path, a, workers, "fadvise")
    return {
        "resident_before_read": resident_read,
        "resident_before_epoch": resident_epoch,
        "mb_per_s": nbytes / dt / 1e6,
        "read_ahead_mb_per_s": ahead_mb,
        "records_per_s": len(order) / dt,
        "images_per_s": ips,
        "bytes": nbytes,
        "records": len(order),
    }


def measure_read_ahead(kind, path, a, workers, method) -> dict:
    """A warm and a cold ``custom`` epoch with ``method`` (None: no read-ahead), back to back,
    so that the pair shares whatever else the machine is doing; their ratio is the figure."""
    files = storage_files(kind, path, a.split)
    warm_resident = set_cache(files, "warm")
    warm = loader_epoch(kind, path, a, workers, method)
    resident = set_cache(files, "cold")
    cold = loader_epoch(kind, path, a, workers, method)
    return {
        "resident_before_epoch": resident,
        "warm_resident_before_epoch": warm_resident,
        "images_per_s": cold,
        "warm_images_per_s": warm,
    }


def _round(sets, a, workers, methods, order) -> tuple[dict, dict]:
    storage, ahead = {}, {}
    for kind in STORAGES:
        for state in ("warm", "cold"):
            storage[kind, state] = measure_storage(kind, sets[kind], a, workers, state, order)
    for kind in ("lmdb", "tfrecord"):
        for method in (None, *methods):
            ahead[kind, method] = measure_read_ahead(kind, sets[kind], a, workers, method)
    return storage, ahead


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _ratio(xs: list[dict], ys: list[dict], key: str = "images_per_s") -> float:
    """Median over rounds of x / y, each pair from the same round."""
    return statistics.median(x[key] / y[key] for x, y in zip(xs, ys))


def summarize(storage_runs: list[dict], ahead_runs: list[dict], methods) -> dict:
    storage, ahead = [], []
    for kind in STORAGES:
        warm = [r[kind, "warm"] for r in storage_runs]
        for state in ("warm", "cold"):
            rs = [r[kind, state] for r in storage_runs]
            row = {
                "storage": kind,
                "cache": state,
                "loader": "torch (ImageFolder, PIL)" if kind == "folder" else "custom",
                "resident_before": max(
                    max(r["resident_before_read"], r["resident_before_epoch"]) for r in rs
                )
                if state == "cold"
                else min(min(r["resident_before_read"], r["resident_before_epoch"]) for r in rs),
                "mb_per_s": _median(rs, "mb_per_s"),
                "read_ahead_mb_per_s": None
                if kind == "folder"
                else _median(rs, "read_ahead_mb_per_s"),
                "records_per_s": _median(rs, "records_per_s"),
                "images_per_s": _median(rs, "images_per_s"),
                "vs_warm": _ratio(rs, warm),
                "read_vs_warm": _ratio(rs, warm, "mb_per_s"),
                "rounds": [
                    {k: v for k, v in r.items() if k not in ("bytes", "records")} for r in rs
                ],
            }
            storage.append(row)
    for kind in ("lmdb", "tfrecord"):
        for method in (None, *methods):
            rs = [r[kind, method] for r in ahead_runs]
            pairs = [r["images_per_s"] / r["warm_images_per_s"] for r in rs]
            ahead.append(
                {
                    "storage": kind,
                    "read_ahead": method or "none",
                    "resident_before": max(r["resident_before_epoch"] for r in rs),
                    "warm_resident_before": min(r["warm_resident_before_epoch"] for r in rs),
                    "cold_images_per_s": _median(rs, "images_per_s"),
                    "warm_images_per_s": _median(rs, "warm_images_per_s"),
                    "cold_vs_warm": statistics.median(pairs),
                    "cold_vs_warm_rounds": pairs,
                }
            )
    return {"storage": storage, "read_ahead": ahead}


def run_io(a) -> dict:
    from datasvc.sampling import epoch_order

    source = a.io or a.pack or None
    sets = storage_set(source, a.split)
    workers = a.workers or len(os.sched_getaffinity(0))
    methods = [m.strip() for m in a.read_ahead_methods.split(",") if m.strip()]
    from datasvc.packs.readahead import ADVISERS

    skipped = [m for m in methods if m not in ADVISERS]
    methods = [m for m in methods if m in ADVISERS]
    from datasvc.packs import open_pack

    n = len(open_pack(sets["lmdb"]).split(a.split))
    order = epoch_order(n, 0, 0, True)
    print(
        f"storage: {n} images ({', '.join(f'{k} {v}' for k, v in sets.items())}), "
        f"{workers} workers, {a.repeats} rounds",
        file=sys.stderr,
    )
    storage_runs, ahead_runs = [], []
    for rnd in range(a.repeats):
        s, r = _round(sets, a, workers, methods, order)
        storage_runs.append(s)
        ahead_runs.append(r)
        print(
            f"round {rnd + 1}: custom cold / warm: "
            + "; ".join(
                f"{k} {m or 'none'} {r[k, m]['images_per_s'] / r[k, m]['warm_images_per_s']:.2f}"
                for k in ("lmdb", "tfrecord")
                for m in (None, *methods)
            ),
            file=sys.stderr,
            flush=True,
        )
        if a.json:  # the rounds so far, so that an interrupted run keeps them
            write_json(a.json, _report(storage_runs, ahead_runs, methods, skipped, source, sets, a))
    return _report(storage_runs, ahead_runs, methods, skipped, source, sets, a)


def _report(storage_runs, ahead_runs, methods, skipped, source, sets, a) -> dict:
    workers = a.workers or len(os.sched_getaffinity(0))
    res = summarize(storage_runs, ahead_runs, methods)
    res["skipped_methods"] = {m: "not installed (the optional liburing package)" for m in skipped}
    res["config"] = {
        "source": source or "built-in sample",
        "storages": {k: str(v) for k, v in sets.items()},
        "split": a.split,
        "images": storage_runs[0]["lmdb", "warm"]["records"],
        "image_bytes": storage_runs[0]["lmdb", "warm"]["bytes"],
        "batch_size": a.batch_size,
        "image_size": a.image_size,
        "workers": workers,
        "rounds": len(storage_runs),
        "read_ahead_methods": methods,
    }
    res["machine"] = machine()
    return res


STORAGE_COLUMNS = [
    ("storage", "storage"),
    ("cache", "cache"),
    ("resident_before", "resident before"),
    ("mb_per_s", "read MB/s"),
    ("records_per_s", "records/s"),
    ("read_vs_warm", "read vs warm"),
    ("read_ahead_mb_per_s", "read + read-ahead MB/s"),
    ("loader", "loader"),
    ("images_per_s", "images/s"),
    ("vs_warm", "vs warm"),
]
AHEAD_COLUMNS = [
    ("storage", "pack"),
    ("read_ahead", "read-ahead"),
    ("resident_before", "resident before"),
    ("cold_images_per_s", "cold images/s"),
    ("warm_images_per_s", "warm images/s"),
    ("cold_vs_warm", "cold / warm"),
]


def format_io_tables(res: dict) -> str:
    rows = [{**r, "resident_before": f"{r['resident_before']:.1%}"} for r in res["storage"]]
    ahead = [{**r, "resident_before": f"{r['resident_before']:.1%}"} for r in res["read_ahead"]]
    out = [markdown_table(rows, STORAGE_COLUMNS), "", markdown_table(ahead, AHEAD_COLUMNS)]
    for m, why in res.get("skipped_methods", {}).items():
        out.append(f"read-ahead {m}: skipped, {why}")
    return "\n".join(out)


def main(a) -> int:
    res = run_io(a)
    print(format_io_tables(res))
    if a.json:
        write_json(a.json, res)
        print(f"wrote {a.json}")
    if a.plot:
        from benchmarks.report import bar_plot

        rows = res["storage"]
        bar_plot(
            a.plot,
            [f"{r['storage']} {r['cache']}" for r in rows],
            [r["images_per_s"] for r in rows],
            f"Storage backends, warm and cold, {res['config']['workers']} workers, "
            f"{res['config']['image_size']}px",
            "images/s (custom on packs, torch on files)",
        )
        print(f"wrote {a.plot}")
    return 0
