"""GhostNet (Han et al. 2020), built by timm."""

from __future__ import annotations

from functools import partial

from torch import nn

from trainer.models import register_model
from trainer.models.library import timm_model


def ghostnet(arch: str, num_classes: int = 1000, *, drop_rate: float = 0.0) -> nn.Module:
    """GhostNet ``arch`` (a timm name, e.g. "ghostnet_130"): (N, 3, H, W) → (N, num_classes).

    ``drop_rate`` is the dropout before the classifier (the paper uses 0.2).
    """
    return timm_model(arch, num_classes, drop_rate=drop_rate)


register_model("ghostnet_1_3")(partial(ghostnet, "ghostnet_130"))
