"""Train and eval loops: DDP (NCCL on GPUs, gloo on CPU), AMP, channels-last, exact resume,
exact evaluation, and the run's logs (console, JSONL, a PNG of the curves at the end).

Outputs of a run, all under ``train.out_dir``: ``config.yaml``, ``metrics.jsonl`` (one record
per log interval and per evaluation), ``last.pt`` (the latest checkpoint), ``summary.json``,
``curves.png``, and with ``train.log_ids`` one ``ids-rank<r>.jsonl`` per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, ModelConfig, require_data_source, save_config
from trainer.data import (
    DeviceLoader,
    build_loader,
    describe_skipped,
    gather_skipped,
    pack_classes,
)
from trainer.recipe import (
    BatchMixer,
    LRSchedule,
    ModelEMA,
    Scheduler,
    build_optimizer,
    centralize_gradients_,
    classification_loss,
    eshifted_l2_,
    scaled_lr,
)

# --- process group -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU); else a 1-process job."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None
        )
    return Dist(rank, world, local, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_state(module: nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (BN statistics drift per rank)."""
    if d.enabled:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


# --- model -------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Registered model ``cfg.name`` with the regularizers that are set (others not passed)."""
    from trainer.models import create_model

    kw = dict(cfg.kwargs)
    if cfg.drop_rate:
        kw["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate:
        kw["drop_path_rate"] = cfg.drop_path_rate
    if cfg.zero_init_residual:
        kw["zero_init_residual"] = True
    return create_model(cfg.name, num_classes=num_classes, **kw)


def resolve_num_classes(cfg: Config) -> int:
    require_data_source(cfg.data)
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    classes = pack_classes(cfg.data)
    if not classes:
        raise ConfigError(
            f"model.num_classes is not set and data.source {cfg.data.source} has no class list",
            "set model.num_classes=N",
        )
    return len(classes)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare_model(model: nn.Module, cfg: Config, d: Dist) -> nn.Module:
    """Device, memory format and SyncBN; returns the bare module (DDP wraps it later)."""
    if cfg.model.sync_bn and d.enabled:
        if d.device.type != "cuda":
            _say(d, "model.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(d.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DeviceLoader, d: Dist, amp: str = "none", epoch: int = 0
) -> dict:
    """Top-1, top-5 and loss over the whole split: every sample counted once across ranks.

    The loader gives each sample to exactly one rank (no padding, no duplicates); per-rank sums
    are added with one all-reduce, so the figures are exact whatever the world size.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # correct1, correct5, loss, n
    loader.loader.set_epoch(epoch)
    for batch in loader.batches(epoch, 0):
        with autocast(d.device, amp):
            logits = model(batch.images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(batch.labels.view(-1, 1))
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, batch.labels, reduction="sum").double()
        sums[3] += batch.labels.numel()
    all_reduce_sum(sums, d)
    c1, c5, loss, n = sums.tolist()
    # Skipped (corrupt) samples were never delivered: they are listed, not in the denominator.
    skipped = gather_skipped(loader.loader, d.world_size)
    count, n = int(n), max(n, 1.0)
    res = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": count}
    return {**res, "skipped": len(skipped), "skipped_records": skipped}


# --- logging -----------------------------------------------------------------------------------


def _say(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def val_summary(res: dict) -> str:
    """One eval's log line: accuracy, the images it counted and any it skipped as corrupt."""
    counted = f"{res['count']} images"
    if res.get("skipped"):
        counted += f", {describe_skipped(res['skipped_records'])}"
    line = (
        f"val top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% loss {res['loss']:.4f} ({counted})"
    )
    return line + (f"; EMA top-1 {res['ema_top1']:.2f}%" if "ema_top1" in res else "")


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


# --- training ----------------------------------------------------------------------------------


class Trainer:
    """One training run of ``cfg`` in this process (one rank of a torchrun job)."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg = cfg
        self.d = d
        self.out = Path(cfg.train.out_dir)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed + d.rank)
        self.num_classes = resolve_num_classes(cfg)

        model = prepare_model(build_model(cfg.model, self.num_classes), cfg, d)
        self.model = model
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
            if d.enabled
            else model
        )

        self.train_loader = build_loader(
            cfg.data,
            train=True,
            rank=d.rank,
            world_size=d.world_size,
            seed=tc.seed,
            device=d.device,
        )
        self.val_loader = build_loader(
            cfg.data,
            train=False,
            rank=d.rank,
            world_size=d.world_size,
            seed=tc.seed,
            device=d.device,
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                "the train split yields no full batch per rank; lower data.batch_size"
            )
        mixer = BatchMixer(cfg.augment, self.num_classes, seed=tc.seed)
        self.train_batches = DeviceLoader(
            self.train_loader,
            d.device,
            cfg.data.mean,
            cfg.data.std,
            channels_last=tc.channels_last,
            mixer=mixer,
            rank=d.rank,
        )
        self.val_batches = DeviceLoader(
            self.val_loader, d.device, cfg.data.mean, cfg.data.std, channels_last=tc.channels_last
        )

        self.global_batch = cfg.data.batch_size * d.world_size
        self.peak_lr = scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(model, cfg.optim, self.peak_lr)
        self.schedule = LRSchedule.from_config(
            cfg.optim, self.peak_lr, self.steps_per_epoch, tc.epochs
        )
        self.scheduler = Scheduler(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=tc.amp == "fp16")
        self.ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        groups = self.optimizer.param_groups
        self.eshift_params = [p for g in groups if g.get("eshift") for p in g["params"]]
        self.all_params = [p for g in groups for p in g["params"]]

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.cursor = self.train_loader.state_dict()
        self.start_time = time.time()
        self.last_val: dict = {}

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": ckpt.CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch,
            },
            "world_size": self.d.world_size,
            "last_val": self.last_val,
        }

    def save(self) -> None:
        """Gather every rank's RNG state and loader cursor; rank 0 writes ``last.pt``."""
        mine = {"rng": ckpt.rng_state(self.d.device), "loader": self.cursor}
        ranks = [None] * self.d.world_size
        if self.d.enabled:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.d.main:
            state = self.state_dict()
            state["ranks"] = ranks
            ckpt.save_atomic(state, self.out / ckpt.LAST)

    def load(self, path: Path) -> None:
        state = ckpt.load(path)
        ckpt.require_keys(state, path, ("model", "optimizer", "scheduler", "scaler", "progress"))
        ckpt.load_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        p = state["progress"]
        self.epoch, self.step_in_epoch = p["epoch"], p["step_in_epoch"]
        self.global_step = p["global_step"]
        self.last_val = state.get("last_val") or {}
        at_epoch_end = self.step_in_epoch >= p["steps_per_epoch"]  # saved after the eval
        ranks = state["ranks"]
        same_world = len(ranks) == self.d.world_size
        if p["steps_per_epoch"] != self.steps_per_epoch:
            # Another world or batch size: the schedule's steps change length. Only an epoch
            # boundary maps onto the new run without replaying or skipping samples.
            if not at_epoch_end:
                raise ConfigError(
                    f"{path} was taken mid-epoch with {p['steps_per_epoch']} steps per epoch; "
                    f"this run has {self.steps_per_epoch}. Resume it with the same world size "
                    "and data.batch_size, or from an epoch-end checkpoint."
                )
            self.global_step = (self.epoch + 1) * self.steps_per_epoch
            self.scheduler.load_state_dict({"last_step": self.global_step})
            _say(
                self.d,
                f"resume: {p['steps_per_epoch']} → {self.steps_per_epoch} steps per "
                "epoch; the schedule continues from the next epoch",
            )
        else:
            mine = ranks[self.d.rank] if same_world else ranks[0]
            self.train_loader.load_state_dict(mine["loader"])
            self.cursor = mine["loader"]
        if same_world:
            ckpt.set_rng_state(ranks[self.d.rank]["rng"], self.d.device)
        if at_epoch_end:
            self.epoch += 1
            self.step_in_epoch = 0
        diff = _config_diff(state["config"], self.cfg.to_dict())
        if diff:
            _say(self.d, f"resume: config differs from the checkpoint's in {', '.join(diff)}")
        _say(self.d, f"resumed from {path}: epoch {self.epoch}, step {self.global_step}")

    # --- the loop ------------------------------------------------------------------------------

    def train_step(self, batch) -> torch.Tensor:
        cfg = self.cfg
        with autocast(self.d.device, cfg.train.amp):
            logits = self.ddp(batch.images)
            loss = classification_loss(
                logits, batch.labels, cfg.augment.label_smoothing, cfg.augment.label_smoothing_mode
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        o = cfg.optim
        if o.grad_centralization or o.eshift_l2 or o.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            if o.grad_centralization:
                centralize_gradients_(self.optimizer.param_groups)
            if o.eshift_l2:
                eshifted_l2_(self.eshift_params, o.eshift_l2, o.eshift_eps)
            if o.clip_grad_norm:
                nn.utils.clip_grad_norm_(self.all_params, o.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.detach()

    def run_eval(self) -> dict:
        broadcast_state(self.model, self.d)
        res = evaluate(self.model, self.val_batches, self.d, self.cfg.train.amp, self.epoch)
        if self.ema is not None:
            broadcast_state(self.ema.module, self.d)
            e = evaluate(self.ema.module, self.val_batches, self.d, self.cfg.train.amp, self.epoch)
            res.update({"ema_top1": e["top1"], "ema_top5": e["top5"], "ema_loss": e["loss"]})
        return res

    def _report_train_skipped(self, log) -> None:
        """End of an epoch: the train records skipped as corrupt, logged and kept (a
        collective: every rank calls it)."""
        skipped = gather_skipped(self.train_loader, self.d.world_size)
        self.train_skipped = skipped
        if not skipped:
            return
        _say(self.d, f"epoch {self.epoch + 1} train: {describe_skipped(skipped)}")
        if log is not None:
            log.write(
                {"kind": "skipped", "split": "train", "epoch": self.epoch, "records": skipped}
            )

    def fit(self, resume: Path | None = None) -> dict:
        """Train to ``train.epochs`` (from ``resume`` if given); returns the final summary."""
        cfg, d, tc = self.cfg, self.d, self.cfg.train
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.out)
            save_config(cfg, self.out / "config.yaml")
        if resume is not None:
            self.load(resume)
        elif (self.out / ckpt.LAST).exists():
            _say(
                d,
                f"note: {self.out} holds a checkpoint of an earlier run; this fresh run "
                "replaces it (use --resume to continue it instead)",
            )
        resume_step = self.global_step if resume is not None else None
        log = JsonlLog(self.out / "metrics.jsonl", resume_step) if d.main else None
        ids_log = None
        if tc.log_ids:
            self.out.mkdir(parents=True, exist_ok=True)
            ids_log = JsonlLog(self.out / f"ids-rank{d.rank}.jsonl", resume_step)
        _say(
            d,
            f"training {cfg.model.name} ({self.num_classes} classes) on {d.world_size} "
            f"rank(s), {d.device.type}; {self.steps_per_epoch} steps/epoch, global batch "
            f"{self.global_batch}, peak lr {self.peak_lr:.4g}",
        )

        waited = 0.0
        loss_sum = torch.zeros((), device=d.device)
        n_steps = 0
        t_log = time.perf_counter()
        totals = {"wait": 0.0, "time": 0.0, "images": 0}
        try:
            while self.epoch < tc.epochs:
                self.ddp.train()
                self.train_loader.set_epoch(self.epoch)
                it = self.train_batches.batches(self.epoch, self.step_in_epoch)
                while True:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    waited += time.perf_counter() - t0
                    if batch is None:
                        break
                    loss = self.train_step(batch)
                    self.cursor = batch.cursor
                    self.global_step += 1
                    self.step_in_epoch += 1
                    loss_sum += loss.float()
                    n_steps += 1
                    if ids_log is not None:
                        ids_log.write(
                            {
                                "step": self.global_step,
                                "epoch": self.epoch,
                                "index": self.step_in_epoch - 1,
                                "ids": ids_digest(batch.ids),
                                "loss": float(loss),
                            }
                        )
                    end_of_epoch = self.step_in_epoch >= self.steps_per_epoch
                    if self.global_step % tc.log_interval == 0 or end_of_epoch:
                        rec = self._log_interval(loss_sum, n_steps, waited, t_log, totals)
                        if log is not None:
                            log.write(rec)
                        loss_sum.zero_()
                        n_steps, waited, t_log = 0, 0.0, time.perf_counter()
                    if (
                        tc.ckpt_interval
                        and self.global_step % tc.ckpt_interval == 0
                        and not end_of_epoch
                    ):
                        self.save()
                # End of the epoch: evaluate, then checkpoint (so a resume never skips an eval).
                if (self.epoch + 1) % tc.eval_interval == 0 or self.epoch + 1 == tc.epochs:
                    res = self.run_eval()
                    self.last_val = {"epoch": self.epoch, **res}
                    rec = {"kind": "val", "epoch": self.epoch, "step": self.global_step, **res}
                    if log is not None:
                        log.write(rec)
                    _say(d, f"epoch {self.epoch + 1}/{tc.epochs} {val_summary(res)}")
                self._report_train_skipped(log)
                self.step_in_epoch = self.steps_per_epoch
                self.save()
                self.epoch += 1
                self.step_in_epoch = 0
                # Eval and checkpoint time count neither as training time nor as data wait.
                waited, t_log = 0.0, time.perf_counter()
        finally:
            if log is not None:
                log.close()
            if ids_log is not None:
                ids_log.close()
            self.train_loader.close()
            self.val_loader.close()

        summary = {
            "final": self.last_val,
            "steps": self.global_step,
            "images_per_s": totals["images"] / max(totals["time"], 1e-9),
            "data_wait_frac": totals["wait"] / max(totals["time"], 1e-9),
            "wall_s": time.time() - self.start_time,
            "world_size": d.world_size,
            "skipped": {
                "train": getattr(self, "train_skipped", []),
                "val": (self.last_val or {}).get("skipped_records", []),
            },
        }
        if d.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if tc.plot:
                png = plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
                if png:
                    _say(d, f"wrote {png}")
        return summary

    def _log_interval(self, loss_sum, n_steps, waited, t_log, totals) -> dict:
        d = self.d
        dt = time.perf_counter() - t_log
        # One small all-reduce per interval: mean loss and the slowest rank's wait.
        stats = torch.stack(
            [loss_sum.detach().float(), torch.tensor(float(n_steps), device=d.device)]
        )
        all_reduce_sum(stats, d)
        wait = torch.tensor([waited], device=d.device)
        if d.enabled:
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        images = n_steps * self.global_batch
        totals["wait"] += wait.item()
        totals["time"] += dt
        totals["images"] += images
        rec = {
            "kind": "train",
            "epoch": self.epoch,
            "step": self.global_step,
            "lr": self.schedule(self.global_step - 1),  # the lr of the interval's last step
            "loss": loss,
            "images_per_s": images / max(dt, 1e-9),
            # unclamped: a figure above 1 would be a measuring bug, and the tests look for it
            "data_wait_frac": wait.item() / max(dt, 1e-9),
            "time": time.time() - self.start_time,
        }
        if not math.isfinite(loss):
            _say(d, f"warning: non-finite loss at step {self.global_step}")
        _say(
            d,
            f"epoch {self.epoch + 1} step {self.global_step} "
            f"({self.step_in_epoch}/{self.steps_per_epoch}) loss {loss:.4f} "
            f"lr {rec['lr']:.4g} {rec['images_per_s']:.0f} img/s "
            f"data-wait {100 * rec['data_wait_frac']:.1f}%",
        )
        return rec


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def find_resume(cfg: Config, resume: str | bool | None) -> Path | None:
    """``--resume``: True → ``<out_dir>/last.pt`` if it exists; a path → that file."""
    if not resume:
        return None
    if resume is True:
        p = Path(cfg.train.out_dir) / ckpt.LAST
        return p if p.exists() else None
    p = Path(resume)
    if not p.exists():
        raise ckpt.CheckpointError(f"--resume-from {p}: no such checkpoint", "check the path")
    return p


def train(cfg: Config, resume: str | bool | None = None) -> dict:
    """Entry point of ``python -m trainer train``: one rank's share of the run."""
    d = init_distributed(cfg.train.device)
    try:
        path = find_resume(cfg, resume)
        if resume is True and path is None:
            _say(d, f"--resume: no checkpoint in {cfg.train.out_dir}; starting from scratch")
        return Trainer(cfg, d).fit(path)
    finally:
        shutdown_distributed()


def evaluate_checkpoint(cfg: Config, path: str | os.PathLike, use_ema: bool = False) -> dict:
    """Entry point of ``python -m trainer eval``: exact top-1/top-5 of a checkpoint's weights."""
    d = init_distributed(cfg.train.device)
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        state = ckpt.load(path)
        ckpt.require_keys(state, path, ("ema",) if use_ema else ("model",))
        weights = state["ema"] if use_ema else state["model"]
        if weights is None:
            raise ckpt.CheckpointError(f"{path} holds no EMA weights", "evaluate without --ema")
        model = prepare_model(build_model(cfg.model, resolve_num_classes(cfg)), cfg, d)
        ckpt.load_weights(model, weights, path)
        loader = build_loader(
            cfg.data,
            train=False,
            rank=d.rank,
            world_size=d.world_size,
            seed=cfg.train.seed,
            device=d.device,
        )
        try:
            batches = DeviceLoader(
                loader, d.device, cfg.data.mean, cfg.data.std, channels_last=cfg.train.channels_last
            )
            res = evaluate(model, batches, d, cfg.train.amp)
        finally:
            loader.close()
        res["checkpoint"] = str(path)
        res["weights"] = "ema" if use_ema else "model"
        return res
    finally:
        shutdown_distributed()


__all__ = ["Dist", "Trainer", "build_model", "evaluate", "evaluate_checkpoint", "train"]
