"""Conversion throughput against the machine's JPEG decode bound on the same files.

    python -m benchmarks.convert [--tree DIR] [--workers 2] [--repeats 3] [--json F] [--plot F]

The audit entropy-decodes every image (the segmented layout's lossless transcode) or decodes it
fully (``--jpeg-layout original``), so the decode rate of the same files on the same number of
cores bounds what conversion can reach; the target is 0.7 of that bound per worker.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
from pathlib import Path

import simplejpeg

from benchmarks.report import bar_plot, markdown_table, timed_median, write_json
from converters.convert import ConvertConfig, convert


def _decode_files(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        try:
            simplejpeg.decode_jpeg(data)
        except ValueError:  # PNG/CMYK oddities: the audit uses PIL there; count them as decoded
            pass
        n += 1
    return n


def decode_bound(paths: list[str], workers: int) -> None:
    chunks = [paths[i::workers] for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_files, chunks)


def run(tree: Path, workers: int, repeats: int) -> dict:
    paths = sorted(str(p) for p in tree.rglob("*") if p.is_file())
    n = len(paths)
    work = Path(tempfile.mkdtemp(prefix="convbench-"))
    rows = []
    try:
        t, _ = timed_median(lambda: _decode_files(paths), repeats)
        single = n / t
        t, _ = timed_median(lambda: decode_bound(paths, workers), repeats)
        bound = n / t
        rows.append({"case": "JPEG decode only, 1 core", "images_per_s": single})
        rows.append({"case": f"JPEG decode only, {workers} processes", "images_per_s": bound})
        cases = (
            ("segmented (default)", None, "segmented"),
            ("--jpeg-layout original", None, "original"),
            ("--max-side 512", 512, "segmented"),
        )
        for label, max_side, layout in cases:

            def once(max_side=max_side, layout=layout):
                out = work / "pack"
                shutil.rmtree(out, ignore_errors=True)
                cfg = ConvertConfig(
                    workers=workers, max_side=max_side, shards=4 * workers, jpeg_layout=layout
                )
                convert(tree, out, cfg, progress=False)

            t, _ = timed_median(once, repeats)
            rate = n / t
            rows.append(
                {
                    "case": f"convert {label}, {workers} workers",
                    "images_per_s": rate,
                    "per_worker_vs_1core_decode": rate / workers / single,
                    "vs_decode_bound": rate / bound,
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": n, "workers": workers, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="ImageFolder tree (default: the built-in sample)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="out/bench-convert.json")
    ap.add_argument("--plot", default="out/bench-convert.png")
    a = ap.parse_args(argv)
    tmp = None
    if a.tree is None:
        from datasvc.sample import write_sample

        tmp = Path(tempfile.mkdtemp(prefix="convsample-"))
        write_sample(tmp, classes=10, per_class=160)
        a.tree = tmp
    try:
        res = run(a.tree, a.workers, a.repeats)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    cols = [
        ("case", "case"),
        ("images_per_s", "images/s"),
        ("per_worker_vs_1core_decode", "per worker / 1-core decode"),
        ("vs_decode_bound", f"vs {a.workers}-process decode"),
    ]
    for r in res["rows"]:
        for k in ("per_worker_vs_1core_decode", "vs_decode_bound"):
            if k in r:
                r[k] = round(r[k], 2)
    print(f"{res['images']} images, median of {a.repeats}")
    print(markdown_table(res["rows"], cols))
    write_json(a.json, {"benchmark": "convert", "config": vars(a) | {"tree": str(a.tree)}, **res})
    bar_plot(
        a.plot,
        [r["case"] for r in res["rows"]],
        [r["images_per_s"] for r in res["rows"]],
        "Conversion vs JPEG decode bound",
        "images/s",
    )
    print(f"wrote {a.json} and {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
