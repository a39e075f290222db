"""The seed notebook's TinyResNet written as plain residual blocks, with stochastic depth retrofitted.

The notebook hand-wrote stochastic depth into each block. Here the blocks are ordinary ResNet basic
blocks (conv-bn-relu-conv-bn plus a shortcut) and sdsurgery adds stochastic depth afterwards, with the
notebook's linear rule p_i = p_max * i / (L - 1) at p_max = 0.3.

Run: python examples/seed_tinyresnet.py
"""

import torch
from torch import nn

import sdsurgery


class BasicBlock(nn.Module):
    """The seed notebook's residual block, written plainly: sdsurgery adds stochastic depth afterwards."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """The seed's TinyResNet: a stem and three stages of two blocks (``width``, 2x, 4x channels; the seed
    uses ``width=32`` on 3-channel images; train_digits.py 16 on 1-channel 8x8 digits, to keep its run short)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = [(width, width, 1), (width, 2 * width, 2), (2 * width, 4 * width, 2)]
        self.layers = nn.Sequential(
            *(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)) for cin, cout, stride in stages)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def main() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(8, 3, 32, 32)

    for site in sdsurgery.find_residual_sites(model, p_max=0.3):
        print(
            f"depth {site.depth}  {site.block_path:<10} {site.add:<6} branch {site.branch:<14} "
            f"skip {site.skip:<22} {site.shortcut:<10} p = {site.drop_rate:.2f}"
        )

    retrofitted = sdsurgery.apply_stochastic_depth(model, p_max=0.3, example_inputs=x)

    # Verify before any train-mode forward: those update batch-norm statistics, and the original's would not.
    report = sdsurgery.verify(model, retrofitted, x)
    print(report.summary())
    assert report.ok

    retrofitted.train()
    with torch.no_grad():
        first, second = retrofitted(x), retrofitted(x)
    print("train mode: two forwards differ:", not torch.equal(first, second))

    retrofitted.eval()
    with torch.no_grad():
        first, second = retrofitted(x), retrofitted(x)
    print("eval mode: two forwards are equal:", torch.equal(first, second))


if __name__ == "__main__":
    main()
