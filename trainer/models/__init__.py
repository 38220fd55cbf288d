"""The model zoo: ``create_model(name, num_classes)`` → nn.Module mapping (N, 3, H, W) → logits.

Importing this package registers every family. Variants are arguments of one builder per family
(``resnet(depth, attn="se")``); registered names are thin partials of those builders. Families
backed by timm or torchvision import them only when built, and never download weights.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from datasvc.registry import Registry

MODELS = Registry("model")


def register_model(name: str | None = None, *, image_size: int = 224, size_multiple: int = 1):
    """Decorator: register a factory ``(num_classes=1000, **kwargs) → nn.Module`` under ``name``.

    ``image_size`` is the model's native input side, used when profiling FLOPs;
    ``size_multiple`` the number input sides must be a multiple of (1: any size).
    """

    def deco(fn):
        fn.image_size = image_size
        fn.size_multiple = size_multiple
        return MODELS.register(name)(fn)

    return deco


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build registered model ``name`` (randomly initialised); unknown names list the valid ones.

    Args:
        name: a name from ``list_models()``.
        num_classes: width of the classifier; the model maps (N, 3, H, W) → (N, num_classes).
        **kwargs: builder arguments, e.g. ``drop_rate``, ``drop_path_rate``, ``zero_init_residual``
            where the family supports them (see MODELS.md); others raise TypeError.
    """
    return MODELS.create(name, num_classes=num_classes, **kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell-style ``pattern``."""
    names = MODELS.names()
    return names if pattern is None else fnmatch.filter(names, pattern)


def model_image_size(name: str) -> int:
    """Native input side of registered model ``name`` (224 unless registered otherwise)."""
    return getattr(MODELS.get(name), "image_size", 224)


def model_size_multiple(name: str) -> int:
    """What input sides of registered model ``name`` must be a multiple of (1: any)."""
    return getattr(MODELS.get(name), "size_multiple", 1)


# Registering the families needs the names above, hence the imports at the bottom.
from trainer.models import (  # noqa: E402, F401
    densenet,
    efficientnet,
    ghostnet,
    lip,
    mobilenet,
    octresnet,
    regnet,
    resnest,
    resnet,
    shufflenet,
)
from trainer.models.attention import ATTENTION  # noqa: E402
from trainer.models.profile import (  # noqa: E402
    count_params,
    gflops,
    gflops_seed002,
    gflops_seed003,
    model_table,
)

__all__ = [
    "ATTENTION",
    "MODELS",
    "count_params",
    "create_model",
    "gflops",
    "gflops_seed002",
    "gflops_seed003",
    "list_models",
    "model_image_size",
    "model_size_multiple",
    "model_table",
    "register_model",
]
