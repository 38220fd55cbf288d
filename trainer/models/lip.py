"""LIP-ResNet-50 (Gao et al. 2019, "LIP: Local Importance-based Pooling"), one of seed 003's
tricks, following the LIP authors' ``lip_resnet.py``.

LIP pools with learned weights: ``avgpool(x * exp(logit)) / avgpool(exp(logit))`` over 3x3
windows at stride 2, where the logit is ``12 * sigmoid(InstanceNorm(conv(features)))``. The
network is a ResNet-50 in which every 2x downsampling is a LIP:

- the stem's max pool becomes a "simplified" LIP (logit from a 3x3 conv of its own input);
- in each stride-2 bottleneck, a shared logit trunk (1x1 conv to 128 channels, IN, ReLU, 3x3
  conv, IN, ReLU) reads the block input; the 3x3 conv is replaced by LIP (logit: 1x1 conv of
  the trunk, IN, gate) followed by a 1x1 conv, and the shortcut is LIP (its own 1x1 logit head)
  then the 1x1 projection and BN.

Init as the reference: Kaiming convs, BN gamma 1 (last BN of each block 0), classifier N(0,
0.01), and the logit convs right before each gate at 0 (so LIP starts as average pooling).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import register_model

LOGIT_WIDTH = 128  # the reference's BOTTLENECK_WIDTH
GATE_SCALE = 12.0  # the reference's COEFF


def lip2d(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """Local importance pooling, 3x3 windows at stride 2: (N, C, H, W) → (N, C, H/2, W/2)."""
    weight = logit.exp()
    return F.avg_pool2d(x * weight, 3, 2, 1) / F.avg_pool2d(weight, 3, 2, 1)


class SoftGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * GATE_SCALE


def _logit_head(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    """conv (no bias, zero-init) → InstanceNorm (affine) → 12·sigmoid: the LIP logit."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
    conv.lip_zero_init = True
    return nn.Sequential(conv, nn.InstanceNorm2d(out_ch, affine=True), SoftGate())


class SimplifiedLIP(nn.Module):
    """The stem's LIP: logit from a 3x3 conv of the input itself."""

    def __init__(self, channels: int):
        super().__init__()
        self.logit = _logit_head(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lip2d(x, self.logit(x))


def _shared_trunk(channels: int) -> nn.Sequential:
    w = LOGIT_WIDTH
    return nn.Sequential(
        nn.Conv2d(channels, w, 1, bias=False),
        nn.InstanceNorm2d(w, affine=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(w, w, 3, padding=1, bias=False),
        nn.InstanceNorm2d(w, affine=True),
        nn.ReLU(inplace=True),
    )


class LIPBottleneck(nn.Module):
    """ResNet bottleneck whose stride-2 version downsamples with LIP: (N, C, H, W) →
    (N, 4p, H/s, W/s)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if stride == 2:
            self.shared = _shared_trunk(in_ch)
            self.lip = _logit_head(LOGIT_WIDTH, planes, 1)
            self.conv2 = nn.Conv2d(planes, planes, 1, bias=False)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.down_lip = _logit_head(LOGIT_WIDTH, in_ch, 1) if stride == 2 else None
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        shortcut = x
        if self.stride == 2:
            shared = self.shared(x)
            out = lip2d(out, self.lip(shared))
            shortcut = lip2d(x, self.down_lip(shared))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.relu(out + shortcut)


class LIPResNet(nn.Module):
    """LIP-ResNet: (N, 3, H, W) → (N, num_classes) logits."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SimplifiedLIP(64)  # the reference keeps the attribute's name
        in_ch = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = [LIPBottleneck(in_ch, planes, 1 if i == 0 else 2)]
            in_ch = planes * LIPBottleneck.expansion
            blocks += [LIPBottleneck(in_ch, planes) for _ in range(1, depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if getattr(m, "lip_zero_init", False):
                    nn.init.zeros_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, LIPBottleneck):  # the reference zero-inits each block's last BN
                nn.init.zeros_(m.bn3.weight)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


register_model("lip_resnet50")(partial(LIPResNet, (3, 4, 6, 3)))
