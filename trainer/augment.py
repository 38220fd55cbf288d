"""Per-sample augmentations beyond crop and flip, batched on the trainer's device.

They run on the uint8-valued batch (as float32, before normalization), with every parameter a
pure function of ``(seed, epoch, sample id)`` like the crop, so a sample is augmented the same
way whatever batch, rank or resumed run it lands in:

- ColorJitter (brightness, contrast, saturation; seed 003 uses 0.4 each): torchvision's tensor
  ops, in a random order per sample, each rounding down to whole levels as torchvision's uint8
  path does;
- RandomRotation (seed 003: 15 degrees): torchvision's rotate (nearest, fill 0, same size),
  with its sampling grid, batched with one angle per sample;
- random erasing (seed 003's "Cutout", torch-toolbox's ``Cutout_PIL``): with probability ``p``
  a box of 2-40% of the area, aspect 0.4-2.5 (drawn linearly, as torch-toolbox does), filled
  with one random level in [0, 255) for all channels.

Seed 002's cutout (one zeroed square per batch, in normalized space) is a batch operation and
lives in ``recipe.BatchMixer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datasvc.augment import SampleRandom
from trainer.config import AugmentConfig

# Offsets the seed so these draws are independent of the crop's stream for the same sample.
_STREAM = 0x5EED_A06D


class DeviceAugment:
    """Callable ``(images float N×3×H×W with values 0..255, ids int64 N, epoch) → images``.

    Each enabled augmentation draws its parameters per sample on the host (a few microseconds
    each) and applies them to the whole batch at once on the images' device.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    @property
    def active(self) -> bool:
        c = self.cfg
        return any(c.color_jitter) or c.rotation > 0 or c.random_erasing > 0

    def params(self, ids, epoch: int) -> list[dict]:
        """The drawn parameters of each sample (in a fixed order per sample)."""
        c = self.cfg
        out = []
        for i in ids:
            rng = SampleRandom(self.seed + _STREAM, epoch, int(i))
            p = {}
            if any(c.color_jitter):
                p["order"] = _permutation(rng, 3)
                p["factors"] = [rng.uniform(max(0.0, 1 - j), 1 + j) for j in c.color_jitter]
            if c.rotation > 0:
                p["angle"] = rng.uniform(-c.rotation, c.rotation)
            if c.random_erasing > 0:
                p["erase"] = rng.random() < c.random_erasing
                p["erase_box"] = (rng.random(), rng.random(), rng.random(), rng.random())
                p["erase_fill"] = float(rng.integers(0, 255))
            out.append(p)
        return out

    def __call__(self, images: torch.Tensor, ids, epoch: int) -> torch.Tensor:
        params = self.params(ids.tolist() if torch.is_tensor(ids) else ids, epoch)
        c = self.cfg
        if any(c.color_jitter):
            images = color_jitter(
                images, [p["order"] for p in params], [p["factors"] for p in params]
            )
        if c.rotation > 0:
            images = rotate(images, [p["angle"] for p in params])
        if c.random_erasing > 0:
            images = random_erase(images, params, c.erasing_area, c.erasing_aspect)
        return images


def _permutation(rng: SampleRandom, n: int) -> list[int]:
    """A uniform permutation of range(n) (Fisher-Yates)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.integers(0, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _column(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale on uint8: ITU-R 601 weights, rounded down. (N, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (0.2989 * r + 0.587 * g + 0.114 * b).floor()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor):
    """torchvision's _blend on uint8: ratio·x + rest·other (rest = 1 − ratio, computed in double
    as torchvision does in Python), clamped, rounded down."""
    return (ratio * x + rest * other).clamp_(0, 255).floor_()


def color_jitter(x: torch.Tensor, orders: list[list[int]], factors: list[list[float]]):
    """Brightness (0), contrast (1) and saturation (2) with per-sample factors, applied in each
    sample's order. ``x``: float N×3×H×W holding whole levels 0..255."""
    order = torch.tensor(orders, device=x.device)  # (N, 3)
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        chosen = [f[o[position]] for f, o in zip(factors, orders)]
        ratio = _column(chosen, x)
        rest = _column([1.0 - r for r in chosen], x)
        bright = _blend(x, torch.zeros_like(x[:, :1]), ratio, rest)
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        contrast = _blend(x, mean, ratio, rest)
        saturation = _blend(x, _grayscale(x), ratio, rest)
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, saturation))
    return x


def rotate(x: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """torchvision ``rotate(img, angle)`` (counter-clockwise degrees, nearest, fill 0, same size)
    with one angle per sample, on float N×C×H×W."""
    n, _, h, w = x.shape
    rot = torch.tensor([math.radians(-a) for a in angles], dtype=torch.float64)
    cos, sin = rot.cos(), rot.sin()
    zero = torch.zeros_like(cos)
    # torchvision's inverse affine matrix for a rotation about the centre: [d, -b, 0, -c, a, 0]
    # with a = d = cos, b = -sin, c = sin.
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], dim=1).view(n, 2, 3).float()
    grid = _affine_grid(theta.to(x.device), w, h)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _affine_grid(theta: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """torchvision's _gen_affine_grid, batched: pixel-centre base grid times theta, rescaled."""
    base = torch.empty(1, h, w, 3, dtype=theta.dtype, device=theta.device)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, device=theta.device))
    base[..., 1].copy_(
        torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, device=theta.device).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=theta.device)
    rescaled = theta.transpose(1, 2) / scale  # (N, 3, 2)
    return base.view(1, h * w, 3).expand(theta.shape[0], -1, -1).bmm(rescaled).view(-1, h, w, 2)


def erase_box(draws, h: int, w: int, area=(0.02, 0.4), aspect=(0.4, 2.5)):
    """torch-toolbox's Cutout_PIL.get_params from four uniform draws: (top, left, bh, bw).

    The box is clipped to the image (torch-toolbox's own draw fails when it would not fit).
    """
    u_area, u_aspect, u_left, u_top = draws
    s = (area[0] + (area[1] - area[0]) * u_area) * h * w
    r = aspect[0] + (aspect[1] - aspect[0]) * u_aspect
    bw, bh = min(int(math.sqrt(s / r)), w), min(int(math.sqrt(s * r)), h)
    left = int(u_left * max(w - bw, 1))
    top = int(u_top * max(h - bh, 1))
    return top, left, bh, bw


def random_erase(x: torch.Tensor, params: list[dict], area, aspect) -> torch.Tensor:
    """Fill each drawn box with its sample's constant level (all channels), in place."""
    n, _, h, w = x.shape
    boxes = [erase_box(p["erase_box"], h, w, area, aspect) for p in params]
    keep = [p["erase"] for p in params]
    top = _column([b[0] for b in boxes], x)
    left = _column([b[1] for b in boxes], x)
    bottom = top + _column([b[2] for b in boxes], x)
    right = left + _column([b[3] for b in boxes], x)
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    inside = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)
    inside &= torch.tensor(keep, device=x.device).view(-1, 1, 1, 1)
    fill = _column([p["erase_fill"] for p in params], x).expand_as(x)
    return torch.where(inside, fill, x)
