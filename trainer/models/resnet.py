"""ResNet family: one builder ``resnet(depth, ...)``; ResNeXt, pre-activation, attention and
weight-standardized variants are its arguments.

Post-activation blocks follow torchvision (stride on the 3x3 conv, "ResNet v1.5") and keep its
parameter names, so torchvision ResNet/ResNeXt checkpoints load into the plain variants.
Pre-activation (v2) follows He et al. 2016 as in seed 003: stem conv-BN-ReLU-maxpool, blocks
BN-ReLU-conv with the projection shortcut taken from the pre-activated input, and a final BN-ReLU.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import DropPath
from torch import nn

from trainer.models import register_model
from trainer.models.attention import ATTENTION, attention_placement
from trainer.models.layers import WSConv2d, activation_layer, norm_layer

LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _gate(attn: str | None, channels: int, attn_kwargs: dict) -> nn.Module:
    """The block-level attention gate for ``attn``, or Identity when it goes elsewhere."""
    if attention_placement(attn) != "block":
        return nn.Identity()
    return ATTENTION.create(attn, channels, **attn_kwargs)


class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut, post-activation: (N, C_in, H, W) → (N, planes, H/s, W/s)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        conv: type[nn.Conv2d] = nn.Conv2d,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        attn: str | None = None,
        attn_kwargs: dict | None = None,
        drop_path: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1, width_per_group=64")
        if attention_placement(attn) == "conv":
            raise ValueError(f"attention {attn!r} replaces a bottleneck conv; use depth >= 50")
        self.conv1 = conv(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.attn = _gate(attn, planes, attn_kwargs or {})
        self.relu = act()
        self.downsample = _projection(in_ch, planes, stride, conv, norm)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.relu(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (or SK unit) → 1x1 + shortcut, post-act: (N, C_in, H, W) → (N, 4p, H/s, W/s)."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        conv: type[nn.Conv2d] = nn.Conv2d,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        attn: str | None = None,
        attn_kwargs: dict | None = None,
        drop_path: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        attn_kwargs = attn_kwargs or {}
        width = int(planes * base_width / 64) * groups
        out_ch = planes * self.expansion
        self.conv1 = conv(in_ch, width, 1, bias=False)
        self.bn1 = norm(width)
        if attention_placement(attn) == "conv":  # SK unit replaces conv2 + bn2 + ReLU
            self.conv2 = ATTENTION.create(attn, width, stride=stride, groups=groups, **attn_kwargs)
            self.bn2, self.act2 = nn.Identity(), nn.Identity()
        else:
            self.conv2 = conv(width, width, 3, stride, 1, groups=groups, bias=False)
            self.bn2, self.act2 = norm(width), act()
        self.conv3 = conv(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.attn = _gate(attn, out_ch, attn_kwargs)
        self.relu = act()
        self.downsample = _projection(in_ch, out_ch, stride, conv, norm)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.relu(self.drop_path(out) + shortcut)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-3x3 twice + shortcut (He et al. v2): (N, C_in, H, W) → (N, planes, H/s, W/s)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        conv: type[nn.Conv2d] = nn.Conv2d,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        attn: str | None = None,
        attn_kwargs: dict | None = None,
        drop_path: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1, width_per_group=64")
        self.bn1 = norm(in_ch)
        self.conv1 = conv(in_ch, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1, bias=False)
        self.attn = _gate(attn, planes, attn_kwargs or {})
        self.relu = act()
        self.downsample = _projection(in_ch, planes, stride, conv, None)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.attn(self.conv2(self.relu(self.bn2(out))))
        return self.drop_path(out) + shortcut


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv 1x1 → 3x3 → 1x1 + shortcut (v2): (N, C_in, H, W) → (N, 4p, H/s, W/s)."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        conv: type[nn.Conv2d] = nn.Conv2d,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        attn: str | None = None,
        attn_kwargs: dict | None = None,
        drop_path: float = 0.0,
        act: Callable[[], nn.Module] = nn.ReLU,
    ):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_ch = planes * self.expansion
        self.bn1 = norm(in_ch)
        self.conv1 = conv(in_ch, width, 1, bias=False)
        self.bn2 = norm(width)
        self.conv2 = conv(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn3 = norm(width)
        self.conv3 = conv(width, out_ch, 1, bias=False)
        self.attn = _gate(attn, out_ch, attn_kwargs or {})
        self.relu = act()
        self.downsample = _projection(in_ch, out_ch, stride, conv, None)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.attn(self.conv3(self.relu(self.bn3(out))))
        return self.drop_path(out) + shortcut


def _projection(in_ch, out_ch, stride, conv, norm) -> nn.Module | None:
    """1x1 projection shortcut (+ norm unless pre-activation), or None when shapes already match."""
    if stride == 1 and in_ch == out_ch:
        return None
    proj = conv(in_ch, out_ch, 1, stride, bias=False)
    return proj if norm is None else nn.Sequential(proj, norm(out_ch))


class ResNet(nn.Module):
    """Residual network: (N, 3, H, W) float → (N, num_classes) logits.

    Args:
        block: one of the four block classes above.
        layers: blocks per stage (4 stages, widths 64, 128, 256, 512 × expansion).
        num_classes: classifier width.
        groups, width_per_group: ResNeXt cardinality and per-group width (1, 64 for ResNet).
        attn: name in ``ATTENTION`` ("se", "sk", "cbam", "bam", "gc", "sge", "srm") or None.
        attn_kwargs: extra arguments for every attention module.
        ws: use weight-standardized convs everywhere (PytorchInsight's WS-ResNets).
        norm: "bn" or "gn".
        act: "relu" or "relu6" (seed 003's ReLU6 ablation: every activation of the network).
        zero_init_residual: start each residual branch at zero (last BN gamma, or last conv in
            pre-activation blocks), so every block starts as the identity (Goyal et al.).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic-depth rate of the last block, linearly increasing from 0.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        attn: str | None = None,
        attn_kwargs: dict | None = None,
        ws: bool = False,
        norm: str = "bn",
        act: str = "relu",
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        preact = block in (PreActBasicBlock, PreActBottleneck)
        if attention_placement(attn) == "conv" and preact:
            raise ValueError(f"attention {attn!r} replaces a post-activation conv; not with preact")
        conv = WSConv2d if ws else nn.Conv2d
        make_norm = norm_layer(norm)
        make_act = activation_layer(act)
        # Built in this order (stem, stages, head): the modules' default inits draw from the
        # global RNG, so the same seed gives the same parameters as one long constructor did.
        self._build_stem(conv, make_norm, make_act)
        block_args = {
            "groups": groups,
            "base_width": width_per_group,
            "conv": conv,
            "norm": make_norm,
            "attn": attn,
            "attn_kwargs": attn_kwargs or {},
            "act": make_act,
        }
        width = self._build_stages(block, layers, block_args, drop_path_rate)
        self._build_head(width, num_classes, preact, make_norm, make_act, drop_rate)
        self._init_weights(zero_init_residual)

    def _build_stem(self, conv, make_norm, make_act) -> None:
        """7x7 stride-2 conv, norm, activation, 3x3 stride-2 max pool: H/4 with 64 channels."""
        self.conv1 = conv(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(64)
        self.relu = make_act()
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def _build_stages(self, block, layers, block_args: dict, drop_path_rate: float) -> int:
        """``layer1``..``layer4`` (widths 64..512 × expansion, stride 2 from stage 2 on), the
        drop-path rate rising linearly over all blocks to ``drop_path_rate``, BAM after stages
        1-3. Returns the width of the last stage."""
        attn, attn_kwargs = block_args["attn"], block_args["attn_kwargs"]
        total, index, in_ch = sum(layers), 0, 64
        for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                rate = drop_path_rate * index / max(total - 1, 1)
                blocks.append(block(in_ch, planes, stride, drop_path=rate, **block_args))
                in_ch = planes * block.expansion
                index += 1
            layer = nn.Sequential(*blocks)
            if attention_placement(attn) == "stage" and stage < 3:  # BAM sits after stages 1-3
                layer.add_module("attn", ATTENTION.create(attn, in_ch, **attn_kwargs))
            self.add_module(f"layer{stage + 1}", layer)
        return in_ch

    def _build_head(self, width, num_classes, preact, make_norm, make_act, drop_rate) -> None:
        """The final norm-activation of pre-activation nets, global average pool, dropout, fc."""
        self.bn_last = make_norm(width) if preact else nn.Identity()
        self.act_last = make_act() if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate) if drop_rate else nn.Identity()
        self.fc = nn.Linear(width, num_classes)
        self.num_features = width

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # attention modules with their own reference init
            if hasattr(m, "init_weights"):
                m.init_weights()
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, C, H/32, W/32) last feature map (after the final BN-ReLU for v2)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.act_last(self.bn_last(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))


def resnet(depth: int, num_classes: int = 1000, *, preact: bool = False, **kwargs) -> ResNet:
    """ResNet-``depth`` (18, 34, 50, 101, 152) with the variant given by keyword arguments.

    ``preact`` selects pre-activation (v2) blocks; every other keyword goes to ``ResNet``
    (groups, width_per_group, attn, attn_kwargs, ws, norm, act, zero_init_residual, drop_rate,
    drop_path_rate).
    """
    try:
        kind, layers = LAYERS[depth]
    except KeyError:
        raise ValueError(f"unknown ResNet depth {depth}; valid: {sorted(LAYERS)}") from None
    block = {
        ("basic", False): BasicBlock,
        ("bottleneck", False): Bottleneck,
        ("basic", True): PreActBasicBlock,
        ("bottleneck", True): PreActBottleneck,
    }[kind, preact]
    return ResNet(block, layers, num_classes, **kwargs)


VARIANTS: dict[str, dict] = {
    **{f"resnet{d}": {"depth": d} for d in (18, 34, 50, 101, 152)},
    "resnet50v2": {"depth": 50, "preact": True},
    "resnet101v2": {"depth": 101, "preact": True},
    "resnext50_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4},
    "resnext101_32x8d": {"depth": 101, "groups": 32, "width_per_group": 8},
    **{
        f"{attn}_resnet{d}": {"depth": d, "attn": attn}
        for attn in ("se", "sk", "cbam", "bam", "gc", "sge", "srm")
        for d in (50, 101)
    },
    "ws_resnet50": {"depth": 50, "ws": True},
    "ws_resnet101": {"depth": 101, "ws": True},
    # Seed 002's e-shifted L2 table: WS-ResNeXt50/101 are the 32x4d models (PytorchInsight's
    # resnext defaults: cardinality 32, base width 4).
    "ws_resnext50_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4, "ws": True},
    "ws_resnext101_32x4d": {"depth": 101, "groups": 32, "width_per_group": 4, "ws": True},
    # Seed 003's ReLU6 ablation: its ResNet takes activation="relu6" for every activation.
    "resnet50_relu6": {"depth": 50, "act": "relu6"},
}

for _name, _cfg in VARIANTS.items():
    register_model(_name)(partial(resnet, **_cfg))
