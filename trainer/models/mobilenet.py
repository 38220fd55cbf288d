"""MobileNets: V1 (Howard et al. 2017, ours), V2 and V3 (Sandler et al. 2018, Howard et al. 2019,
built by timm)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from trainer.models import register_model
from trainer.models.layers import init_conv_bn_linear, standardize_convs
from trainer.models.library import timm_model

# (output channels, stride) of the 13 depthwise-separable layers of MobileNetV1.
V1_LAYERS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU then 1x1 conv-BN-ReLU: (N, C_in, H, W) → (N, C_out, H/s, W/s)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.dw = _conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pw = _conv_bn_relu(in_ch, out_ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 with ReLU as in the paper: (N, 3, H, W) → (N, num_classes) logits.

    Args:
        num_classes: classifier width.
        width_mult: channel multiplier (1.0 is the 4.2M-parameter model).
        drop_rate: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 1000, *, width_mult: float = 1.0, drop_rate: float = 0.0):
        super().__init__()
        in_ch = int(32 * width_mult)
        self.stem = _conv_bn_relu(3, in_ch, 3, 2)
        blocks = []
        for out, stride in V1_LAYERS:
            blocks.append(DepthwiseSeparable(in_ch, int(out * width_mult), stride))
            in_ch = int(out * width_mult)
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.blocks(self.stem(x))).flatten(1)
        return self.fc(self.dropout(x))


def mobilenet(
    arch: str, num_classes: int = 1000, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> nn.Module:
    """MobileNetV2/V3 ``arch`` (a timm name): (N, 3, H, W) → (N, num_classes).

    timm's mobilenetv3_small_100 has the paper's 1024-wide head (2.5M parameters).
    """
    return timm_model(arch, num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)


def ws_mobilenetv1(num_classes: int = 1000, **kwargs) -> nn.Module:
    """MobileNetV1 with every conv weight-standardized (seed 002's e-shifted L2 table)."""
    return standardize_convs(MobileNetV1(num_classes, **kwargs))


register_model("mobilenetv1")(partial(MobileNetV1))
register_model("ws_mobilenetv1")(ws_mobilenetv1)
register_model("mobilenetv2")(partial(mobilenet, "mobilenetv2_100"))
register_model("mobilenetv3_large")(partial(mobilenet, "mobilenetv3_large_100"))
register_model("mobilenetv3_small")(partial(mobilenet, "mobilenetv3_small_100"))
