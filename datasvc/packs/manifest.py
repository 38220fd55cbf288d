"""The pack manifest: ``manifest.json``, written last and atomically; its presence marks a
complete pack."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from datasvc.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class PackError(UserError):
    """A pack is missing, incomplete, damaged or of an unsupported version."""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename: readers see old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


REBUILD_HINT = (
    "delete manifest.json and re-run the `datasvc convert` command that made the pack; "
    "finished shards are kept"
)


def manifest_digest(manifest: dict) -> str:
    """A pack's identity: SHA-256 of its manifest as canonical JSON (shard digests, counts,
    classes and conversion options), so two servers can tell whether they serve one pack."""
    import hashlib

    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(pack_dir: str | os.PathLike) -> dict:
    """Load and validate ``pack_dir/manifest.json``; refuses unknown format versions and any
    manifest that is not valid JSON of the expected shape."""
    path = Path(pack_dir) / MANIFEST_NAME
    if not path.is_file():
        raise not_a_pack(Path(pack_dir))
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        raise PackError(
            f"{path}: not valid JSON{where} (truncated or damaged?)", REBUILD_HINT
        ) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(manifest, dict) and version != FORMAT_VERSION:
        raise PackError(
            f"{path}: format_version {version!r} is not supported by this reader "
            f"(it reads format_version {FORMAT_VERSION}); upgrade datasvc or re-convert"
        )
    problem = manifest_shape_problem(manifest)
    if problem:
        raise PackError(f"{path}: {problem}", REBUILD_HINT)
    return manifest


def manifest_shape_problem(m: Any) -> str | None:
    """What is wrong with the shape of a parsed manifest (None when readers can use it)."""
    if not isinstance(m, dict):
        return f"a manifest is a JSON object, this is a {type(m).__name__}"
    if not isinstance(m.get("format"), str):
        return "manifest has no 'format' (a string)"
    classes = m.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "manifest has no 'classes' (a list of class names)"
    splits = m.get("splits")
    if not isinstance(splits, dict):
        return "manifest has no 'splits' (an object: split name -> its shards)"
    for name, info in splits.items():
        if not isinstance(info, dict) or not _is_count(info.get("num_samples")):
            return f"split {name!r} has no 'num_samples' count"
        shards = info.get("shards")
        if not isinstance(shards, list):
            return f"split {name!r} has no 'shards' list"
        for i, sh in enumerate(shards):
            if not (
                isinstance(sh, dict)
                and isinstance(sh.get("file"), str)
                and _is_count(sh.get("num_records"))
            ):
                return f"split {name!r} shard {i} lacks 'file' or 'num_records'"
        if sum(sh["num_records"] for sh in shards) != info["num_samples"]:
            return f"split {name!r}: its shards' records do not add up to num_samples"
    return None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def not_a_pack(path: Path) -> PackError:
    """Why ``path`` holds no pack, and what to do: missing, a file, empty, an unfinished
    conversion, an ImageFolder source tree, or some other folder."""
    if not path.exists():
        return PackError(f"{path} does not exist", "check the path; a pack is a folder")
    if path.is_file():
        if path.name == MANIFEST_NAME:
            return PackError(f"{path} is the manifest, not the pack", "give its folder")
        return PackError(
            f"{path} is a file, not a pack", f"give the folder that holds {MANIFEST_NAME}"
        )
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if (path / ".convert").is_dir():
        return PackError(
            f"{path} is an unfinished conversion (no {MANIFEST_NAME} yet)",
            "re-run the same `datasvc convert` command to finish it",
        )
    if not entries:
        return PackError(
            f"{path} is an empty folder, not a pack",
            f"make one with `datasvc convert SRC {path}`",
        )
    if _looks_like_image_tree(path):
        return PackError(
            f"{path} is an image folder tree, not a pack",
            f"convert it first: `datasvc convert {path} OUT`",
        )
    return PackError(
        f"{path} is not a pack: it has no {MANIFEST_NAME}",
        "give the output folder of `datasvc convert`",
    )


_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _looks_like_image_tree(path: Path, limit: int = 200) -> bool:
    """Image files within two folder levels (split/class/img or class/img), looked at cheaply."""
    seen = 0
    for pattern in ("*/*", "*/*/*"):
        for p in path.glob(pattern):
            seen += 1
            if p.suffix.lower() in _IMAGE_SUFFIXES:
                return True
            if seen >= limit:
                return False
    return False
