"""Model size and cost: parameter counts and multiply-accumulates (the seeds' "GFLOPs")."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``model`` (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def gflops(model: nn.Module, image_size: int = 224) -> float:
    """Giga multiply-accumulates of one forward pass on a 1x3xSxS image (FlopCounterMode / 2).

    The seed tables call MACs "FLOPs"; ResNet-50 at 224 gives about 4.1. Only matmuls and convs
    are counted (norms, activations and pooling are not). Works on meta-device models.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def model_table(names: list[str] | None = None) -> list[dict]:
    """One row per registered model: {"name", "params", "gflops", "image_size"}.

    Models are built on the meta device (no memory, no compute) with 1000 classes; ``params``
    is the exact element count, ``gflops`` the GMACs at the model's native ``image_size``.
    """
    from trainer.models import create_model, list_models, model_image_size

    rows = []
    for name in list_models() if names is None else names:
        with torch.device("meta"):
            model = create_model(name)
        size = model_image_size(name)
        rows.append(
            {
                "name": name,
                "params": count_params(model),
                "gflops": round(gflops(model, size), 3),
                "image_size": size,
            }
        )
    return rows
