"""Parallel, resumable, deterministic conversion of a source (the extracted tree, the ILSVRC2012
tarballs, parquet or webdataset shards) into a pack.

Work is planned as shards: each shard is a fixed list of candidates, written by one worker to
``<shard>.partial`` and renamed when complete, then recorded in ``OUT/.convert/done/``. A
re-run with the same plan keeps finished shards that still match their done records and redoes
the rest. The plan is deterministic, so array jobs (``jobs``/``job_index``) each write their
share and a last ``finalize`` writes ``manifest.json``, atomically, last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from converters.audit import AuditConfig
from converters.engines import ENGINES, ProgressFeed, run_engine
from converters.shards import STATE_DIR, ShardJob, check_done, done_path
from converters.sources import SourceOptions, SplitListing, discover
from datasvc import __version__
from datasvc.decode import CROP_DECODER
from datasvc.errors import UserError
from datasvc.packs import PACK_FORMATS
from datasvc.packs.manifest import FORMAT_VERSION, MANIFEST_NAME, write_json_atomic

log = logging.getLogger(__name__)

# What a plan does not depend on: how and where the work runs, and what counts as failure.
_RUN_OPTIONS = ("workers", "strict", "engine", "ray_address", "jobs", "job_index")


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
    jpeg_layout: str = "segmented"  # see converters.layout.JPEG_LAYOUTS
    engine: str = "process"  # converters.engines.ENGINES
    ray_address: str | None = None
    jobs: int = 1  # array jobs: this one writes the shards whose number = job_index mod jobs
    job_index: int = 0

    def __post_init__(self):
        PACK_FORMATS.get(self.format)  # unknown format: lists the valid ones
        if self.shards is not None and self.shards < 1:
            raise ValueError("--shards must be at least 1")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("--shard-size and --workers must be at least 1")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.jobs < 1 or not 0 <= self.job_index < self.jobs:
            raise ValueError(f"--job-index must be in 0..{self.jobs - 1} for --jobs {self.jobs}")
        _ = self.audit  # the audit's options (quality, layout...) are checked before any work

    @property
    def audit(self) -> AuditConfig:
        return AuditConfig(self.max_side, self.quality, self.max_pixels, self.jpeg_layout)

    def plan_options(self) -> dict:
        """The options that decide shard contents (not workers, engines or strictness)."""
        d = dataclasses.asdict(self)
        for k in _RUN_OPTIONS:
            d.pop(k)
        return d

    def pack_options(self) -> dict:
        """The options the manifest records: the plan's, and the workers used."""
        return {**self.plan_options(), "workers": self.workers, "strict": self.strict}


class ConversionError(UserError):
    """A conversion that cannot run as asked (bad source, options or output)."""


def num_shards(n: int, cfg: ConvertConfig) -> int:
    if n == 0:
        return 0
    if cfg.shards is not None:
        return min(cfg.shards, n)
    return max(math.ceil(n / cfg.shard_size), min(8, math.ceil(n / 32)))


def plan_split(listing: SplitListing, cfg: ConvertConfig) -> list[ShardJob]:
    """The split's shards: train's seeded permutation (unless the source is ``ordered``) or
    the listing's order, cut into ``num_shards`` runs of consecutive candidates."""
    cands = listing.candidates
    if listing.name == "train" and not listing.ordered:
        # a view through the permutation (8 bytes an image), not a permuted copy of the split
        cands = cands.view(np.random.default_rng(cfg.seed).permutation(len(cands)))
    k = num_shards(len(cands), cfg)
    bounds = [round(i * len(cands) / k) for i in range(k + 1)]
    return [
        ShardJob(listing.name, i, k, listing.reader, cands[bounds[i] : bounds[i + 1]])
        for i in range(k)
    ]


def listing_digest(listing: SplitListing) -> str:
    crc = 0
    for c in listing.candidates:
        crc = google_crc32c.extend(crc, f"{c.path}\t{c.label}\n".encode())
    return f"{crc:08x}"


def check_output_place(src: Path, out: Path) -> None:
    """Refuse an output inside its source (the next conversion would read it as a class) or
    a source inside its output."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise ConversionError(
            f"{out} is inside the source {src}", "choose an output folder outside the source"
        )
    if o in s.parents:
        raise ConversionError(
            f"the source {src} is inside the output {out}", "choose another output folder"
        )


def check_writable(out: Path) -> None:
    """Fail before any work when ``out`` cannot be written, leaving nothing behind: a file
    is made and removed in ``out`` or, when it does not exist yet, its nearest ancestor."""
    folder = out
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(0, "not a folder", str(folder))
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConversionError(
            f"{out}: cannot write there ({e.strerror or e})",
            "choose an output folder you can write to",
        ) from None


def _check_plan(out: Path, plan: dict, write: bool) -> None:
    """The plan of an unfinished conversion in ``out`` must be this one; write it if none."""
    plan_path = out / STATE_DIR / "plan.json"
    if plan_path.exists():
        with open(plan_path) as f:
            if json.load(f) != plan:
                raise ConversionError(
                    f"{out} holds an unfinished conversion with other sources or options",
                    "re-run it with the same command, or choose a new output folder",
                )
    elif write:
        write_json_atomic(plan_path, plan)
    else:
        raise ConversionError(
            f"{out}: no conversion was started there", "run the array jobs before --finalize"
        )


@dataclass
class Planned:
    """What convert works from: the source's listings, the plan, its shard jobs."""

    kind: str
    classes: list[str]
    listings: list[SplitListing]
    plan: dict
    jobs: list[ShardJob]


def make_plan(src: Path, cfg: ConvertConfig, opts: SourceOptions) -> Planned:
    kind, classes, listings = discover(src, opts)
    plan = {
        "source": str(src.resolve()),
        "source_kind": kind,
        "options": cfg.plan_options(),
        "classes": classes,
        "splits": {
            l.name: {"candidates": len(l.candidates), "listing": listing_digest(l)}
            for l in listings
        },
    }
    jobs = [job for l in listings for job in plan_split(l, cfg)]
    return Planned(kind, classes, listings, plan, jobs)


def load_done(out: Path, jobs: list[ShardJob], fmt_name: str) -> dict[str, dict]:
    """Done records of ``jobs`` whose shards still match them; a shard that does not (cut
    short, changed, gone) loses its record, so it is redone."""
    done = {}
    for job in jobs:
        p = done_path(out, job)
        if not p.exists():
            continue
        try:
            with open(p) as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        why = check_done(out, job, record, fmt_name) if record else "its done record is damaged"
        if why is None:
            done[job.done_name] = record
        else:
            log.warning("%s shard %d: %s; redoing it", job.split, job.index, why)
            p.unlink()
    return done


def _resolve_layout(cfg: ConvertConfig) -> ConvertConfig:
    if cfg.jpeg_layout == "segmented" and CROP_DECODER != "turbo_crop":
        # Without the C extension there is no lossless transcoder (nor a decoder that gains
        # from the layout): keep the files' own bytes, and say so in the manifest's options.
        log.warning("the datasvc._jpegcrop extension is not built: storing JPEGs as found")
        return dataclasses.replace(cfg, jpeg_layout="original")
    return cfg


def _existing_manifest(out: Path, plan: dict) -> dict | None:
    path = out / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(
            f"{path} is damaged (not valid JSON)",
            "delete it and re-run the same command: finished shards are checked and kept",
        ) from None
    if not isinstance(manifest, dict) or manifest.get("plan") != plan:
        raise ConversionError(f"{out} already holds a different pack", "choose a new output folder")
    return manifest


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ConvertConfig,
    splits: list[str] | None = None,
    val_labels: str | None = None,
    val_synsets: str | None = None,
    progress: bool = True,
    source: SourceOptions | None = None,
    finalize: bool = False,
) -> dict:
    """Convert ``src`` into a pack at ``out``; resumes an interrupted run. Returns the
    manifest, or, for one of several array jobs, a summary of this job's shards."""
    src, out = Path(src), Path(out)
    check_output_place(src, out)
    check_writable(out)
    cfg = _resolve_layout(cfg)
    opts = source or SourceOptions(tuple(splits) if splits else None, val_labels, val_synsets)
    opts = dataclasses.replace(opts, workers=cfg.workers)
    planned = make_plan(src, cfg, opts)
    log.info("source: %s (%s)", src, planned.kind)
    manifest = _existing_manifest(out, planned.plan)
    if manifest is not None:
        log.info("%s: already complete (manifest.json present); nothing to do", out)
        return manifest
    if finalize:
        return finalize_pack(src, out, cfg, planned)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    _check_plan(out, planned.plan, write=True)
    for l in planned.listings:
        (out / l.name).mkdir(parents=True, exist_ok=True)
    fmt = PACK_FORMATS.get(cfg.format)
    mine = [j for j in planned.jobs if j.index % cfg.jobs == cfg.job_index]
    done = load_done(out, mine, fmt.name)
    if done:
        # Always said, even when quiet: the user should know work was kept.
        log.warning("resuming: %d of %d shards already finished", len(done), len(mine))
    _run(mine, done, out, cfg, planned, progress)
    if cfg.jobs > 1:
        return {"job_index": cfg.job_index, "jobs": cfg.jobs, "shards": len(mine)}
    return finalize_pack(src, out, cfg, planned)


def _run(mine, done, out, cfg, planned: Planned, progress: bool) -> None:
    todo = [j for j in mine if j.done_name not in done]
    feed = ProgressFeed(out, planned.jobs, progress and bool(todo))
    try:
        run_engine(cfg.engine, todo, out, cfg, planned.classes, feed)
    except BaseException:
        feed.bar.close()
        finished = len(os.listdir(out / STATE_DIR / "done"))
        log.warning(
            "interrupted: %d of %d shards finished; re-run the same command to resume",
            finished,
            len(planned.jobs),
        )
        raise
    feed.close()


def finalize_pack(src: Path, out: Path, cfg: ConvertConfig, planned: Planned) -> dict:
    """Check every shard against its done record and write the manifest; names the shards
    still missing when some are."""
    _check_plan(out, planned.plan, write=False)
    fmt = PACK_FORMATS.get(cfg.format)
    done = load_done(out, planned.jobs, fmt.name)
    missing = [j for j in planned.jobs if j.done_name not in done]
    if missing:
        names = [j.file_name(fmt.suffix) for j in missing]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ConversionError(
            f"{len(missing)} of {len(planned.jobs)} shards are not finished: {shown}",
            "run (or re-run) the array jobs that write them, then --finalize again",
        )
    manifest = write_manifest(out, cfg, planned, done)
    rejected = sum(s["audit"]["rejected"] for s in manifest["splits"].values())
    if cfg.strict and rejected:
        (out / MANIFEST_NAME).unlink()
        raise ConversionError(
            f"--strict: {rejected} file(s) rejected", f"see {out}/<split>/rejected.jsonl"
        )
    return manifest


def _split_entry(out: Path, listing: SplitListing, records: list[dict]) -> tuple[dict, Counter]:
    audit, rejected = Counter(), []
    for r in records:
        audit.update(r["audit"])
        rejected.extend(r["rejected"])
    with open(out / listing.name / "rejected.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rejected)
    shards = [
        {k: r[k] for k in ("file", "num_records", "image_bytes", "digest", "index") if k in r}
        for r in records
    ]
    passed = audit.pop("jpeg", 0)
    n_rej = audit.pop("rejected", 0)
    split_audit = {
        "candidates": len(listing.candidates),
        "passed": passed,
        "converted": dict(sorted(audit.items())),
        "rejected": n_rej,
        "rejected_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejected)),
        "ignored": len(listing.ignored),
        "reached_twice": len(listing.repeats),
    }
    totals = Counter(
        candidates=len(listing.candidates),
        passed=passed,
        rejected=n_rej,
        converted=sum(audit.values()),
        ignored=len(listing.ignored),
        reached_twice=len(listing.repeats),
    )
    entry = {
        "num_samples": sum(s["num_records"] for s in shards),
        "shards": shards,
        "audit": split_audit,
        "rejected_file": "rejected.jsonl",
    }
    return entry, totals


def write_manifest(out: Path, cfg: ConvertConfig, planned: Planned, done: dict) -> dict:
    splits, totals = {}, Counter()
    for l in planned.listings:
        if l.repeats:
            log.warning(
                "%s: %d path(s) reached a second time (symlink loops or links), each counted "
                "once: %s",
                l.name,
                len(l.repeats),
                ", ".join(l.repeats[:5]),
            )
        records = [done[j.done_name] for j in planned.jobs if j.split == l.name]
        splits[l.name], split_totals = _split_entry(out, l, records)
        totals.update(split_totals)
    manifest = {
        "format": cfg.format,
        "format_version": FORMAT_VERSION,
        "created_by": f"datasvc {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": planned.classes,
        "splits": splits,
        "options": cfg.pack_options(),
        "audit": dict(totals),
        "plan": planned.plan,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest
