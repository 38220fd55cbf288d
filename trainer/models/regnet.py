"""RegNetX / RegNetY (Radosavovic et al. 2020) as defined by pycls, built by timm."""

from __future__ import annotations

from functools import partial

from torch import nn

from trainer.models import register_model
from trainer.models.library import timm_model

ARCHS = {
    "regnetx_4_0gf": "regnetx_040",
    "regnety_4_0gf": "regnety_040",
    "regnety_6_4gf": "regnety_064",
}


def regnet(
    arch: str,
    num_classes: int = 1000,
    *,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    zero_init_residual: bool = False,
) -> nn.Module:
    """RegNet ``arch`` (a timm name, e.g. "regnety_040"): (N, 3, H, W) → (N, num_classes).

    SE in RegNetY squeezes to 1/4 of the block's *input* width, as in pycls.
    """
    return timm_model(
        arch,
        num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        zero_init_last=zero_init_residual,
    )


for _name, _arch in ARCHS.items():
    register_model(_name)(partial(regnet, _arch))
