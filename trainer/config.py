"""Training configuration: one small frozen dataclass per stage, loaded from YAML plus
``section.key=value`` overrides, validated once, saved as ``config.yaml`` beside the outputs.

Builders receive only their part (``DataConfig`` for loaders, ``OptimConfig`` for the optimizer
and schedule, ...); nothing reads a global configuration.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datasvc.corrupt import ON_CORRUPT, corrupt_limit
from datasvc.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UsageError, ValueError):
    """A configuration that cannot be trained: unknown key, bad value or inconsistent choice."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from: a loader backend and its source, per-rank batch sizes, image sizes.

    ``source`` is a pack path (``custom``, ``dali_*``, ``torch``; ``torch`` also takes an
    ImageFolder tree) or the endpoint list of ``remote``. ``options`` go to the backend unchanged
    (e.g. ``prefetch``, ``decoder``, ``pack`` for ``remote``). ``pin_memory`` None means "when
    training on CUDA". ``crop_scale``/``hflip`` set the train crop where the backend honours them.
    ``on_corrupt`` is the corrupt-record policy of both loaders ("skip": a damaged record is left
    out of its batch, listed and logged; "raise": the job stops naming it) and ``max_corrupt`` the
    records per epoch and rank that may be skipped before the job stops (an int count, or a
    float fraction of the rank's epoch; None: 0.1%). Eval lists what it skipped and leaves it
    out of the accuracy's denominator.
    """

    backend: str = "custom"
    source: str | list[str] = ""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 32  # per rank
    val_batch_size: int | None = None  # per rank; default batch_size
    image_size: int = 224
    val_image_size: int | None = None  # default image_size
    eval_resize: int | None = None  # shorter side before the eval center crop; None: 256/224 x
    num_workers: int | None = None  # per rank; backend default when None
    pin_memory: bool | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    options: dict = field(default_factory=dict)
    on_corrupt: str = "skip"
    max_corrupt: int | float | None = None

    def __post_init__(self):
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(
            self.on_corrupt in ON_CORRUPT,
            f"data.on_corrupt must be one of {list(ON_CORRUPT)}, got {self.on_corrupt!r}",
        )
        try:
            corrupt_limit(self.max_corrupt, 1)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.max_corrupt: {e}") from None
        _check(
            self.val_batch_size is None or self.val_batch_size >= 1,
            "data.val_batch_size must be >= 1",
        )
        _check(8 <= self.image_size <= 1024, f"data.image_size out of range: {self.image_size}")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, f"data.crop_scale must satisfy 0 < lo <= hi <= 1: {lo, hi}")
        _check(0 <= self.hflip <= 1, f"data.hflip must be a probability, got {self.hflip}")
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.mean/std need 3 values")
        _check(all(s > 0 for s in self.std), "data.std must be positive")
        _check(
            self.eval_resize is None or self.eval_resize >= self.eval_image_size,
            f"data.eval_resize ({self.eval_resize}) must be >= the eval image size",
        )

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size or self.batch_size

    @property
    def eval_image_size(self) -> int:
        return self.val_image_size or self.image_size


@dataclass(frozen=True)
class ModelConfig:
    """Which registered model to build and the regularizers it takes at construction.

    ``num_classes`` None reads the class list of the pack. ``drop_rate`` (dropout before the
    classifier), ``drop_path_rate`` (stochastic depth) and ``zero_init_residual`` (zero-gamma) are
    passed only when set, so families without them still build. ``kwargs`` go to the builder.
    """

    name: str = "resnet50"
    num_classes: int | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_residual: bool = False
    sync_bn: bool = False
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(0 <= self.drop_rate < 1, f"model.drop_rate must be in [0, 1): {self.drop_rate}")
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate must be in [0, 1)")
        _check(self.num_classes is None or self.num_classes >= 1, "model.num_classes must be >= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation on the trainer's device, and label smoothing of the targets.

    Per sample, on the uint8 levels, drawn from (seed, epoch, sample id) (``trainer.augment``):
    ``color_jitter`` (brightness, contrast, saturation; seed 003: 0.4 each), ``rotation``
    (degrees, seed 003: 15), ``random_erasing`` (probability of torch-toolbox's Cutout: a box of
    ``erasing_area`` of the image, aspect in ``erasing_aspect``, one random fill level).
    Per batch, normalized: ``cutout`` is the side in pixels of one zeroed square for the whole
    batch (seed 002's cutout, 112 there), 0 for none. Mixup and CutMix are enabled by a positive
    alpha; with both, each batch picks CutMix with ``switch_prob``; ``mix_prob`` is the chance a
    batch is mixed at all.
    """

    label_smoothing: float = 0.0
    label_smoothing_mode: str = "uniform"  # "others": eps/(K-1) off the label, as both seeds
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    cutout: int = 0
    color_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: float = 0.0
    random_erasing: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 0.4)
    erasing_aspect: tuple[float, float] = (0.4, 2.5)

    def __post_init__(self):
        _check(0 <= self.label_smoothing < 1, "augment.label_smoothing must be in [0, 1)")
        _check(
            self.label_smoothing_mode in ("uniform", "others"),
            f"augment.label_smoothing_mode: uniform or others, not {self.label_smoothing_mode!r}",
        )
        _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup/cutmix alpha must be >= 0")
        _check(
            0 <= self.mix_prob <= 1 and 0 <= self.switch_prob <= 1,
            "augment.mix_prob and switch_prob must be probabilities",
        )
        _check(self.cutout >= 0, "augment.cutout must be >= 0")
        _check(all(0 <= j < 1 for j in self.color_jitter), "augment.color_jitter values in [0, 1)")
        _check(0 <= self.rotation <= 180, "augment.rotation is in degrees, 0..180")
        _check(0 <= self.random_erasing <= 1, "augment.random_erasing is a probability")
        lo, hi = self.erasing_area
        _check(0 < lo <= hi <= 1, "augment.erasing_area must satisfy 0 < lo <= hi <= 1")
        lo, hi = self.erasing_aspect
        _check(0 < lo <= hi, "augment.erasing_aspect must satisfy 0 < lo <= hi")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


# Kinds of parameters a recipe can exempt from weight decay (``optim.no_decay``):
#   bias          every parameter named "...bias" (PytorchInsight's default exemption)
#   norm          the other parameters of norm layers (BN/GN/LN/IN gammas)
#   conv          weights of dense convs (groups == 1)
#   grouped_conv  weights of grouped and depthwise convs (groups > 1)
#   linear        weights of linear layers
#   tagged        parameters of modules that set ``no_weight_decay = True`` (SRM), or named by
#                 the model's ``no_weight_decay()`` (timm's convention)
#   other         anything else (free parameters such as SGE's gate weights)
DECAY_KINDS = ("bias", "norm", "conv", "grouped_conv", "linear", "tagged", "other")


@dataclass(frozen=True)
class OptimConfig:
    """SGD, its learning-rate schedule and the weight-space tricks of the seed recipes.

    The peak learning rate is ``lr * global_batch / base_batch`` (``base_batch`` 128 gives the
    seeds' "batch / 128 * reference"; 0 disables scaling). ``schedule``: "cosine" (half period,
    over the epochs after warm-up), "step" (times ``gamma`` at each epoch in ``milestones``) or
    "constant"; warm-up rises linearly from ``warmup_start * lr`` over ``warmup_epochs``.
    ``no_decay`` lists the parameter kinds exempt from weight decay (``recipe.DECAY_KINDS``:
    bias, norm, conv, grouped_conv, linear, tagged, other); ``no_decay_bias_norm`` is shorthand
    for [bias, norm]. ``eshift_l2`` > 0 replaces
    weight decay on conv filters by the e-shifted L2 regularizer of strength ``eshift_l2`` and
    shift ``eshift_eps`` (seed 002's WS-ResNets). ``lookahead_k`` > 0 wraps SGD in Lookahead;
    ``ema_decay`` > 0 keeps an exponential moving average of the weights.
    """

    name: str = "sgd"
    lr: float = 0.1
    base_batch: int = 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_bias_norm: bool = False
    no_decay: tuple[str, ...] = ()
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (30, 60, 90)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    min_lr: float = 0.0  # cosine floor, as a fraction of the peak
    grad_centralization: bool = False
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    ema_decay: float = 0.0
    eshift_l2: float = 0.0
    eshift_eps: float = 1e-3
    clip_grad_norm: float = 0.0

    def __post_init__(self):
        _check(self.name == "sgd", f"optim.name: only 'sgd' is implemented, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(self.base_batch >= 0, "optim.base_batch must be >= 0")
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1): {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "optim.nesterov needs momentum > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(
            self.schedule in ("cosine", "step", "constant"),
            f"optim.schedule: cosine, step or constant, not {self.schedule!r}",
        )
        _check(list(self.milestones) == sorted(self.milestones), "optim.milestones must ascend")
        _check(self.warmup_epochs >= 0 and 0 <= self.warmup_start <= 1, "bad warm-up settings")
        _check(0 <= self.min_lr < 1, "optim.min_lr is a fraction of the peak lr, in [0, 1)")
        _check(self.lookahead_k >= 0 and 0 < self.lookahead_alpha <= 1, "bad lookahead settings")
        _check(0 <= self.ema_decay < 1, f"optim.ema_decay must be in [0, 1): {self.ema_decay}")
        _check(self.eshift_l2 >= 0 and self.eshift_eps >= 0, "e-shifted L2 settings must be >= 0")
        _check(self.clip_grad_norm >= 0, "optim.clip_grad_norm must be >= 0")
        bad = sorted(set(self.no_decay) - set(DECAY_KINDS))
        _check(not bad, f"optim.no_decay: unknown kind(s) {bad}; valid: {list(DECAY_KINDS)}")


@dataclass(frozen=True)
class TrainConfig:
    """The run: epochs, precision, where outputs go, how often to log, evaluate and checkpoint.

    ``amp``: "none", "fp16" (autocast + grad scaler) or "bf16". ``ckpt_interval`` is in optimizer
    steps (0: at epoch ends only); a checkpoint is always written at each epoch end. ``log_ids``
    writes one line per step and rank with a hash of the sample ids (for data-order checks).
    ``threads`` sets torch's intra-op threads per rank (None: torch's default).
    ``accum_steps`` micro-batches make one optimizer step (global batch = batch_size x ranks x
    accum_steps). ``max_steps`` > 0 stops after that many optimizer steps (smoke runs and
    benchmarks: no evaluation). ``compile`` wraps the training forward in ``torch.compile``.
    ``keep_last`` keeps that many epoch-end checkpoints besides ``last.pt`` and ``best.pt``
    (highest val top-1). ``auto_resume`` continues from ``<out_dir>/last.pt`` when it exists.
    ``tensorboard`` writes the logged scalars under ``<out_dir>/tb`` too.
    """

    epochs: int = 100
    amp: str = "none"
    channels_last: bool = True
    seed: int = 0
    out_dir: str = "runs/default"
    log_interval: int = 50
    eval_interval: int = 1
    ckpt_interval: int = 0
    log_ids: bool = False
    plot: bool = True
    device: str = "auto"
    threads: int | None = None
    accum_steps: int = 1
    max_steps: int = 0
    compile: bool = False
    keep_last: int = 0
    auto_resume: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.accum_steps >= 1, f"train.accum_steps must be >= 1, got {self.accum_steps}")
        _check(self.max_steps >= 0 and self.keep_last >= 0, "max_steps, keep_last must be >= 0")
        _check(
            self.amp in ("none", "fp16", "bf16"), f"train.amp: none, fp16 or bf16, not {self.amp!r}"
        )
        _check(self.log_interval >= 1 and self.eval_interval >= 1, "intervals must be >= 1")
        _check(self.ckpt_interval >= 0, "train.ckpt_interval must be >= 0")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device: auto, cpu or cuda")
        _check(self.threads is None or self.threads >= 1, "train.threads must be >= 1")


@dataclass(frozen=True)
class MetaConfig:
    """What a config reproduces (nothing here changes training): the seed document and its
    table row, the published accuracy, and how many GPUs the seed trained on (so the seed's
    global batch is ``batch_size x gpus x accum_steps``)."""

    seed: str = ""
    row: str = ""
    published_top1: float | None = None
    published_top5: float | None = None
    gpus: int = 1
    notes: str = ""

    def __post_init__(self):
        _check(self.gpus >= 1, f"meta.gpus must be >= 1, got {self.gpus}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "meta": MetaConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole run: one frozen section per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)

    def to_dict(self) -> dict:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Build and validate a config from nested plain data; unknown keys are errors."""
        d = d or {}
        unknown = set(d) - set(SECTIONS)
        _check(not unknown, f"unknown config section(s) {sorted(unknown)}; valid: {list(SECTIONS)}")
        return cls(
            **{name: _section(name, kind, d.get(name) or {}) for name, kind in SECTIONS.items()}
        )

    def replace(self, values: dict[str, object]) -> Config:
        """A copy with ``{"section.key": value}`` applied, validated again."""
        d = self.to_dict()
        for key, value in values.items():
            _set_path(d, key.split("."), value, key)
        return Config.from_dict(d)


def _plain(v):
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _coerce(kind, value, where: str):
    """YAML value → the field's declared type (ints for floats, lists for tuples)."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if kind is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{where}: expected a number, got {value!r}",
        )
        return float(value)
    if kind is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            f"{where}: expected an integer, got {value!r}",
        )
        return value
    if kind is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if kind is str:
        _check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, list | tuple), f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], x, where) for x in value)
        _check(len(value) == len(args), f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, x, where) for a, x in zip(args, value))
    if origin is list:
        _check(isinstance(value, list | tuple), f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], x, where) for x in value]
    if kind is dict or origin is dict:
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


#: Keys renamed in 0.1 (section, old key) → new key; the old ones still load until 0.2.
RENAMED_KEYS = {("data", "workers"): "num_workers"}


def _renamed_keys(name: str, values: dict) -> dict:
    values = dict(values)
    for (section, old), new in RENAMED_KEYS.items():
        if section == name and old in values:
            _check(new not in values, f"{name}.{old} and {name}.{new} are the same key; give {new}")
            warnings.warn(
                f"{name}.{old} is deprecated and will be removed in datasvc 0.2; use {name}.{new}",
                DeprecationWarning,
                stacklevel=2,
            )
            values[new] = values.pop(old)
    return values


def _section(name: str, kind: type, values: dict):
    _check(isinstance(values, dict), f"config section {name!r} must be a mapping")
    values = _renamed_keys(name, values)
    hints = typing.get_type_hints(kind)
    fields = [f.name for f in dataclasses.fields(kind)]
    unknown = set(values) - set(fields)
    _check(not unknown, f"unknown key(s) {sorted(unknown)} in {name!r}; valid: {fields}")
    kw = {k: _coerce(hints[k], v, f"{name}.{k}") for k, v in values.items()}
    return kind(**kw)


def parse_override(text: str) -> tuple[list[str], object]:
    """``"optim.lr=0.1"`` → (["optim", "lr"], 0.1); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key), f"override {text!r} is not key=value")
    path = key.strip().split(".")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(cfg: Config | dict, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` (or ``section.mapping.key=value``) strings, then validate."""
    d = cfg.to_dict() if isinstance(cfg, Config) else _plain(dict(cfg))
    for text in overrides:
        path, value = parse_override(text)
        _set_path(d, path, value, text)
    return Config.from_dict(d)


def _set_path(d: dict, path: list[str], value, text: str) -> None:
    _check(len(path) >= 2, f"{text!r}: the key needs a section, e.g. optim.lr")
    _check(path[0] in SECTIONS, f"{text!r}: unknown section {path[0]!r}; valid: {list(SECTIONS)}")
    node = d.setdefault(path[0], {})
    for part in path[1:-1]:
        node = node.setdefault(part, {})
        _check(isinstance(node, dict), f"{text!r}: {part!r} is not a mapping")
    node[path[-1]] = value


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A config path as given (relative to the working directory), else a packaged config by
    name (``digits``, ``digits.yaml`` or ``trainer/configs/digits.yaml`` from any directory)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file")
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    packaged = PACKAGED_CONFIGS / f"{stem}.yaml"
    if packaged.is_file() and (len(path.parts) == 1 or path.parent.name == "configs"):
        return packaged
    raise ConfigError(
        f"no config file {name} (looked in {Path.cwd()} and among the packaged configs)",
        f"give a path, or a packaged name: {', '.join(packaged_config_names())}",
    )


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: all defaults; see ``resolve_config_path`` for where it is
    looked for), apply overrides, validate once."""
    d = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        _check(isinstance(d, dict), f"{path}: a config file holds a mapping of sections")
    return apply_overrides(d, overrides or [])


def require_data_source(data: DataConfig) -> None:
    """Training and evaluation need ``data.source``; config files may leave it to the command
    line (the packaged ones do)."""
    if not data.source:
        raise ConfigError(
            "data.source is not set",
            "add data.source=PACK_FOLDER (or data.backend=remote data.source=tcp://HOST:PORT "
            "data.options.pack=NAME)",
        )


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
