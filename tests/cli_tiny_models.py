"""Tiny models for the command-line tests, saved whole with ``torch.save(model)``.

They live in an importable module (not in a test file) because unpickling a model imports its class: the
``sdsurgery`` subprocess gets this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import os

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class TinyResidual(nn.Module):
    """Two identity residual blocks: two sites."""

    def __init__(self, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(Block(channels), Block(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class DepthwiseResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class WithLightDownsample(TinyResidual):
    """TinyResidual's two repeated blocks after a light residual ``x + dwconv(x)`` outside them: left alone."""

    def __init__(self, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__(channels, num_classes)
        self.down = DepthwiseResidual(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.down(self.stem(x))).mean(dim=(2, 3)))


class Noisy(TinyResidual):
    """Its eval outputs change from call to call (the operating system's random bytes, which no seed reaches:
    verification seeds torch's, Python's and NumPy's generators alike for both models), so no retrofit of it
    can verify."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + int.from_bytes(os.urandom(4), "little") / 2**32


class BranchyBlock(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this block
            x = x * 2
        return super().forward(x)


class Untraceable(TinyResidual):
    """Its own forward and both blocks branch on tensor values: no residual addition traces."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(BranchyBlock(block.conv.in_channels) for block in self.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return super().forward(x)


class HalfTraceable(TinyResidual):
    """Its second block does not trace, so only the first block's site is found."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[1] = BranchyBlock(self.blocks[1].conv.in_channels)
