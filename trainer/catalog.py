"""The seed-row configs under ``trainer/configs/``: what each trains and what it published
(``python -m trainer configs``)."""

from __future__ import annotations

from pathlib import Path

from trainer.config import Config, load_config
from trainer.recipe import scaled_lr

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# (section.key, label) of the recipe options a row may switch on; a value other than the
# default is listed as one of the row's tricks.
TRICKS = [
    ("augment.label_smoothing", "label smoothing"),
    ("augment.mixup_alpha", "mixup"),
    ("augment.cutmix_alpha", "cutmix"),
    ("augment.cutout", "cutout (batch)"),
    ("augment.color_jitter", "color jitter"),
    ("augment.rotation", "rotation"),
    ("augment.random_erasing", "random erasing"),
    ("model.drop_rate", "dropout"),
    ("model.drop_path_rate", "drop path"),
    ("model.zero_init_residual", "zero gamma"),
    ("model.sync_bn", "sync BN"),
    ("optim.no_decay", "no decay"),
    ("optim.no_decay_bias_norm", "no decay bias/norm"),
    ("optim.grad_centralization", "GC"),
    ("optim.lookahead_k", "lookahead"),
    ("optim.ema_decay", "EMA"),
    ("optim.eshift_l2", "e-shifted L2"),
]


def _get(d: dict, key: str):
    section, field = key.split(".")
    return d[section][field]


def tricks(cfg: Config) -> list[str]:
    """The recipe options ``cfg`` sets away from their defaults, as "label=value"."""
    ours, default = cfg.to_dict(), Config().to_dict()
    out = []
    for key, label in TRICKS:
        value = _get(ours, key)
        if value != _get(default, key):
            out.append(label if value is True else f"{label}={value}")
    return out


def needs_gpu(cfg: Config) -> bool:
    """Whether ``cfg`` as written can only run on CUDA: fp16 autocast with a grad scaler, the
    dali_gpu backend, SyncBatchNorm or ``train.device: cuda``."""
    return (
        cfg.train.amp == "fp16"
        or cfg.data.backend == "dali_gpu"
        or cfg.model.sync_bn
        or cfg.train.device == "cuda"
    )


def config_row(path: Path) -> dict:
    """One config's listing: name, seed, model, epochs, global batch, peak lr, tricks,
    published top-1 and whether it needs a GPU."""
    cfg = load_config(path)
    global_batch = cfg.data.batch_size * cfg.meta.gpus * cfg.train.accum_steps
    return {
        "name": path.stem,
        "seed": cfg.meta.seed,
        "row": cfg.meta.row,
        "model": cfg.model.name,
        "epochs": cfg.train.epochs,
        "global_batch": global_batch,
        "lr": round(scaled_lr(cfg.optim, global_batch), 6),
        "tricks": tricks(cfg),
        "published_top1": cfg.meta.published_top1,
        "needs_gpu": needs_gpu(cfg),
    }


def config_rows(folder: Path = CONFIG_DIR) -> list[dict]:
    return [config_row(p) for p in sorted(Path(folder).glob("*.yaml"))]
