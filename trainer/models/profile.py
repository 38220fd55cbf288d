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


# Seed 002 (PytorchInsight) prints its GFLOPs with a module-hook counter: per call of a module,
# conv = output positions x kernel x in/groups x out (+ out per position for a bias), linear =
# in x out, batch norm = input elements (x2 when affine), activations = elements, pooling = input
# elements, upsampling = output elements. Functional ops (x.mean, F.relu, sigmoid, additions)
# are not counted. ResNet-50 at 224: 4.1217 (seed 002: 4.122).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


def _seed002_cost(module: nn.Module, inputs: tuple, output) -> int:
    """Seed 002's count for one call of ``module`` (0 for modules it does not count)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        positions = output.numel() // module.out_channels
        bias = module.out_channels * positions if module.bias is not None else 0
        return k * output.numel() + bias
    if isinstance(module, nn.Linear):
        return inputs[0].numel() // module.in_features * module.in_features * module.out_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return inputs[0].numel() * (2 if module.affine else 1)
    if isinstance(module, _ACTIVATIONS):
        return output.numel()
    if isinstance(module, _POOLS):
        return inputs[0].numel()
    if isinstance(module, nn.Upsample):
        return output.numel()
    return 0


def _seed003_cost(module: nn.Module, inputs: tuple, output) -> int:
    """Seed 003's (torch-toolbox ``summary``) multiply-plus-add count for one module call; its
    table prints half of it. Conv: (2·in·k·k − 1) per output position and out/groups filter,
    plus bias; linear: (2·in − 1)·out + bias; BatchNorm2d/GroupNorm: input elements (x2
    affine). Nothing else is counted."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        positions = output.shape[-2] * output.shape[-1]
        filters = module.out_channels // module.groups
        bias = positions * filters if module.bias is not None else 0
        return (2 * module.in_channels * kh * kw - 1) * positions * filters + bias
    if isinstance(module, nn.Linear):
        bias = module.out_features if module.bias is not None else 0
        return (2 * module.in_features - 1) * module.out_features + bias
    if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        return inputs[0].numel() * (2 if module.affine else 1)
    return 0


def gflops_seed002(model: nn.Module, image_size: int = 224) -> float:
    """Seed 002's GFLOPs of one 1x3xSxS forward: conv and linear MACs plus batch norm,
    activations and pooling, counted per module call as its counter does (works on meta)."""
    return _hooked_count(model, image_size, _seed002_cost) / 1e9


def gflops_seed003(model: nn.Module, image_size: int = 224) -> float:
    """Seed 003's GFLOPs (torch-toolbox ``summary``: half its multiply-plus-add count of convs,
    linears and norms) of one 1x3xSxS forward (works on meta)."""
    return _hooked_count(model, image_size, _seed003_cost) / 2 / 1e9


def _hooked_count(model: nn.Module, image_size: int, cost) -> int:
    """Sum of ``cost(module, inputs, output)`` over every module call of one forward."""
    total = [0]

    def hook(module, inputs, output):
        total[0] += cost(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]


def model_table(names: list[str] | None = None) -> list[dict]:
    """One row per registered model: {"name", "params", "gflops", "gflops_seed002",
    "gflops_seed003", "image_size"}.

    Models are built on the meta device (no memory, no compute) with 1000 classes; ``params``
    is the exact element count, ``gflops`` the GMACs at the model's native ``image_size``,
    ``gflops_seed002`` and ``gflops_seed003`` the seeds' own counts at 224.
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
                "gflops_seed002": round(gflops_seed002(model, 224), 4),
                "gflops_seed003": round(gflops_seed003(model, 224), 4),
                "image_size": size,
            }
        )
    return rows
