"""EfficientNet (Tan & Le 2019), built by timm; B1 is profiled at its native 240x240."""

from __future__ import annotations

from functools import partial

from torch import nn

from trainer.models import register_model
from trainer.models.library import timm_model


def efficientnet(
    arch: str, num_classes: int = 1000, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> nn.Module:
    """EfficientNet ``arch`` (a timm name, e.g. "efficientnet_b0"): (N, 3, H, W) → (N, num_classes).

    The paper trains B0/B1 with drop_rate 0.2 and drop_path_rate 0.2; defaults here are 0.
    """
    return timm_model(arch, num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


register_model("efficientnet_b0", image_size=224)(partial(efficientnet, "efficientnet_b0"))
register_model("efficientnet_b1", image_size=240)(partial(efficientnet, "efficientnet_b1"))
