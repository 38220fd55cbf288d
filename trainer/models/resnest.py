"""ResNeSt (Zhang et al. 2020): split-attention ResNet, built by timm."""

from __future__ import annotations

from functools import partial

from torch import nn

from trainer.models import register_model
from trainer.models.library import timm_model


def resnest(
    arch: str,
    num_classes: int = 1000,
    *,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    zero_init_residual: bool = False,
) -> nn.Module:
    """ResNeSt ``arch`` (a timm name): (N, 3, H, W) → (N, num_classes).

    timm's "resnest50d" is the paper's ResNeSt-50: deep 3x3 stem, radix 2, avg-pool downsampling.
    """
    return timm_model(
        arch,
        num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        zero_init_last=zero_init_residual,
    )


register_model("resnest50")(partial(resnest, "resnest50d"))
