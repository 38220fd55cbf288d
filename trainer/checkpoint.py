"""Checkpoints: written atomically, read back safely, and everything needed to resume exactly.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the previous one with ``os.replace`` (atomic on POSIX) and the folder is fsynced:
a crash or ``kill -9`` at any moment leaves either the old or the new checkpoint, never a torn
one. Only plain data and tensors are stored, so loading uses ``weights_only=True``.
"""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import numpy as np
import torch

from datasvc.errors import UserError
from datasvc.lifecycle import pid_alive

LAST = "last.pt"
BEST = "best.pt"  # the epoch-end checkpoint of the highest val top-1
CHECKPOINT_VERSION = 1


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save(state)`` to ``path`` so that readers see the old file or the new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
    return path


def epoch_name(epoch: int) -> str:
    """File name of epoch ``epoch``'s (0-based) end-of-epoch checkpoint, kept by ``keep_last``."""
    return f"epoch{epoch + 1:04d}.pt"


def prune_epochs(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest epoch checkpoints in ``folder``; returns the deleted."""
    kept = sorted(Path(folder).glob("epoch[0-9][0-9][0-9][0-9].pt"))
    gone = kept[:-keep] if keep else kept
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete temporaries left by writers that were killed mid-save; returns their paths."""
    stale = glob.glob(os.path.join(folder, ".*.tmp-*"))
    for p in stale:
        pid = p.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live process is writing it
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    return stale


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be resumed from: damaged, not a checkpoint, or too new."""


DAMAGED_HINT = "use another checkpoint file (an earlier one), or start afresh"


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU (tensors and plain data only; nothing is unpickled).

    Raises ``CheckpointError`` naming the file when it is damaged or not a trainer checkpoint
    (torch's own errors name neither), ``OSError`` when it cannot be opened at all.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file", "give its last.pt")
    with open(path, "rb") as f:  # missing or unreadable: an OSError that names the file
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
            why = (str(e).splitlines() or [""])[0][:120] or type(e).__name__
            raise CheckpointError(
                f"{path}: not a readable checkpoint (damaged or truncated? torch says: {why})",
                DAMAGED_HINT,
            ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a trainer checkpoint", DAMAGED_HINT)
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version}, this trainer reads version {CHECKPOINT_VERSION}"
        )
    return state


def require_keys(state: dict, path: str | os.PathLike, keys: tuple[str, ...]) -> None:
    """A checkpoint without what this use of it needs is not a trainer checkpoint."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a trainer checkpoint (it has no {', '.join(map(repr, missing))})",
            DAMAGED_HINT,
        )


def load_weights(model: torch.nn.Module, weights: dict, path: str | os.PathLike) -> None:
    """``model.load_state_dict(weights)``; weights of another model or class count are one
    ``CheckpointError`` naming the file and what differs, not torch's list of every key."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        if not isinstance(weights, dict):
            raise CheckpointError(f"{path}: its weights are not a state dict", DAMAGED_HINT) from e
        own = model.state_dict()
        missing = len(set(own) - set(weights))
        unexpected = len(set(weights) - set(own))
        reshaped = sum(
            1 for k, v in weights.items() if k in own and getattr(v, "shape", None) != own[k].shape
        )
        raise CheckpointError(
            f"{path}: its weights do not fit this model ({missing} missing, {unexpected} "
            f"unexpected, {reshaped} of another shape)",
            "use the model.* settings and class count it was saved with",
        ) from None


# --- RNG states --------------------------------------------------------------------------------


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random states (torch CPU and CUDA, numpy, Python) as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
