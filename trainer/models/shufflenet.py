"""ShuffleNets: V1 (Zhang et al. 2018, ours) and V2 (Ma et al. 2018, built by torchvision), and
the weight-standardized twins of seed 002's e-shifted L2 table (every conv standardized,
depthwise included; BatchNorm kept; classifier plain)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from trainer.models import register_model
from trainer.models.layers import init_conv_bn_linear, standardize_convs
from trainer.models.library import torchvision_model

# Output channels of stages 2-4 of ShuffleNetV1 1.0x per group count (the paper's Table 1).
V1_WIDTHS = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
V1_REPEATS = (4, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit: group 1x1 → shuffle → depthwise 3x3 → group 1x1; stride 2 concatenates
    a 3x3 average-pooled shortcut (so the branch makes ``out_ch - in_ch`` channels), stride 1
    adds the identity. (N, in_ch, H, W) → (N, out_ch, H/s, W/s)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, stride: int, first_groups: int):
        super().__init__()
        self.stride, self.groups = stride, first_groups
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        mid = out_ch // 4
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.groups > 1:
            out = channel_shuffle(out, self.groups)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        if self.pool is not None:
            return torch.cat([self.pool(x), self.relu(out)], dim=1)
        return self.relu(out + x)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 1.0x: (N, 3, H, W) → (N, num_classes).

    Stem 3x3 conv (24, stride 2) + BN + ReLU + 3x3 max pool; three stages of 4, 8, 4 units, the
    first of each at stride 2; the very first 1x1 conv is not grouped (24 input channels, as in
    the paper); global average pool and a linear classifier. ``groups`` 3 is the paper's
    reference model (seed 002 gives no figures for it).
    """

    def __init__(self, num_classes: int = 1000, *, groups: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if groups not in V1_WIDTHS:
            raise ValueError(f"ShuffleNetV1 groups must be one of {sorted(V1_WIDTHS)}")
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True)
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        units, in_ch = [], 24
        for stage, (out_ch, repeat) in enumerate(zip(V1_WIDTHS[groups], V1_REPEATS)):
            for i in range(repeat):
                first = 1 if stage == 0 and i == 0 else groups
                units.append(ShuffleV1Unit(in_ch, out_ch, groups, 2 if i == 0 else 1, first))
                in_ch = out_ch
        self.stages = nn.Sequential(*units)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.maxpool(self.conv1(x)))
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))


def shufflenetv2(
    arch: str, num_classes: int = 1000, *, ws: bool = False, drop_rate: float = 0.0
) -> nn.Module:
    """ShuffleNetV2 ``arch`` (a torchvision name): (N, 3, H, W) → (N, num_classes).

    ``ws`` standardizes every conv; ``drop_rate`` adds dropout before the classifier
    (torchvision has none).
    """
    model = torchvision_model(arch, num_classes)
    if drop_rate:
        model.fc = nn.Sequential(nn.Dropout(drop_rate), model.fc)
    return standardize_convs(model) if ws else model


def ws_shufflenetv1(num_classes: int = 1000, **kwargs) -> nn.Module:
    return standardize_convs(ShuffleNetV1(num_classes, **kwargs))


register_model("shufflenetv1")(partial(ShuffleNetV1))
register_model("ws_shufflenetv1")(ws_shufflenetv1)
register_model("shufflenetv2_1x")(partial(shufflenetv2, "shufflenet_v2_x1_0"))
register_model("ws_shufflenetv2_1x")(partial(shufflenetv2, "shufflenet_v2_x1_0", ws=True))
