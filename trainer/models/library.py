"""Build models whose faithful implementation lives in timm or torchvision (random init only)."""

from __future__ import annotations

from torch import nn


def timm_model(arch: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """timm model ``arch`` with random weights: (N, 3, H, W) → (N, num_classes); never downloads."""
    try:
        import timm
    except ImportError as e:  # optional at import time, required to build these families
        raise ImportError(f"model {arch!r} needs timm: pip install 'timm>=0.9'") from e
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def torchvision_model(arch: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """torchvision model ``arch`` with random weights: (N, 3, H, W) → (N, num_classes)."""
    try:
        from torchvision import models
    except ImportError as e:
        raise ImportError(f"model {arch!r} needs torchvision: pip install torchvision") from e
    return getattr(models, arch)(weights=None, num_classes=num_classes, **kwargs)
