"""The training recipe: optimizer and parameter groups, learning-rate schedule, loss, batch mixing,
and the weight-space tricks of the seed model zoos (gradient centralization, Lookahead, EMA,
e-shifted L2).

Everything stochastic here is a pure function of ``(seed, epoch, step, rank)``, so a run resumed
from a checkpoint draws the same mixes as the run that was interrupted.

Generic pieces come from timm where it holds a faithful one: the EMA of the weights is timm's
``ModelEmaV3`` (``build_ema``) and stochastic depth timm's ``DropPath`` (``models/resnet.py``).
Ours stay where the seeds' variant or our exact resume needs another: timm's Mixup/CutMix and
random erasing draw from the global RNG, so a resumed run would mix differently (ours are keyed
by the batch); its schedulers are equivalent to ``LRSchedule`` but step per epoch or per update
by mode, where the seeds warm up per iteration. Weight standardization stays ours
(``models/layers.py``): timm's StdConv2d divides by sqrt(biased var + 1e-6), PytorchInsight by
(unbiased std + 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn

from trainer.config import DECAY_KINDS, AugmentConfig, OptimConfig

# --- learning rate -----------------------------------------------------------------------------


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: ``lr * global_batch / base_batch`` (``base_batch`` 0: ``lr`` as is)."""
    return cfg.lr * global_batch / cfg.base_batch if cfg.base_batch else cfg.lr


class LRSchedule:
    """Optimizer step → learning rate; a pure function of the step (its only state).

    With ``t = step / steps_per_epoch`` in epochs: warm-up rises linearly from
    ``warmup_start * peak`` to the schedule's value over ``warmup_epochs``; "cosine" is a half
    cosine from ``peak`` (at the end of warm-up) to ``min_lr * peak`` (at ``epochs``); "step"
    multiplies by ``gamma`` from each milestone epoch on; "constant" stays at ``peak``.
    """

    def __init__(
        self,
        peak: float,
        steps_per_epoch: int,
        epochs: int,
        *,
        schedule="cosine",
        milestones=(30, 60, 90),
        gamma=0.1,
        warmup_epochs=0.0,
        warmup_start=0.0,
        min_lr=0.0,
    ):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.peak = peak
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.schedule = schedule
        self.milestones = tuple(milestones)
        self.gamma = gamma
        self.warmup_epochs = min(warmup_epochs, epochs)
        self.warmup_start = warmup_start
        self.min_lr = min_lr

    @classmethod
    def from_config(cls, cfg: OptimConfig, peak: float, steps_per_epoch: int, epochs: int):
        return cls(
            peak,
            steps_per_epoch,
            epochs,
            schedule=cfg.schedule,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
            warmup_epochs=cfg.warmup_epochs,
            warmup_start=cfg.warmup_start,
            min_lr=cfg.min_lr,
        )

    def factor(self, step: int) -> float:
        """The multiplier of ``peak`` at optimizer step ``step`` (0-based)."""
        t = step / self.steps_per_epoch
        w = self.warmup_epochs
        if self.schedule == "cosine":
            p = 0.0 if t <= w else min(1.0, (t - w) / max(self.epochs - w, 1e-12))
            base = self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.schedule == "step":
            # Decays at epoch boundaries, as the reference scripts adjust lr per epoch.
            base = self.gamma ** sum(1 for m in self.milestones if math.floor(t + 1e-9) >= m)
        else:
            base = 1.0
        if w > 0 and t < w:
            base *= self.warmup_start + (1 - self.warmup_start) * t / w
        return base

    def __call__(self, step: int) -> float:
        return self.peak * self.factor(step)


class Scheduler:
    """Sets every parameter group's lr from an ``LRSchedule`` for the coming optimizer step."""

    def __init__(self, optimizer, schedule: LRSchedule):
        self.optimizer = optimizer
        self.schedule = schedule
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.schedule(self.last_step)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


# --- optimizer ---------------------------------------------------------------------------------

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def is_eshift_param(p: torch.Tensor) -> bool:
    """Conv filters the e-shifted L2 applies to: 4-D, not depthwise (as seed 002's LSGD)."""
    return p.ndim == 4 and p.shape[1] != 1


def _tagged_ids(model: nn.Module) -> set[int]:
    """ids of the parameters a module exempts itself: ``no_weight_decay = True`` on a module
    (all its parameters), or names returned by the model's ``no_weight_decay()`` (timm)."""
    ids = set()
    if callable(getattr(model, "no_weight_decay", None)):
        names = set(model.no_weight_decay())
        ids |= {id(p) for n, p in model.named_parameters() if n in names}
    for m in model.modules():
        if getattr(m, "no_weight_decay", None) is True:
            ids |= {id(p) for p in m.parameters()}
    return ids


def _module_kind(module: nn.Module, name: str) -> str:
    if name.endswith("bias"):
        return "bias"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv" if module.groups == 1 else "grouped_conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "other"


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name → its kind in ``DECAY_KINDS`` ("tagged" first, then by owning module)."""
    tagged = _tagged_ids(model)
    by_id = {}
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            by_id.setdefault(id(p), "tagged" if id(p) in tagged else _module_kind(m, n))
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: tuple[str, ...] | list[str] = (),
    no_decay_bias_norm: bool = False,
    eshift: bool = False,
) -> list[dict]:
    """Split parameters into SGD groups: "decay", "no_decay" and "eshift" (e-shifted L2 filters).

    ``no_decay``: kinds (``config.DECAY_KINDS``) that get no weight decay; ``no_decay_bias_norm`` is
    shorthand for adding "bias" and "norm". ``eshift``: non-depthwise conv filters get no
    weight decay (the e-shifted L2 regularizes them instead) and are marked ``eshift: True``.
    Each group lists its ``param_names``; empty groups are left out.
    """
    exempt = set(no_decay) | ({"bias", "norm"} if no_decay_bias_norm else set())
    unknown = exempt - set(DECAY_KINDS)
    if unknown:
        raise ValueError(f"unknown no-decay kind(s) {sorted(unknown)}; valid: {DECAY_KINDS}")
    kinds = parameter_kinds(model)
    groups = {
        "decay": {"params": [], "param_names": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "param_names": [], "weight_decay": 0.0},
        "eshift": {"params": [], "param_names": [], "weight_decay": 0.0, "eshift": True},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if eshift and is_eshift_param(p):
            key = "eshift"
        elif kinds[name] in exempt:
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [{"name": k, **g} for k, g in groups.items() if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float):
    """SGD (momentum, Nesterov option) over ``param_groups``; wrapped in Lookahead if asked.

    With gradient centralization the decay moves out of SGD into ``centralize_gradients_``
    (each group's ``gc_weight_decay``), which centralizes ``g + wd * w`` as seed 003's SGD_GC.
    """
    groups = param_groups(
        model,
        cfg.weight_decay,
        no_decay=cfg.no_decay,
        no_decay_bias_norm=cfg.no_decay_bias_norm,
        eshift=cfg.eshift_l2 > 0,
    )
    if cfg.grad_centralization:
        for g in groups:
            g["gc_weight_decay"], g["weight_decay"] = g["weight_decay"], 0.0
    opt = torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    if cfg.lookahead_k:
        opt = Lookahead(opt, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    return opt


@torch.no_grad()
def centralize_gradients_(param_groups) -> None:
    """Gradient centralization (Yong et al. 2020) as their SGD_GC, conv filters only as in seed
    003's ablation: ``g ← g + wd * w``, then each conv filter's ``g`` minus its mean over
    (in, kh, kw). ``wd`` is the group's ``gc_weight_decay`` (``build_optimizer`` moves SGD's
    own decay there, so it is added once)."""
    for group in param_groups:
        wd = group.get("gc_weight_decay", 0.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            if wd:
                p.grad.add_(p.detach(), alpha=wd)
            if p.ndim == 4:
                p.grad.sub_(p.grad.mean(dim=(1, 2, 3), keepdim=True))


@torch.no_grad()
def eshifted_l2_(params, strength: float, eps: float) -> None:
    """Add the e-shifted L2 gradient to conv filters (seed 002, weight-standardized models).

    Per output filter ``w`` with mean ``m`` and std ``s``: ``grad += strength * ((1 - eps / s)
    * (w - m) + m)``, which decays the filter towards a std of ``eps`` rather than towards 0, since
    weight standardization makes the loss blind to the filter's scale.
    """
    for p in params:
        if p.grad is None or not is_eshift_param(p):
            continue
        w = p.detach().flatten(1).float()
        mean = w.mean(dim=1, keepdim=True)
        std = w.std(dim=1, keepdim=True)
        g = (1 - eps / std) * (w - mean) + mean
        p.grad.add_(g.view_as(p).to(p.grad.dtype), alpha=strength)


class Lookahead:
    """Lookahead (Zhang et al. 2019) around an optimizer: every ``k`` steps the slow weights move
    ``alpha`` of the way to the fast ones, and the fast weights restart from them.

    Exposes ``param_groups`` of the inner optimizer, so schedulers and grad scalers treat it as
    the optimizer itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.steps = 0
        self.slow = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            with torch.no_grad():
                for p, slow in zip(self._params(), self.slow):
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "slow": self.slow,
            "steps": self.steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for slow, saved in zip(self.slow, state["slow"]):
                slow.copy_(saved)
        self.steps = int(state["steps"])


def build_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """timm's ``ModelEmaV3`` of ``model``: ``ema = decay * ema + (1 - decay) * w`` for the
    parameters and floating buffers (BN statistics) at every optimizer step, integer buffers
    copied. Its weights are frozen (they are never trained; evaluation reads them). A checkpoint
    holds ``ema.module.state_dict()`` (the model's own keys), which is all its state at a fixed
    decay: the warm-up and bf16 stochastic rounding options, which would need a step count or a
    generator state restored on resume, are left off."""
    ema = ModelEmaV3(model, decay=decay)
    for p in ema.module.parameters():
        p.requires_grad_(False)
    return ema


# --- loss and targets --------------------------------------------------------------------------


def smooth_one_hot(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.0, mode: str = "uniform"
) -> torch.Tensor:
    """int64 (N,) → float (N, K) smoothed one-hot targets; each row sums to 1.

    ``mode`` "uniform" (torch's ``label_smoothing``): ``1 - eps + eps/K`` on the label and
    ``eps/K`` elsewhere. "others" (both seeds' losses, PytorchInsight's SoftCrossEntropyLoss and
    torch-toolbox's LabelSmoothingLoss): ``1 - eps`` on the label and ``eps/(K-1)`` elsewhere.
    """
    if mode == "uniform":
        off, on = smoothing / num_classes, 1.0 - smoothing + smoothing / num_classes
    elif mode == "others":
        off, on = smoothing / max(num_classes - 1, 1), 1.0 - smoothing
    else:
        raise ValueError(f"label smoothing mode: uniform or others, not {mode!r}")
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), on)


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0, mode: str = "uniform"
) -> torch.Tensor:
    """Mean cross-entropy against int labels (N,) with label smoothing (see ``smooth_one_hot``
    for ``mode``), or against soft targets (N, K). Computed in float32 whatever the autocast
    dtype of ``logits``.
    """
    logits = logits.float()
    if not targets.dtype.is_floating_point:
        if mode == "uniform" or not smoothing:
            return F.cross_entropy(logits, targets, label_smoothing=smoothing)
        targets = smooth_one_hot(targets, logits.shape[1], smoothing, mode)
    return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


def batch_rng(seed: int, epoch: int, step: int, rank: int, stream: int = 0) -> np.random.Generator:
    """The generator for one batch's device augmentation: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch, step, rank, stream])


class BatchMixer:
    """Mixup / CutMix / cutout on normalized float batches, on their device.

    Call with (images N×3×H×W float, labels int64 N) and the batch's (epoch, step, rank);
    returns (images, targets): targets are soft (N, K) when the batch was mixed, else the int
    labels (the loss applies label smoothing to those). Images are modified in place.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int, seed: int = 0):
        self.cfg = cfg
        self.num_classes = num_classes
        self.seed = seed

    @property
    def active(self) -> bool:
        return self.cfg.mixing or self.cfg.cutout > 0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rng = batch_rng(self.seed, epoch, step, rank)
        if cfg.cutout:
            cutout_(images, cfg.cutout, rng)
        if not cfg.mixing or rng.random() >= cfg.mix_prob:
            return images, labels
        use_cutmix = cfg.cutmix_alpha > 0 and (
            cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob
        )
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        perm = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
        if use_cutmix:
            lam = cutmix_(images, perm, lam, rng)
        else:
            mixup_(images, perm, lam)
        y = smooth_one_hot(labels, self.num_classes, cfg.label_smoothing, cfg.label_smoothing_mode)
        return images, lam * y + (1.0 - lam) * y[perm]


def mixup_(images: torch.Tensor, perm: torch.Tensor, lam: float) -> None:
    """``x ← lam * x + (1 - lam) * x[perm]`` in place (Zhang et al. 2018)."""
    other = images[perm]
    images.mul_(lam).add_(other, alpha=1.0 - lam)


def cutmix_(
    images: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator
) -> float:
    """Paste a box of ``x[perm]`` covering about ``1 - lam`` of the area (Yun et al. 2019).

    Returns the exact kept fraction (the box is clipped at the borders), which weights the
    targets.
    """
    h, w = images.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    if y2 > y1 and x2 > x1:
        images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    return 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


def cutout_(images: torch.Tensor, size: int, rng: np.random.Generator) -> None:
    """Seed 002's cutout: zero one ``size``×``size`` square at the same place in every image of
    the batch, centred uniformly and clipped at the borders (PytorchInsight's ``cutout_data``).
    Zero in normalized space is the mean colour."""
    h, w = images.shape[-2:]
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = max(cy - size // 2, 0), min(cy + size // 2, h)
    x1, x2 = max(cx - size // 2, 0), min(cx + size // 2, w)
    images[:, :, y1:y2, x1:x2] = 0.0
