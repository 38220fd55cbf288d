"""OctConv ResNet-50 (Chen et al. 2019), as seed 003 (PistonY ModelZoo.pytorch) builds it.

Every bottleneck conv is an octave conv: a fraction ``alpha`` of the channels is kept at half
resolution ("low"), the rest at full resolution ("high"), and each conv is four convs
(high→high, high→low, low→high, low→low) whose outputs are summed per resolution. As in seed
003's ``oct_resnet50``:

- the stem is a plain conv-BN-ReLU-maxpool; layer1's first block enters the octave space
  (alpha_in 0 → alpha_out alpha) and layer4's first block leaves it (alpha → 0), so layer4 and
  the classifier are plain;
- a stride-2 conv average-pools (2x2) its input and convolves at stride 1; low→high outputs are
  nearest-upsampled at stride 1, and taken as they are at stride 2 (low is already half size);
- channels split as ``int((1 - alpha) * c)`` high and ``int(alpha * c)`` low, with one BN each;
- the projection shortcut is an octave 1x1 conv + BN with the block's own alphas.

The parameter count equals ResNet-50's (the four convs partition the full conv); the cost is
lower. Weights keep PyTorch's default init, as the reference does.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from trainer.models import register_model

Pair = tuple[torch.Tensor, torch.Tensor | None]


def _split(channels: int, alpha: float) -> tuple[int, int]:
    return int((1 - alpha) * channels), int(alpha * channels)


class OctaveConv(nn.Module):
    """Octave conv: (high N×h_in×H×W, low N×l_in×H/2×W/2 or None) → (high, low or None).

    ``alpha_in`` 0 means the input has no low part; ``alpha_out`` 0 means the output has none.
    """

    def __init__(self, in_ch, out_ch, alpha_in, alpha_out, kernel, stride=1, groups=1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"octave conv stride must be 1 or 2, got {stride}")
        h_in, l_in = _split(in_ch, alpha_in)
        h_out, l_out = _split(out_ch, alpha_out)
        pad = kernel // 2
        conv = partial(nn.Conv2d, kernel_size=kernel, padding=pad, groups=groups, bias=False)
        self.stride = stride
        self.hh = conv(h_in, h_out)
        self.hl = conv(h_in, l_out) if l_out else None
        self.lh = conv(l_in, h_out) if l_in else None
        self.ll = conv(l_in, l_out) if l_in and l_out else None
        self.down = nn.AvgPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x_h: torch.Tensor, x_l: torch.Tensor | None = None) -> Pair:
        if self.stride == 2:
            x_h = self.down(x_h)
        y_h = self.hh(x_h)
        if self.lh is not None:
            low_to_high = self.lh(x_l)
            # At stride 2 the low input already has the output's resolution.
            y_h = y_h + (self.up(low_to_high) if self.stride == 1 else low_to_high)
        if self.hl is None:
            return y_h, None
        y_l = self.hl(self.down(x_h))
        if self.ll is not None:
            y_l = y_l + self.ll(x_l if self.stride == 1 else self.down(x_l))
        return y_h, y_l


class OctaveBN(nn.Module):
    """One BatchNorm for the high part and one for the low part (when there is one)."""

    def __init__(self, channels: int, alpha: float):
        super().__init__()
        h, low = _split(channels, alpha)
        self.h = nn.BatchNorm2d(h)
        self.l = nn.BatchNorm2d(low) if low else None

    def forward(self, x_h, x_l=None) -> Pair:
        return self.h(x_h), (self.l(x_l) if x_l is not None else None)


def _relu(pair: Pair, relu: nn.Module) -> Pair:
    x_h, x_l = pair
    return relu(x_h), (relu(x_l) if x_l is not None else None)


class OctBottleneck(nn.Module):
    """Octave bottleneck: (high, low) → (high, low); conv1 switches alphas, conv2/3 keep alpha_out
    (seed 003's ``check_status``)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, alpha_in: float, alpha_out: float, stride=1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = OctaveConv(in_ch, planes, alpha_in, alpha_out, 1)
        self.bn1 = OctaveBN(planes, alpha_out)
        self.conv2 = OctaveConv(planes, planes, alpha_out, alpha_out, 3, stride)
        self.bn2 = OctaveBN(planes, alpha_out)
        self.conv3 = OctaveConv(planes, out_ch, alpha_out, alpha_out, 1)
        self.bn3 = OctaveBN(out_ch, alpha_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.ModuleList(
                [
                    OctaveConv(in_ch, out_ch, alpha_in, alpha_out, 1, stride),
                    OctaveBN(out_ch, alpha_out),
                ]
            )

    def forward(self, x_h, x_l=None) -> Pair:
        out = _relu(self.bn1(*self.conv1(x_h, x_l)), self.relu)
        out = _relu(self.bn2(*self.conv2(*out)), self.relu)
        y_h, y_l = self.bn3(*self.conv3(*out))
        r_h, r_l = x_h, x_l
        if self.downsample is not None:
            r_h, r_l = self.downsample[1](*self.downsample[0](x_h, x_l))
        return _relu((y_h + r_h, None if y_l is None else y_l + r_l), self.relu)


class OctResNet(nn.Module):
    """Octave ResNet: (N, 3, H, W) → (N, num_classes); H and W multiples of 32 (224 is)."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000, *, alpha: float = 0.125):
        super().__init__()
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch, stages = 64, []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            a_in = 0.0 if i == 0 else alpha  # layer1 enters the octave space
            a_out = 0.0 if i == 3 else alpha  # layer4 leaves it
            blocks = [OctBottleneck(in_ch, planes, a_in, a_out, 1 if i == 0 else 2)]
            in_ch = planes * OctBottleneck.expansion
            blocks += [OctBottleneck(in_ch, planes, a_out, a_out) for _ in range(1, depth)]
            stages.append(nn.ModuleList(blocks))
        self.layers = nn.ModuleList(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair: Pair = (self.maxpool(self.relu(self.bn1(self.conv1(x)))), None)
        for stage in self.layers:
            for block in stage:
                pair = block(*pair)
        return self.fc(self.avgpool(pair[0]).flatten(1))


# High and low maps stay aligned when the side is a multiple of 32 (at 40 px, 5x5 high maps meet
# 2x2 low ones); the classifier follows layer4, where the model is plain again.
register_model("oct_resnet50", size_multiple=32)(partial(OctResNet, (3, 4, 6, 3)))
