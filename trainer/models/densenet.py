"""DenseNet-201 (Huang et al. 2017), built by torchvision, and its weight-standardized twin of
seed 002's e-shifted L2 table (every conv standardized, BatchNorm kept, classifier plain)."""

from __future__ import annotations

from torch import nn

from trainer.models import register_model
from trainer.models.layers import standardize_convs
from trainer.models.library import torchvision_model


def densenet(
    arch: str, num_classes: int = 1000, *, ws: bool = False, drop_rate: float = 0.0
) -> nn.Module:
    """torchvision DenseNet ``arch``: (N, 3, H, W) → (N, num_classes); ``ws`` standardizes
    every conv; ``drop_rate`` is torchvision's dropout after each dense layer."""
    model = torchvision_model(arch, num_classes, drop_rate=drop_rate)
    return standardize_convs(model) if ws else model


@register_model("densenet201")
def densenet201(num_classes: int = 1000, **kwargs) -> nn.Module:
    return densenet("densenet201", num_classes, **kwargs)


@register_model("ws_densenet201")
def ws_densenet201(num_classes: int = 1000, **kwargs) -> nn.Module:
    return densenet("densenet201", num_classes, ws=True, **kwargs)
