"""Layers shared by the model families: weight-standardized conv, norm and activation choice.

Stochastic depth is timm's ``DropPath`` (``timm.layers``), used as is: a per-sample mask, kept
samples scaled by 1 / (1 - p), identity in eval; no seed trains it another way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class WSConv2d(nn.Conv2d):
    """Conv2d whose weight is standardized per output filter on every call (Qiao et al. 2019).

    Follows PytorchInsight's WS ResNets: subtract the filter mean, divide by its (unbiased) std
    plus 1e-5. The stored weight is unconstrained; only the weight used in the conv is normalized.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return self._conv_forward(x, w / std, self.bias)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """Name → factory ``channels → norm``: "bn" (BatchNorm2d) or "gn" (GroupNorm, 32 groups)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {kind!r}; valid: bn, gn")


def activation_layer(kind: str) -> Callable[[], nn.Module]:
    """Name → factory of an in-place activation module: "relu" or "relu6"."""
    if kind == "relu":
        return lambda: nn.ReLU(inplace=True)
    if kind == "relu6":
        return lambda: nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {kind!r}; valid: relu, relu6")


def standardize_convs(model: nn.Module) -> nn.Module:
    """Turn every ``nn.Conv2d`` of ``model`` into a ``WSConv2d`` in place, keeping its parameters
    (PytorchInsight's WS models standardize every conv, depthwise ones included; linear layers
    stay plain). Returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = WSConv2d  # same attributes and parameters, standardized forward
    return model


def init_conv_bn_linear(model: nn.Module) -> None:
    """The reference init of the seeds' MobileNetV1 and ShuffleNetV1: He normal (fan out) convs,
    BN at 1 and 0, the classifier N(0, 0.01) with a zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
