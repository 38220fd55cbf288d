"""Train and eval loops: DDP (NCCL on GPUs, gloo on CPU), AMP, channels-last, gradient
accumulation, torch.compile, exact resume, exact evaluation (of the EMA weights too), and the
run's logs (console lines with ETA and GPU memory, JSONL, TensorBoard, a PNG of the curves).

Outputs of a run, all under ``train.out_dir``: ``config.yaml``, ``metrics.jsonl`` (one record
per log interval and per evaluation), ``last.pt`` (the latest checkpoint), ``best.pt`` (highest
val top-1), ``epochNNNN.pt`` (the last ``train.keep_last`` epochs), ``tb/`` (TensorBoard),
``summary.json``, ``curves.png``, and with ``train.log_ids`` one ``ids-rank<r>.jsonl`` per rank.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt
from trainer.augment import DeviceAugment
from trainer.config import Config, ConfigError, ModelConfig, require_data_source, save_config
from trainer.data import (
    DeviceLoader,
    build_loader,
    describe_skipped,
    gather_skipped,
    pack_classes,
)
from trainer.logs import (
    Interval,
    RunLogs,
    format_eta,
    gpu_memory_gib,
    ids_digest,
    plot_curves,
)
from trainer.recipe import (
    BatchMixer,
    LRSchedule,
    Scheduler,
    build_ema,
    build_optimizer,
    centralize_gradients_,
    classification_loss,
    eshifted_l2_,
    scaled_lr,
)

log = logging.getLogger(__name__)

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
            _warn(d, "model.sync_bn: SyncBatchNorm needs CUDA; keeping per-rank BatchNorm")
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


def _info(d: Dist, msg: str) -> None:
    """An INFO record from rank 0 only (every rank runs the same loop; one line per event).
    ``python -m trainer`` sends the ``trainer`` loggers to stdout as plain lines."""
    if d.main:
        log.info(msg)


def _warn(d: Dist, msg: str) -> None:
    """A WARNING record from rank 0 only."""
    if d.main:
        log.warning(msg)


def val_summary(res: dict) -> str:
    """One eval's log line: accuracy, the images it counted and any it skipped as corrupt."""
    counted = f"{res['count']} images"
    if res.get("skipped"):
        counted += f", {describe_skipped(res['skipped_records'])}"
    line = (
        f"val top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% loss {res['loss']:.4f} ({counted})"
    )
    return line + (f"; EMA top-1 {res['ema_top1']:.2f}%" if "ema_top1" in res else "")


# --- training ----------------------------------------------------------------------------------


class Trainer:
    """One training run of ``cfg`` in this process (one rank of a torchrun job)."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg = cfg
        self.d = d
        self.out = Path(cfg.train.out_dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed + d.rank)
        self.num_classes = resolve_num_classes(cfg)
        self._build_model()
        self._build_data()
        self._build_recipe()
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps
        self.global_step = 0
        self.cursor = self.train_loader.state_dict()
        self.start_time = time.time()
        self.last_val: dict = {}
        self.best_top1: float | None = None

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.d
        self.model = prepare_model(build_model(cfg.model, self.num_classes), cfg, d)
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None
            )
            if d.enabled
            else self.model
        )
        # torch.compile compiles the training forward (through DDP); evaluation runs the eager
        # module, whose weights are the same tensors.
        self.forward = torch.compile(self.ddp) if cfg.train.compile else self.ddp

    def _build_data(self) -> None:
        cfg, d, tc = self.cfg, self.d, self.cfg.train
        common = {"rank": d.rank, "world_size": d.world_size, "seed": tc.seed, "device": d.device}
        self.train_loader = build_loader(cfg.data, train=True, **common)
        self.val_loader = build_loader(cfg.data, train=False, **common)
        self.accum = tc.accum_steps
        self.steps_per_epoch = len(self.train_loader) // self.accum  # optimizer steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the train split yields fewer than train.accum_steps={self.accum} full batches "
                "per rank; lower data.batch_size or train.accum_steps"
            )
        self.train_batches = DeviceLoader(
            self.train_loader,
            d.device,
            cfg.data.mean,
            cfg.data.std,
            channels_last=tc.channels_last,
            mixer=BatchMixer(cfg.augment, self.num_classes, seed=tc.seed),
            augment=DeviceAugment(cfg.augment, seed=tc.seed),
            rank=d.rank,
        )
        self.val_batches = DeviceLoader(
            self.val_loader, d.device, cfg.data.mean, cfg.data.std, channels_last=tc.channels_last
        )

    def _build_recipe(self) -> None:
        cfg, d, tc = self.cfg, self.d, self.cfg.train
        self.global_batch = cfg.data.batch_size * d.world_size * self.accum
        self.peak_lr = scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr)
        self.schedule = LRSchedule.from_config(
            cfg.optim, self.peak_lr, self.steps_per_epoch, tc.epochs
        )
        self.scheduler = Scheduler(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=tc.amp == "fp16")
        self.ema = build_ema(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        groups = self.optimizer.param_groups
        self.eshift_params = [p for g in groups if g.get("eshift") for p in g["params"]]
        self.all_params = [p for g in groups for p in g["params"]]
        self.total_steps = tc.epochs * self.steps_per_epoch
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "version": ckpt.CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "progress": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch,
            },
            "world_size": self.d.world_size,
            "last_val": self.last_val,
            "best_top1": self.best_top1,
        }

    def save(self, epoch_end: bool = False) -> None:
        """Gather every rank's RNG state and loader cursor; rank 0 writes ``last.pt``, and at
        an epoch end ``best.pt`` (when val top-1 improved) and the last ``keep_last`` epochs."""
        mine = {"rng": ckpt.rng_state(self.d.device), "loader": self.cursor}
        ranks = [None] * self.d.world_size
        if self.d.enabled:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not self.d.main:
            return
        top1 = self.last_val.get("top1") if epoch_end else None
        improved = top1 is not None and (self.best_top1 is None or top1 > self.best_top1)
        if improved:
            self.best_top1 = top1
        state = self.state_dict()
        state["ranks"] = ranks
        ckpt.save_atomic(state, self.out / ckpt.LAST)
        if improved:
            ckpt.save_atomic(state, self.out / ckpt.BEST)
        if epoch_end and self.cfg.train.keep_last:
            ckpt.save_atomic(state, self.out / ckpt.epoch_name(self.epoch))
            ckpt.prune_epochs(self.out, self.cfg.train.keep_last)

    def load(self, path: Path) -> None:
        state = ckpt.load(path)
        ckpt.require_keys(state, path, ("model", "optimizer", "scheduler", "scaler", "progress"))
        ckpt.load_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        p = state["progress"]
        self.epoch, self.step_in_epoch = p["epoch"], p["step_in_epoch"]
        self.global_step = p["global_step"]
        self.last_val = state.get("last_val") or {}
        self.best_top1 = state.get("best_top1")
        at_epoch_end = self.step_in_epoch >= p["steps_per_epoch"]  # saved after the eval
        self._restore_position(state, path, at_epoch_end)
        if at_epoch_end:
            self.epoch += 1
            self.step_in_epoch = 0
        diff = _config_diff(state["config"], self.cfg.to_dict())
        if diff:
            _info(self.d, f"resume: config differs from the checkpoint's in {', '.join(diff)}")
        _info(self.d, f"resumed from {path}: epoch {self.epoch}, step {self.global_step}")

    def _restore_position(self, state: dict, path: Path, at_epoch_end: bool) -> None:
        """The loader cursor and RNG state of this rank, or the schedule's place when the
        epoch length changed (another world size, batch size or accumulation)."""
        p, ranks = state["progress"], state["ranks"]
        same_world = len(ranks) == self.d.world_size
        if p["steps_per_epoch"] != self.steps_per_epoch:
            # Only an epoch boundary maps onto the new run without replaying or skipping samples.
            if not at_epoch_end:
                raise ConfigError(
                    f"{path} was taken mid-epoch with {p['steps_per_epoch']} steps per epoch; "
                    f"this run has {self.steps_per_epoch}. Resume it with the same world size, "
                    "data.batch_size and train.accum_steps, or from an epoch-end checkpoint."
                )
            self.global_step = (self.epoch + 1) * self.steps_per_epoch
            self.scheduler.load_state_dict({"last_step": self.global_step})
            _info(
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

    # --- one optimizer step --------------------------------------------------------------------

    def train_step(self, micro: list) -> torch.Tensor:
        """Forward and backward over ``micro`` (``accum_steps`` batches; DDP syncs gradients
        on the last only), then one optimizer step. Returns the mean loss (on the device)."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.d.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not self.d.enabled else self.ddp.no_sync()
            with sync:
                with autocast(self.d.device, cfg.train.amp):
                    logits = self.forward(batch.images)
                    loss = classification_loss(
                        logits,
                        batch.labels,
                        cfg.augment.label_smoothing,
                        cfg.augment.label_smoothing_mode,
                    )
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach().float()
        self._gradient_tricks()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return total / len(micro)

    def _gradient_tricks(self) -> None:
        """GC (of g + wd * w), the e-shifted L2 and clipping, on unscaled gradients."""
        o = self.cfg.optim
        if not (o.grad_centralization or o.eshift_l2 or o.clip_grad_norm):
            return
        self.scaler.unscale_(self.optimizer)
        if o.grad_centralization:
            centralize_gradients_(self.optimizer.param_groups)
        if o.eshift_l2:
            eshifted_l2_(self.eshift_params, o.eshift_l2, o.eshift_eps)
        if o.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.all_params, o.clip_grad_norm)

    def run_eval(self) -> dict:
        broadcast_state(self.model, self.d)
        res = evaluate(self.model, self.val_batches, self.d, self.cfg.train.amp, self.epoch)
        if self.ema is not None:
            broadcast_state(self.ema.module, self.d)
            e = evaluate(self.ema.module, self.val_batches, self.d, self.cfg.train.amp, self.epoch)
            res.update({"ema_top1": e["top1"], "ema_top5": e["top5"], "ema_loss": e["loss"]})
        return res

    def _report_train_skipped(self, logs: RunLogs) -> None:
        """End of an epoch: the train records skipped as corrupt, logged and kept (a
        collective: every rank calls it)."""
        skipped = gather_skipped(self.train_loader, self.d.world_size)
        self.train_skipped = skipped
        if not skipped:
            return
        _info(self.d, f"epoch {self.epoch + 1} train: {describe_skipped(skipped)}")
        logs.write({"kind": "skipped", "split": "train", "epoch": self.epoch, "records": skipped})

    # --- the loop ------------------------------------------------------------------------------

    def fit(self, resume: Path | None = None) -> dict:
        """Train to ``train.epochs`` or ``train.max_steps`` (from ``resume`` if given); returns
        the final summary."""
        logs = self._start(resume)
        self.interval = Interval(self.d.device)
        self.totals = {"wait": 0.0, "time": 0.0, "images": 0}
        try:
            while self.epoch < self.cfg.train.epochs and not self._reached_max_steps():
                self._train_epoch(logs)
                if self._reached_max_steps():
                    break  # a smoke run or benchmark: no evaluation
                self._end_epoch(logs)
        finally:
            logs.close()
            self.train_loader.close()
            self.val_loader.close()
        return self._finish()

    def _start(self, resume: Path | None) -> RunLogs:
        """Prepare the run folder, load ``resume``, open the logs and say what runs."""
        cfg, d = self.cfg, self.d
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.out)
            save_config(cfg, self.out / "config.yaml")
        if resume is not None:
            self.load(resume)
        elif (self.out / ckpt.LAST).exists():
            _info(
                d,
                f"note: {self.out} holds a checkpoint of an earlier run; this fresh run "
                "replaces it (without --fresh, a run continues from it)",
            )
        logs = RunLogs(
            self.out,
            main=d.main,
            rank=d.rank,
            resume_step=self.global_step if resume is not None else None,
            ids=cfg.train.log_ids,
            tb=cfg.train.tensorboard,
        )
        _info(
            d,
            f"training {cfg.model.name} ({self.num_classes} classes) on {d.world_size} "
            f"rank(s), {d.device.type}; {self.steps_per_epoch} steps/epoch, global batch "
            f"{self.global_batch} ({self.accum} micro-batch(es) per step), peak lr "
            f"{self.peak_lr:.4g}" + (", torch.compile" if cfg.train.compile else ""),
        )
        return logs

    def _reached_max_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def _train_epoch(self, logs: RunLogs) -> None:
        """The optimizer steps left in this epoch; each takes ``accum_steps`` batches."""
        self.ddp.train()
        self.train_loader.set_epoch(self.epoch)
        it = self.train_batches.batches(self.epoch, self.step_in_epoch * self.accum)
        while self.step_in_epoch < self.steps_per_epoch:
            t0 = time.perf_counter()
            micro = list(itertools.islice(it, self.accum))
            self.interval.waited += time.perf_counter() - t0
            if len(micro) < self.accum:
                break
            loss = self.train_step(micro)
            self.cursor = micro[-1].cursor
            self.global_step += 1
            self.step_in_epoch += 1
            self._after_step(micro, loss, logs)
            if self._reached_max_steps():
                self.save()
                return
        for _ in it:  # batches past the last full accumulation group are not trained
            pass

    def _after_step(self, micro: list, loss: torch.Tensor, logs: RunLogs) -> None:
        tc = self.cfg.train
        self.interval.loss_sum += loss
        self.interval.steps += 1
        if logs.ids is not None:
            ids = torch.cat([b.ids for b in micro])
            logs.ids.write(
                {
                    "step": self.global_step,
                    "epoch": self.epoch,
                    "index": self.step_in_epoch - 1,
                    "ids": ids_digest(ids),
                    "loss": float(loss),
                }
            )
        end_of_epoch = self.step_in_epoch >= self.steps_per_epoch
        if self.global_step % tc.log_interval == 0 or end_of_epoch or self._reached_max_steps():
            logs.write(self._log_interval())
            self.interval.reset()
        if tc.ckpt_interval and self.global_step % tc.ckpt_interval == 0 and not end_of_epoch:
            self.save()

    def _end_epoch(self, logs: RunLogs) -> None:
        """Evaluate when due, report skipped train records, then checkpoint (so a resume never
        skips an eval)."""
        tc = self.cfg.train
        if (self.epoch + 1) % tc.eval_interval == 0 or self.epoch + 1 == tc.epochs:
            res = self.run_eval()
            self.last_val = {"epoch": self.epoch, **res}
            logs.write({"kind": "val", "epoch": self.epoch, "step": self.global_step, **res})
            _info(self.d, f"epoch {self.epoch + 1}/{tc.epochs} {val_summary(res)}")
        self._report_train_skipped(logs)
        self.step_in_epoch = self.steps_per_epoch
        self.save(epoch_end=True)
        self.epoch += 1
        self.step_in_epoch = 0
        # Eval and checkpoint time count neither as training time nor as data wait.
        self.interval.reset()

    def _finish(self) -> dict:
        totals = self.totals
        summary = {
            "final": self.last_val,
            "best_top1": self.best_top1,
            "steps": self.global_step,
            "images_per_s": totals["images"] / max(totals["time"], 1e-9),
            "data_wait_frac": totals["wait"] / max(totals["time"], 1e-9),
            "wall_s": time.time() - self.start_time,
            "world_size": self.d.world_size,
            "gpu_mem_gib": gpu_memory_gib(self.d.device),
            "skipped": {
                "train": getattr(self, "train_skipped", []),
                "val": (self.last_val or {}).get("skipped_records", []),
            },
        }
        if self.d.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            if self.cfg.train.plot:
                png = plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
                if png:
                    _info(self.d, f"wrote {png}")
        return summary

    def _log_interval(self) -> dict:
        d, iv = self.d, self.interval
        dt = time.perf_counter() - iv.t0
        # One small all-reduce per interval: mean loss and the slowest rank's wait.
        stats = torch.stack([iv.loss_sum.float(), torch.tensor(float(iv.steps), device=d.device)])
        all_reduce_sum(stats, d)
        wait = torch.tensor([iv.waited], device=d.device)
        if d.enabled:
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        images = iv.steps * self.global_batch
        self.totals["wait"] += wait.item()
        self.totals["time"] += dt
        self.totals["images"] += images
        rec = {
            "kind": "train",
            "epoch": self.epoch,
            "step": self.global_step,
            "lr": self.schedule(self.global_step - 1),  # the lr of the interval's last step
            "loss": loss,
            "images_per_s": images / max(dt, 1e-9),
            # unclamped: a figure above 1 would be a measuring bug, and the tests look for it
            "data_wait_frac": wait.item() / max(dt, 1e-9),
            "eta_s": (self.total_steps - self.global_step) * dt / max(iv.steps, 1),
            "time": time.time() - self.start_time,
        }
        mem = gpu_memory_gib(d.device)
        if mem is not None:
            rec["gpu_mem_gib"] = mem
        if not math.isfinite(loss):
            _warn(d, f"non-finite loss at step {self.global_step}")
        _info(d, self._log_line(rec))
        return rec

    def _log_line(self, rec: dict) -> str:
        line = (
            f"epoch {self.epoch + 1} step {self.global_step} "
            f"({self.step_in_epoch}/{self.steps_per_epoch}) loss {rec['loss']:.4f} "
            f"lr {rec['lr']:.4g} {rec['images_per_s']:.0f} img/s "
            f"data-wait {100 * rec['data_wait_frac']:.1f}% eta {format_eta(rec['eta_s'])}"
        )
        if "gpu_mem_gib" in rec:
            line += f" mem {rec['gpu_mem_gib']:.1f}G"
        return line


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
            _info(d, f"--resume: no checkpoint in {cfg.train.out_dir}; starting from scratch")
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
