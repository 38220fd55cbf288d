"""ShuffleNetV2 (Ma et al. 2018), built by torchvision."""

from __future__ import annotations

from functools import partial

from torch import nn

from trainer.models import register_model
from trainer.models.library import torchvision_model


def shufflenetv2(arch: str, num_classes: int = 1000, *, drop_rate: float = 0.0) -> nn.Module:
    """ShuffleNetV2 ``arch`` (a torchvision name): (N, 3, H, W) → (N, num_classes).

    ``drop_rate`` adds dropout before the classifier (torchvision has none).
    """
    model = torchvision_model(arch, num_classes)
    if drop_rate:
        model.fc = nn.Sequential(nn.Dropout(drop_rate), model.fc)
    return model


register_model("shufflenetv2_1x")(partial(shufflenetv2, "shufflenet_v2_x1_0"))
