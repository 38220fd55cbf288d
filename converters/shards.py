"""One shard of a conversion: audit its candidates, write them to ``<shard>.partial``, rename
it when complete and write its done record (``OUT/.convert/done/<split>-<index>.json``: counts,
digests, the shard file's size and CRC32C). A done record is trusted only while the shard still
matches it."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from converters.audit import AuditConfig, Rejected, audit_image
from converters.sources import CandidateTable, SourceReader
from datasvc.packs import PACK_FORMATS, Sample, shard_name
from datasvc.packs.manifest import write_json_atomic

log = logging.getLogger(__name__)

STATE_DIR = ".convert"


@dataclass(frozen=True)
class ShardJob:
    """A shard of the plan: its split, number and count, and the candidates it holds (a
    table of its own when pickled to a worker: a shard's part of the listing, not all of it)."""

    split: str
    index: int
    count: int
    reader: SourceReader
    candidates: CandidateTable

    def file_name(self, suffix: str) -> str:
        return shard_name(self.split, self.index, self.count, suffix)

    @property
    def done_name(self) -> str:
        return f"{self.split}-{self.index:05d}.json"


def done_path(out: Path, job: ShardJob) -> Path:
    return out / STATE_DIR / "done" / job.done_name


def file_crc32c(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # 1 MB: was 4 MB, two of which were held at once
            crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32c": file_crc32c(path)}


def shard_files(out: Path, job: ShardJob, fmt_name: str, record: dict) -> list[Path]:
    """The files a finished shard consists of: the shard and, for TFRecord, its index."""
    folder = out / job.split
    files = [folder / record["file"]]
    if record.get("index"):
        files.append(folder / record["index"])
    return files


def check_done(out: Path, job: ShardJob, record: dict, fmt_name: str) -> str | None:
    """Why a finished shard no longer matches its done record, or None when it does."""
    recorded = record.get("files")
    if not recorded:
        return "its done record predates file digests"
    for path in shard_files(out, job, fmt_name, record):
        want = recorded.get(path.name)
        if not path.exists():
            return f"{path.name} is missing"
        if want is None:
            return f"{path.name} is not in its done record"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path.name} is {size} bytes, its done record says {want['bytes']}"
        if file_crc32c(path) != want["crc32c"]:
            return f"{path.name} differs from its done record (CRC32C)"
    return None


def _audit_into(writer, job: ShardJob, acfg: AuditConfig, progress) -> tuple[Counter, list]:
    audit, rejected = Counter(), []
    for cand, data in job.reader.iter_bytes(job.candidates):
        try:
            if isinstance(data, OSError):
                raise Rejected(f"unreadable: {data.strerror or data}")
            res = audit_image(data, acfg)
        except Rejected as e:
            rejected.append({"path": cand.path, "reason": str(e)})
            audit["rejected"] += 1
        else:
            writer.write(Sample(res.image, cand.label, cand.path, res.height, res.width))
            audit[res.kind] += 1
        if progress is not None:
            with progress.get_lock():
                progress.value += 1
    return audit, rejected


def convert_shard(job: ShardJob, out: str, cfg, classes: list[str], progress=None) -> dict:
    """Audit and write one shard; returns its done record (file, counts, digests, audit,
    rejected). ``progress``, a shared counter, counts images of shards still being written."""
    fmt = PACK_FORMATS.get(cfg.format)
    out = Path(out)
    final = out / job.split / job.file_name(fmt.suffix)
    partial = final.with_name(final.name + ".partial")
    writer = fmt.writer(partial, classes=classes)
    try:
        audit, rejected = _audit_into(writer, job, cfg.audit, progress)
        info = writer.close()
    except BaseException:
        writer.abort()
        raise
    if info.get("index"):
        # The TFRecord index was written beside the partial file: give it the final name.
        idx_final = final.with_suffix(".idx")
        os.replace(partial.with_name(info["index"]), idx_final)
        info["index"] = idx_final.name
    os.replace(partial, final)
    record = {"file": final.name, **info, "audit": dict(audit), "rejected": rejected}
    record["files"] = {p.name: _file_record(p) for p in shard_files(out, job, fmt.name, record)}
    write_json_atomic(done_path(out, job), record)
    if progress is not None:
        with progress.get_lock():  # the done record counts these images from now on
            progress.value -= len(job.candidates)
    return record
