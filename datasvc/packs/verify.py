"""Verify and describe packs: every record's checksum, counts against the manifest, digests,
optional full decode; and the summary that ``datasvc inspect`` prints."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field

import google_crc32c

from datasvc.packs import CorruptSampleError, Pack, PackError, open_pack


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_pack(path, decode: bool = False, progress: bool = False, max_problems: int = 100):
    """Check every record of every split; returns a ``VerifyReport`` naming shard and record."""
    pack = open_pack(path)
    report = VerifyReport()
    total = sum(pack.manifest["splits"][s]["num_samples"] for s in pack.splits)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="rec", disable=not progress)
    for split_name in pack.splits:
        info = pack.manifest["splits"][split_name]
        split = pack.split(split_name)
        for si, shard_info in enumerate(info.get("shards", [])):
            where = f"{split_name}/{shard_info['file']}"
            if not split.shard_paths[si].is_file():
                report.problems.append(f"{where}: shard file is missing")
                bar.update(shard_info["num_records"])
                continue
            try:
                reader = split.shard(si)
                n = len(reader)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable shard
                report.problems.append(f"{where}: cannot open ({e})")
                continue
            if n != shard_info["num_records"]:
                report.problems.append(
                    f"{where}: {n} records, manifest says {shard_info['num_records']}"
                )
            digest = 0
            for i in range(n):
                try:
                    s = reader[i]
                    if decode:
                        _decode_check(s, f"{where} record {i}")
                    if not 0 <= s.label < len(pack.classes):
                        raise CorruptSampleError(
                            f"{where} record {i}: label {s.label} out of range"
                        )
                except (CorruptSampleError, OSError) as e:
                    report.problems.append(str(e))
                    if len(report.problems) >= max_problems:
                        return report
                    continue
                finally:
                    bar.update(1)
                crc = google_crc32c.value(s.image)
                digest = google_crc32c.extend(digest, crc.to_bytes(4, "big"))
                report.checked += 1
            if "digest" in shard_info and f"{digest:08x}" != shard_info["digest"]:
                report.problems.append(f"{where}: content digest differs from the manifest")
    bar.close()
    return report


def _decode_check(sample, where: str) -> None:
    import simplejpeg

    try:
        arr = simplejpeg.decode_jpeg(sample.image, strict=True)
    except ValueError as e:
        raise CorruptSampleError(f"{where}: does not decode ({e})") from None
    if sample.height and arr.shape[:2] != (sample.height, sample.width):
        raise CorruptSampleError(
            f"{where}: decodes to {arr.shape[1]}x{arr.shape[0]}, record says "
            f"{sample.width}x{sample.height}"
        )


def describe_pack(pack: Pack) -> dict:
    """Format, splits, counts, classes, bytes per image, size distribution and audit counts."""
    out = {
        "path": str(pack.path),
        "format": pack.manifest["format"],
        "format_version": pack.manifest["format_version"],
        "num_classes": len(pack.classes),
        "classes_head": pack.classes[:5],
        "options": pack.manifest.get("options", {}),
        "audit": pack.manifest.get("audit", {}),
        "splits": {},
    }
    for name in pack.splits:
        info = pack.manifest["splits"][name]
        split = pack.split(name)
        _require_shard_files(pack, split)
        n = len(split)
        step = max(1, n // 2000)  # sample at most ~2000 records for the size distribution
        sizes, sides, shapes = [], [], Counter()
        for i in range(0, n, step):
            s = split[i]
            sizes.append(len(s.image))
            sides.append(max(s.height, s.width))
            shapes[
                "landscape"
                if s.width > s.height
                else "portrait"
                if s.height > s.width
                else "square"
            ] += 1
        image_bytes = sum(sh.get("image_bytes", 0) for sh in info.get("shards", []))
        out["splits"][name] = {
            "num_samples": n,
            "num_shards": len(info.get("shards", [])),
            "bytes_per_image": round(image_bytes / n)
            if n and image_bytes
            else (round(statistics.mean(sizes)) if sizes else 0),
            "longest_side": _quantiles(sides),
            "jpeg_bytes": _quantiles(sizes),
            "shapes": dict(shapes),
            "audit": info.get("audit", {}),
        }
    return out


def _require_shard_files(pack: Pack, split) -> None:
    """A missing shard file fails ``inspect`` with one line that says how to see all damage."""
    for p in split.shard_paths:
        if not p.is_file():
            raise PackError(
                f"{p}: shard file is missing",
                f"the pack is damaged: `datasvc verify {pack.path}` lists every problem",
            )


def _quantiles(xs: list[int]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p):
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {"min": xs[0], "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": xs[-1]}


def format_description(d: dict) -> str:
    lines = [
        f"pack      {d['path']}",
        f"format    {d['format']} (format_version {d['format_version']})",
        f"classes   {d['num_classes']}: {', '.join(d['classes_head'])}"
        + (" ..." if d["num_classes"] > len(d["classes_head"]) else ""),
    ]
    opts = d.get("options") or {}
    if opts:
        lines.append(
            "options   "
            + ", ".join(
                f"{k}={v}"
                for k, v in opts.items()
                if k in ("max_side", "quality", "seed", "shards")
            )
            # packs from before the option hold the files' own bytes
            + f", jpeg_layout={opts.get('jpeg_layout', 'original')}"
        )
    for name, s in d["splits"].items():
        lines.append(
            f"split {name}: {s['num_samples']} images in {s['num_shards']} shards, "
            f"{s['bytes_per_image'] / 1024:.1f} KiB/image"
        )
        ls = s["longest_side"]
        if ls:
            lines.append(
                f"  longest side  min {ls['min']}  p10 {ls['p10']}  median {ls['median']}"
                f"  p90 {ls['p90']}  max {ls['max']}"
            )
        lines.append(f"  shapes        {json.dumps(s['shapes'])}")
        a = s.get("audit") or {}
        if a:
            lines.append(
                f"  audit         passed {a.get('passed', 0)}, converted "
                f"{json.dumps(a.get('converted', {}))}, rejected {a.get('rejected', 0)}"
                f" {json.dumps(a.get('rejected_reasons', {}))}, ignored "
                f"{a.get('ignored', 0)}"
            )
    return "\n".join(lines)
