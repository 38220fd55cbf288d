"""A run's outputs besides checkpoints: the JSONL metrics, per-rank sample-id logs, TensorBoard
scalars and the PNG of the curves; and the interval meter behind the console lines (loss,
throughput, data wait, ETA, GPU memory)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def ids_digest(ids: torch.Tensor) -> str:
    """A short hash of a batch's sample ids, to compare data order between runs."""
    return hashlib.sha1(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


class JsonlLog:
    """Append-only JSONL, flushed per record; on resume, records past the checkpoint are cut."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)
        self.f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """PNG of train loss, lr, throughput and data-wait fraction per step, and val top-1/top-5."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    va = [r for r in recs if r.get("kind") == "val"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in tr]
    ax[0, 0].plot(steps, [r["loss"] for r in tr])
    ax[0, 0].set(title="train loss", xlabel="step")
    ax[0, 1].plot(steps, [r["lr"] for r in tr])
    ax[0, 1].set(title="learning rate", xlabel="step")
    if va:
        ep = [r["epoch"] + 1 for r in va]
        ax[1, 0].plot(ep, [r["top1"] for r in va], marker="o", label="top-1")
        ax[1, 0].plot(ep, [r["top5"] for r in va], marker="o", label="top-5")
        if "ema_top1" in va[0]:
            ax[1, 0].plot(ep, [r["ema_top1"] for r in va], marker="x", label="EMA top-1")
        ax[1, 0].legend()
    ax[1, 0].set(title="validation accuracy (%)", xlabel="epoch")
    ax[1, 1].plot(steps, [r["images_per_s"] for r in tr], color="C0")
    ax[1, 1].set(title="throughput and data wait", xlabel="step", ylabel="images/s")
    tw = ax[1, 1].twinx()
    tw.plot(steps, [100 * r["data_wait_frac"] for r in tr], color="C3")
    tw.set_ylabel("data wait (%)", color="C3")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Interval:
    """What one log interval accumulates: loss sum and steps (on the device, no sync per step),
    the time spent waiting for data, and when it started."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.waited = 0.0
        self.t0 = time.perf_counter()


def format_eta(seconds: float) -> str:
    """Seconds → "1h02m", "3m20s" or "45s"."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def gpu_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated on ``device`` so far (GiB), or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class TensorBoard:
    """Scalars of the train and val records under ``<out>/tb`` (rank 0), when tensorboard is
    installed (the trainer extra); otherwise a no-op with one warning."""

    def __init__(self, out: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("train.tensorboard: the tensorboard package is not installed; skipped")
            return
        self.writer = SummaryWriter(str(out / "tb"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        kind, step = record.get("kind"), record.get("step")
        if self.writer is None or step is None:
            return
        for key, value in record.items():
            if key in ("kind", "step", "epoch", "time", "count") or not isinstance(
                value, int | float
            ):
                continue
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class RunLogs:
    """The run's metric sinks: JSONL and TensorBoard on rank 0, the ids log on every rank."""

    def __init__(self, out: Path, *, main: bool, rank: int, resume_step, ids: bool, tb: bool):
        self.jsonl = JsonlLog(out / "metrics.jsonl", resume_step) if main else None
        # Like the JSONL, TensorBoard drops what a killed run logged past the checkpoint.
        purge = None if resume_step is None else resume_step + 1
        self.tb = TensorBoard(out, tb and main, purge_step=purge)
        self.ids = None
        if ids:
            out.mkdir(parents=True, exist_ok=True)
            self.ids = JsonlLog(out / f"ids-rank{rank}.jsonl", resume_step)

    def write(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)
        self.tb.write(record)

    def close(self) -> None:
        for sink in (self.jsonl, self.ids, self.tb):
            if sink is not None:
                sink.close()
