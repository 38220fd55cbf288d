"""Two checkouts of the project benchmarked side by side: ``datasvc bench`` from each, in turns.

A change's effect on throughput is only visible as a ratio taken in one run on this noisy,
shared machine: so the two trees take turns, one ``--repeats 1`` bench each per round, on the
same pack and cores, and the report gives per round each backend's after/before ratio and the
within-tree ratios the README quotes (custom over the decode limit, over torch, over dali_cpu;
remote over custom). Medians over rounds; the per-round figures show the spread.

    git archive 74cfa74 | tar -x -C /tmp/before
    (cd /tmp/before && python setup.py build_ext --inplace)
    python -m benchmarks.compare /tmp/before . --rounds 3 --json out/compare.json -- \\
        --backends custom,torch,dali_cpu,remote PACK

Everything after ``--`` goes to ``datasvc bench`` in both trees (give an explicit pack, so
both read the same files). Each tree runs with ``PYTHONPATH`` set to it and this interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Within-tree ratios: (name, numerator backend, denominator backend or the decode limit).
WITHIN = [
    ("custom/decode_limit", "custom", None),
    ("custom/torch", "custom", "torch"),
    ("custom/dali_cpu", "custom", "dali_cpu"),
    ("remote/custom", "remote", "custom"),
]


def bench_once(tree: Path, bench_args: list[str], out: Path) -> dict:
    """One ``datasvc bench --repeats 1`` from ``tree``; its JSON report."""
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    cmd = [sys.executable, "-c", "from datasvc.cli import main; raise SystemExit(main())"]
    cmd += ["bench", *bench_args, "--repeats", "1", "--json", str(out)]
    log.info("%s: %s", tree, " ".join(cmd[3:]))
    subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def rates(report: dict) -> dict[str, float]:
    """Backend → images/s of one report, the decode limit under the key ``None``."""
    got = {r["backend"]: r["images_per_s"] for r in report["results"] if r["status"] == "ok"}
    got[None] = report["decode_limit"]["images_per_s"]
    return got


def round_row(before: dict, after: dict) -> dict:
    """One round's figures: after/before per backend, and each tree's within-tree ratios."""
    b, a = rates(before), rates(after)
    row = {"after_over_before": {k or "decode_limit": a[k] / b[k] for k in a if k in b}}
    for label, tree in (("before", b), ("after", a)):
        row[label] = {n: tree[x] / tree[y] for n, x, y in WITHIN if x in tree and y in tree}
    return row


def summarize(rows: list[dict]) -> dict:
    """Medians over rounds of every figure in ``round_row``."""
    out = {}
    for part in ("after_over_before", "before", "after"):
        keys = rows[0][part].keys()
        out[part] = {k: statistics.median(r[part][k] for r in rows if k in r[part]) for k in keys}
    return out


def format_report(rows: list[dict], med: dict) -> str:
    lines = ["after / before, per backend (rounds; median):"]
    for k, m in med["after_over_before"].items():
        per = ", ".join(f"{r['after_over_before'][k]:.2f}" for r in rows)
        lines.append(f"  {k:<14} {per}  -> {m:.2f}")
    lines.append("within-tree ratios, before | after (median of rounds):")
    for k in med["after"]:
        lines.append(f"  {k:<20} {med['before'].get(k, float('nan')):.2f} | {med['after'][k]:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(ours)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            # Alternate who goes first, so neither tree always meets the warmer page cache.
            order = [("before", a.before), ("after", a.after)][:: 1 if i % 2 == 0 else -1]
            got = {k: bench_once(t, bench_args, Path(tmp) / f"{k}{i}.json") for k, t in order}
            rows.append(round_row(got["before"], got["after"]))
            log.info("round %d/%d: %s", i + 1, a.rounds, rows[-1]["after_over_before"])
    med = summarize(rows)
    print(format_report(rows, med))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rounds": rows, "median": med, "bench_args": bench_args}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
