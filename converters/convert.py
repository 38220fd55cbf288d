"""Parallel, resumable, deterministic conversion of an ImageFolder tree into a pack.

Work is planned as shards: each shard is a fixed list of candidates, written by one worker to
``<shard>.partial`` and renamed when complete, then recorded in ``OUT/.convert/done/``. A
re-run with the same plan keeps finished shards and redoes the rest. ``manifest.json`` is
written last, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from converters.audit import AuditConfig, Rejected, audit_image
from converters.source import Candidate, SplitListing, discover
from datasvc import __version__
from datasvc.decode import CROP_DECODER
from datasvc.errors import UserError
from datasvc.lifecycle import die_with_parent
from datasvc.packs import PACK_FORMATS, Sample, shard_name
from datasvc.packs.manifest import FORMAT_VERSION, MANIFEST_NAME, write_json_atomic

STATE_DIR = ".convert"


@dataclass(frozen=True)
class ConvertConfig:
    """Options of one conversion; saved in the plan and the manifest."""

    format: str = "lmdb"
    shards: int | None = None  # shards per split; default from shard_size
    shard_size: int = 1024  # images per shard when ``shards`` is not given
    workers: int = 2
    max_side: int | None = None
    quality: int = 95
    max_pixels: int = 178_956_970
    strict: bool = False
    seed: int = 0  # train order is a seeded permutation; other splits keep sorted order
    jpeg_layout: str = "segmented"  # see datasvc.decode.JPEG_LAYOUTS

    def __post_init__(self):
        PACK_FORMATS.get(self.format)  # unknown format: lists the valid ones
        if self.shards is not None and self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("--shard-size and --workers must be at least 1")
        _ = self.audit  # the audit's options (quality, layout...) are checked before any work

    @property
    def audit(self) -> AuditConfig:
        return AuditConfig(self.max_side, self.quality, self.max_pixels, self.jpeg_layout)

    def plan_options(self) -> dict:
        """The options that decide shard contents (workers and strictness do not)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        d.pop("strict")
        return d


class ConversionError(UserError):
    """A conversion that cannot run as asked (bad source, options or output)."""


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    count: int
    root: str
    candidates: tuple[Candidate, ...]


def num_shards(n: int, cfg: ConvertConfig) -> int:
    if n == 0:
        return 0
    if cfg.shards is not None:
        return min(cfg.shards, n)
    return max(math.ceil(n / cfg.shard_size), min(8, math.ceil(n / 32)))


def plan_split(listing: SplitListing, cfg: ConvertConfig) -> list[ShardJob]:
    cands = listing.candidates
    if listing.name == "train":
        order = np.random.default_rng(cfg.seed).permutation(len(cands))
        cands = [cands[i] for i in order]
    k = num_shards(len(cands), cfg)
    bounds = [round(i * len(cands) / k) for i in range(k + 1)]
    return [
        ShardJob(listing.name, i, k, str(listing.root), tuple(cands[bounds[i] : bounds[i + 1]]))
        for i in range(k)
    ]


def listing_digest(listing: SplitListing) -> str:
    crc = 0
    for c in listing.candidates:
        crc = google_crc32c.extend(crc, f"{c.path}\t{c.label}\n".encode())
    return f"{crc:08x}"


# --- worker side ---------------------------------------------------------------------------

_progress = None  # shared counter of images processed, set in each worker


def _init_worker(counter, parent: int):
    global _progress
    _progress = counter
    die_with_parent(parent)  # a killed parent leaves no worker writing on
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def convert_shard(job: ShardJob, out: str, cfg: ConvertConfig, classes: list[str]) -> dict:
    """Audit and write one shard; returns its record (file, counts, digest, audit, rejected)."""
    fmt = PACK_FORMATS.get(cfg.format)
    folder = Path(out) / job.split
    final = folder / shard_name(job.split, job.index, job.count, fmt.suffix)
    partial = final.with_name(final.name + ".partial")
    writer = fmt.writer(partial, classes=classes)
    audit = Counter()
    rejected = []
    acfg = cfg.audit
    try:
        for cand in job.candidates:
            path = os.path.join(job.root, cand.path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                res = audit_image(data, acfg)
            except Rejected as e:
                rejected.append({"path": cand.path, "reason": str(e)})
                audit["rejected"] += 1
            except OSError as e:
                rejected.append({"path": cand.path, "reason": f"unreadable: {e.strerror or e}"})
                audit["rejected"] += 1
            else:
                writer.write(Sample(res.image, cand.label, cand.path, res.height, res.width))
                audit[res.kind] += 1
            if _progress is not None:
                with _progress.get_lock():
                    _progress.value += 1
        info = writer.close()
    except BaseException:
        writer.abort()
        raise
    if info.get("index"):
        # The TFRecord index was written beside the partial file: give it the final name.
        idx_partial = partial.with_name(info["index"])
        idx_final = final.with_suffix(".idx")
        os.replace(idx_partial, idx_final)
        info["index"] = idx_final.name
    os.replace(partial, final)
    record = {"file": final.name, **info, "audit": dict(audit), "rejected": rejected}
    state = Path(out) / STATE_DIR / "done"
    write_json_atomic(state / f"{job.split}-{job.index:05d}.json", record)
    return record


def _run_job(args):
    job, out, cfg, classes = args
    return job.split, job.index, len(job.candidates), convert_shard(job, out, cfg, classes)


# --- driver --------------------------------------------------------------------------------


def _load_done(out: Path, jobs: list[ShardJob], suffix: str) -> dict[tuple[str, int], dict]:
    done = {}
    for job in jobs:
        p = out / STATE_DIR / "done" / f"{job.split}-{job.index:05d}.json"
        shard = out / job.split / shard_name(job.split, job.index, job.count, suffix)
        if p.exists() and shard.exists():
            with open(p) as f:
                done[(job.split, job.index)] = json.load(f)
    return done


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ConvertConfig,
    splits: list[str] | None = None,
    val_labels: str | None = None,
    val_synsets: str | None = None,
    progress: bool = True,
) -> dict:
    """Convert ``src`` into a pack at ``out``; resumes an interrupted run. Returns the manifest."""
    src, out = Path(src), Path(out)
    if cfg.jpeg_layout == "segmented" and CROP_DECODER != "turbo_crop":
        # Without the C extension there is no lossless transcoder (nor a decoder that gains
        # from the layout): keep the files' own bytes, and say so in the manifest's options.
        _log(True, "the datasvc._jpegcrop extension is not built: storing JPEGs as found")
        cfg = dataclasses.replace(cfg, jpeg_layout="original")
    classes, listings = discover(src, splits, val_labels, val_synsets)
    fmt = PACK_FORMATS.get(cfg.format)
    plan = {
        "source": str(src.resolve()),
        "options": cfg.plan_options(),
        "classes": classes,
        "splits": {
            l.name: {"candidates": len(l.candidates), "listing": listing_digest(l)}
            for l in listings
        },
    }
    state = out / STATE_DIR
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("plan") == plan:
            _log(progress, f"{out}: already complete (manifest.json present); nothing to do")
            return manifest
        raise ConversionError(f"{out} already holds a different pack; choose a new output folder")
    plan_path = state / "plan.json"
    if plan_path.exists():
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:
            raise ConversionError(
                f"{out} holds an unfinished conversion with other sources or options; "
                "re-run it with the same command, or choose a new output folder"
            )
    (state / "done").mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)
    jobs = [job for l in listings for job in plan_split(l, cfg)]
    for l in listings:
        (out / l.name).mkdir(parents=True, exist_ok=True)
    done = _load_done(out, jobs, fmt.suffix)
    todo = [j for j in jobs if (j.split, j.index) not in done]
    total = sum(len(j.candidates) for j in todo)
    if done:
        # Always said, even when quiet: the user should know work was kept.
        _log(True, f"resuming: {len(done)} of {len(jobs)} shards already finished")
    _run_jobs(todo, out, cfg, classes, total, progress, done)
    manifest = _write_manifest(out, src, cfg, plan, classes, listings, jobs, done, fmt)
    rejected = sum(s["audit"]["rejected"] for s in manifest["splits"].values())
    if cfg.strict and rejected:
        manifest_path.unlink()
        raise ConversionError(
            f"--strict: {rejected} file(s) rejected; see {out}/<split>/rejected.jsonl"
        )
    return manifest


def _log(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _run_jobs(todo, out, cfg, classes, total, progress, done) -> None:
    if not todo:
        return
    from tqdm import tqdm

    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    args = [(j, str(out), cfg, classes) for j in todo]
    bar = tqdm(total=total, unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # stop like Ctrl-C
    pool = ctx.Pool(
        min(cfg.workers, len(todo)), initializer=_init_worker, initargs=(counter, os.getpid())
    )
    try:
        results = pool.imap_unordered(_run_job, args)
        remaining = len(todo)
        while remaining:
            try:
                split, index, _, record = results.next(timeout=0.2)
            except mp.TimeoutError:
                pass
            else:
                done[(split, index)] = record
                remaining -= 1
            bar.n = counter.value
            bar.refresh()
        pool.close()
    except BaseException:
        pool.terminate()
        bar.close()
        print(
            f"\ninterrupted: {len(done)} shards finished; re-run the same command to resume",
            file=sys.stderr,
        )
        raise
    finally:
        pool.join()
        signal.signal(signal.SIGTERM, previous)
    bar.n = counter.value
    bar.close()


def _write_manifest(out, src, cfg, plan, classes, listings, jobs, done, fmt) -> dict:
    splits = {}
    totals = Counter()
    for l in listings:
        records = [done[(j.split, j.index)] for j in jobs if j.split == l.name]
        audit = Counter()
        rejected = []
        for r in records:
            audit.update(r["audit"])
            rejected.extend(r["rejected"])
        with open(out / l.name / "rejected.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rejected)
        shards = [
            {k: r[k] for k in ("file", "num_records", "image_bytes", "digest", "index") if k in r}
            for r in records
        ]
        passed = audit.pop("jpeg", 0)
        n_rej = audit.pop("rejected", 0)
        split_audit = {
            "candidates": len(l.candidates),
            "passed": passed,
            "converted": dict(sorted(audit.items())),
            "rejected": n_rej,
            "rejected_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejected)),
            "ignored": len(l.ignored),
        }
        totals.update(
            {
                "candidates": len(l.candidates),
                "passed": passed,
                "rejected": n_rej,
                "converted": sum(audit.values()),
                "ignored": len(l.ignored),
            }
        )
        splits[l.name] = {
            "num_samples": sum(s["num_records"] for s in shards),
            "shards": shards,
            "audit": split_audit,
            "rejected_file": "rejected.jsonl",
        }
    manifest = {
        "format": cfg.format,
        "format_version": FORMAT_VERSION,
        "created_by": f"datasvc {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": classes,
        "splits": splits,
        "options": dataclasses.asdict(cfg),
        "audit": dict(totals),
        "plan": plan,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
