"""Attention modules for ResNets: ``ATTENTION.create(name, channels, **kwargs)``.

Every module takes ``channels`` first and maps (N, C, H, W) → (N, C, H', W'), with H' = H except
for the SK unit at stride 2. The class attribute ``placement`` tells a network where it goes:

- ``"block"``: gate on the residual branch, after its last norm and before the addition
  (SE, CBAM, GC, SGE, SRM);
- ``"conv"``: replaces the 3x3 conv + norm + ReLU of the block (SK);
- ``"stage"``: after each of the first three stages (BAM).

Hyper-parameters and initialisation follow PytorchInsight's ImageNet ResNets (SE, SK*, CBAM, BAM,
SGE), the GCNet paper (GC, ratio 1/16) and the SRM authors' code (SRM).
"""

from __future__ import annotations

import torch
from torch import nn

from datasvc.registry import Registry

ATTENTION = Registry("attention")


@ATTENTION.register("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.): x * sigmoid(MLP(avgpool(x))); shape preserved."""

    placement = "block"

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean(dim=(2, 3))).sigmoid()
        return x * gate[:, :, None, None]


@ATTENTION.register("sk")
class SelectiveKernel(nn.Module):
    """Modified SK unit of PytorchInsight's SK-ResNet*: (N, C, H, W) → (N, C, H/s, W/s).

    Two 3x3 branches (a dense conv and a 32-group conv, both with BN + ReLU and stride ``stride``)
    are fused by a per-channel softmax over the branches, computed from their pooled sum by
    conv1x1 (C → C/16) + BN + ReLU + conv1x1 (C/16 → 2C). It replaces the bottleneck's 3x3 conv.
    """

    placement = "conv"

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        branch_groups: int = 32,
        reduction: int = 16,
    ):
        super().__init__()
        self.channels = channels
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride, 1, groups=g, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for g in (groups, branch_groups)
        )
        hidden = channels // reduction
        self.select = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (branch(x) for branch in self.branches)
        pooled = (a + b).mean(dim=(2, 3), keepdim=True)  # = avgpool(a) + avgpool(b)
        weights = self.select(pooled).view(x.shape[0], 2, self.channels, 1, 1).softmax(dim=1)
        return a * weights[:, 0] + b * weights[:, 1]


@ATTENTION.register("cbam")
class CBAM(nn.Module):
    """Convolutional block attention (Woo et al.): channel gate then 7x7 spatial gate; shape kept.

    The channel MLP is shared by the average- and max-pooled descriptors; the spatial gate is a
    7x7 conv + BN over [max, mean] across channels. As in the reference code the spatial BN's
    gamma starts at zero (``init_weights``), so the spatial gate starts uniform.
    """

    placement = "block"

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1, momentum=0.01)

    def init_weights(self) -> None:
        nn.init.zeros_(self.spatial_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))).sigmoid()
        x = x * gate[:, :, None, None]
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * self.spatial_bn(self.spatial(pooled)).sigmoid()


@ATTENTION.register("bam")
class BAM(nn.Module):
    """Bottleneck attention (Park et al.): x * (1 + sigmoid(channel(x) * spatial(x))); shape kept.

    Channel branch: avgpool → FC (C → C/16) + BN + ReLU → FC (C/16 → C). Spatial branch:
    conv1x1 (C → C/16) + BN + ReLU, two dilated (4) 3x3 convs + BN + ReLU, conv1x1 → 1 map.
    """

    placement = "stage"

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        hidden = channels // reduction
        self.channel = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        layers: list[nn.Module] = [
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        for _ in range(2):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The paper adds the two maps; the reference code (and so the seed's trained BAM-ResNets)
        # multiplies them. We follow the code.
        channel = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]
        return x * (1 + (channel * self.spatial(x)).sigmoid())


@ATTENTION.register("gc")
class GlobalContext(nn.Module):
    """Global context block (Cao et al., GCNet): x + transform(softmax-pooled context); shape kept.

    Context: a 1x1 conv gives softmax weights over H*W that pool x to (N, C, 1, 1). Transform:
    conv1x1 (C → C*ratio) + LayerNorm + ReLU + conv1x1 (→ C), whose last conv starts at zero so
    the block starts as the identity, as in the GCNet code.
    """

    placement = "block"

    def __init__(self, channels: int, ratio: float = 1 / 16):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def init_weights(self) -> None:
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = self.mask(x).view(n, 1, h * w).softmax(dim=-1)  # (N, 1, HW)
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.transform(context)


@ATTENTION.register("sge")
class SpatialGroupEnhance(nn.Module):
    """Spatial group-wise enhance (Li et al., SGENet): per-group spatial gate; shape kept.

    Channels split into ``groups``; in each, similarity of every position to the group's mean
    vector is normalized over space, scaled by a learned (weight, bias) per group (init 0, 1)
    and used as a sigmoid gate. Needs H * W > 1 (it takes a spatial std).
    """

    placement = "block"

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        if channels % groups:
            raise ValueError(f"SGE needs channels ({channels}) divisible by groups ({groups})")
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xg = x.reshape(n * self.groups, c // self.groups, h, w)
        sim = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).view(n * self.groups, h * w)
        sim = sim - sim.mean(dim=1, keepdim=True)
        sim = sim / (sim.std(dim=1, keepdim=True) + 1e-5)
        gate = sim.view(n, self.groups, h, w) * self.weight + self.bias
        gate = gate.view(n * self.groups, 1, h, w).sigmoid()
        return (xg * gate).view(n, c, h, w)


@ATTENTION.register("srm")
class StyleRecalibration(nn.Module):
    """Style-based recalibration (Lee et al., SRM): x * sigmoid(BN(cfc · [mean, std])); shape kept.

    Style pooling takes each channel's spatial mean and std (sqrt(var + 1e-5)); a channel-wise
    fully connected layer (2 weights per channel, init 0) and BN give the gate. Needs H * W > 1.
    """

    placement = "block"
    # The SRM authors' training code exempts the module's own parameters (cfc and its BN) from
    # weight decay; a recipe honours this with the "tagged" no-decay kind.
    no_weight_decay = True

    def __init__(self, channels: int):
        super().__init__()
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        style = torch.stack([flat.mean(dim=2), (flat.var(dim=2) + 1e-5).sqrt()], dim=2)
        z = (style * self.cfc).sum(dim=2)[:, :, None, None]
        return x * self.bn(z).sigmoid()


def attention_placement(name: str | None) -> str | None:
    """Attention name → where a network puts it ("block", "conv", "stage"); None → None."""
    return None if name is None else ATTENTION.get(name).placement


__all__ = [
    "ATTENTION",
    "BAM",
    "CBAM",
    "GlobalContext",
    "SelectiveKernel",
    "SpatialGroupEnhance",
    "SqueezeExcite",
    "StyleRecalibration",
    "attention_placement",
]
