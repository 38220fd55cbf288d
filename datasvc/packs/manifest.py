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


def read_manifest(pack_dir: str | os.PathLike) -> dict:
    """Load and validate ``pack_dir/manifest.json``; refuses unknown format versions."""
    path = Path(pack_dir) / MANIFEST_NAME
    if not path.exists():
        raise PackError(
            f"{pack_dir}: no {MANIFEST_NAME}; the pack is incomplete (an interrupted conversion?) "
            "or not a pack. Re-run `datasvc convert` to finish it."
        )
    with open(path) as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackError(
            f"{path}: format_version {version!r} is not supported by this reader "
            f"(it reads format_version {FORMAT_VERSION}); upgrade datasvc or re-convert"
        )
    for key in ("format", "classes", "splits"):
        if key not in manifest:
            raise PackError(f"{path}: manifest has no {key!r}")
    return manifest
