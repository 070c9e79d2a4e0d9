"""Image classifiers defined in the project: a small CNN and a ResNet-18-style network.

Normalisation is GroupNorm, not BatchNorm. A zeroth-order probe compares
f(x + rho z) with f(x - rho z) on the same batch; in train mode BatchNorm
normalises with the batch's own statistics (so the loss of one example depends
on the others) and updates running buffers on every forward, i.e. each probe
would change the model. In eval mode a freshly initialised BatchNorm uses its
running stats (0 and 1) and does not normalise at all. GroupNorm normalises
each example by itself, has no buffers, and behaves the same in train and eval,
so the loss is a deterministic function of the parameters and the batch.

Both networks expose ``blocks`` (a ModuleList run in order) and ``head``
(global average pool + ``fc``): the chain that trainable selection (``top_k``,
``head``) and feature reuse work on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import TaskError

ARCHITECTURES = ("cnn", "resnet18")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (a divisor of ``channels``): small images, small widths."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class MaxPool2x2(nn.Module):
    """2x2 max-pooling, stride 2, ``ceil_mode`` at odd sizes: the same values as ``nn.MaxPool2d(2, ceil_mode=True)``.

    At even sizes it takes the maximum of the four strided views, which on a CPU is several
    times faster than the pooling kernel for the small feature maps here (measured about 6x on
    a 64 x 16 x 28 x 28 map, one thread) and gives bitwise the same output: max is exact and
    NaN propagates in both. Odd sizes go to the kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            return nn.functional.max_pool2d(x, 2, ceil_mode=True)
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class ConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> ReLU (-> 2x2 max-pool)."""

    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)  # the norm's bias makes a conv bias redundant
        self.norm = group_norm(cout)
        self.pool = MaxPool2x2() if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class BasicBlock(nn.Module):
    """The ResNet basic block: two conv3x3 with a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = group_norm(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class Head(nn.Module):
    """Global average pool, flatten, linear classifier ``fc``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))  # (B, C, H, W) -> (B, C) -> (B, classes)


class ChainClassifier(nn.Module):
    """``head(blocks[-1](... blocks[0](x)))``: the shape every project vision model has."""

    def __init__(self, blocks: list[nn.Module], head: Head) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = pixels
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def small_cnn(in_channels: int, num_classes: int, width: int = 32) -> ChainClassifier:
    """Three conv blocks (width, 2 width, 2 width; pooling after the first two) and a linear head."""
    blocks = [ConvBlock(in_channels, width, pool=True), ConvBlock(width, 2 * width, pool=True),
              ConvBlock(2 * width, 2 * width, pool=False)]
    return ChainClassifier(blocks, Head(2 * width, num_classes))


def resnet18(in_channels: int, num_classes: int, width: int = 64) -> ChainClassifier:
    """ResNet-18 for small images: a 3x3 stem (no max-pool) and 4 stages of 2 basic blocks.

    Stage widths are width x (1, 2, 4, 8), strides (1, 2, 2, 2); width 64 is the standard
    network (11.2 M parameters at 10 classes). ``blocks`` = [stem, 8 basic blocks].
    """
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), group_norm(width), nn.ReLU())
    blocks: list[nn.Module] = [stem]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    return ChainClassifier(blocks, Head(cin, num_classes))


def build_vision_model(arch: str, in_channels: int, num_classes: int, width: int) -> ChainClassifier:
    """One of ``ARCHITECTURES`` (uses the global RNG: call inside a seeded fork_rng).

    Raises:
        ValueError: an unknown architecture.
    """
    if arch == "cnn":
        return small_cnn(in_channels, num_classes, width)
    if arch == "resnet18":
        return resnet18(in_channels, num_classes, width)
    raise TaskError(f"unknown vision model {arch!r}; use one of {', '.join(ARCHITECTURES)}")
