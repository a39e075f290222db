"""Small residual models for the mode, rate, compile and DDP tests (random weights, CPU-sized)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """A CIFAR ResNet basic block, written plainly: ``relu(bn(conv(relu(bn(conv(x))))) + x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ConvNet(nn.Module):
    """Stem, ``blocks`` ConvBlocks, pooled linear head. Input ``[B, 3, H, W]``."""

    def __init__(self, blocks: int = 3, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class MLPBlock(nn.Module):
    """``x + fc2(relu(fc1(x)))``: rows are independent, so expected outputs can be computed by hand."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class MLPNet(nn.Module):
    """``blocks`` MLPBlocks on ``[B, width]`` inputs."""

    def __init__(self, blocks: int = 1, width: int = 6) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MLPBlock(width) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def tiny_vit(depth: int = 2) -> nn.Module:
    """timm's ViT with 32x32 inputs, 8x8 patches and ``depth`` blocks (two residual sites each)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, num_classes=10)


class Residual(nn.Module):
    """The smallest residual block: ``x + Linear(x)`` on 8 features."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x)
