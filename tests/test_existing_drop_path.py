"""Stochastic depth a model already has, recognised by what it is (a module or function with a drop rate and a
training flag that keeps or drops whole samples), not by its class: re-rated, never stacked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdsurgery import StochasticDepth, apply_stochastic_depth, find_residual_sites, verify
from sdsurgery.ops import is_stochastic_depth_op

IMAGES = torch.randn(2, 4, 6, 6)


def drop_connect(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """efficientnet_pytorch's drop connect, as segmentation_models_pytorch ships it."""
    if not training:
        return inputs
    keep_prob = 1 - p
    random_tensor = keep_prob
    random_tensor += torch.rand([inputs.shape[0], 1, 1, 1], dtype=inputs.dtype, device=inputs.device)
    return inputs / keep_prob * torch.floor(random_tensor)


class ConnectBlock(nn.Module):
    """An MBConv-like block that drops its branch with the function above, at a rate its caller passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        x = self.bn(self.conv(inputs))
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=self.training)
        return x + inputs


class ConnectNet(nn.Module):
    def __init__(self, blocks: int = 3, rate: float = 0.3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ConnectBlock() for _ in range(blocks)])
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, self.rate * (i + 1) / len(self.blocks))
        return x


class HubDropPath(nn.Module):
    """A drop path of its own class (as Hugging Face models define ``*DropPath``)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PathBlock(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.conv(x))


def _stochastic_depth_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, StochasticDepth)]


def test_recognised_by_what_they_do():
    assert is_stochastic_depth_op(drop_connect) and is_stochastic_depth_op(HubDropPath(0.1))
    assert not is_stochastic_depth_op(nn.functional.dropout)  # drops single values, not samples
    assert not is_stochastic_depth_op(nn.Dropout(0.1)) and not is_stochastic_depth_op(nn.Identity())


def test_a_drop_connect_function_on_the_branch_is_re_rated_not_stacked():
    original = ConnectNet()
    sites = find_residual_sites(original, 0.2, example_inputs=IMAGES)
    assert [(s.block_path, s.existing) for s in sites] == [(f"blocks.{i}", "drop_connect") for i in range(3)]
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=IMAGES)
    for i, block in enumerate(retrofitted.blocks):
        assert [n.target for n in block.train_graph.nodes if n.op == "call_function" and n.target is drop_connect] == []
        assert block.stochastic_depth.p == pytest.approx(0.1 * i)  # the schedule's rate, not the caller's
    assert _stochastic_depth_modules(retrofitted) == [f"blocks.{i}.stochastic_depth" for i in range(3)]
    report = verify(original, retrofitted, IMAGES)  # the original's drop_connect is off at rate 0
    assert report.ok and report.train_max_abs_diff == 0.0, report.summary()


def test_a_drop_path_module_of_another_library_is_replaced_in_place():
    original = nn.Sequential(PathBlock(HubDropPath(0.5)), PathBlock(HubDropPath(0.5)))
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=IMAGES)
    assert _stochastic_depth_modules(retrofitted) == ["0.drop", "1.drop"]
    assert [retrofitted[i].drop.p for i in range(2)] == [0.0, 0.2]
    assert set(retrofitted.state_dict()) == set(original.state_dict())


def test_dropout_on_the_branch_stays_and_gets_stochastic_depth_beside_it():
    original = nn.Sequential(PathBlock(nn.Dropout(0.1)), PathBlock(nn.Dropout(0.1)))
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=IMAGES)
    assert _stochastic_depth_modules(retrofitted) == ["0.stochastic_depth", "1.stochastic_depth"]
    assert isinstance(retrofitted[0].drop, nn.Dropout)


def test_segmentation_models_pytorch_efficientnet_drop_connect_is_re_rated():
    smp = pytest.importorskip("segmentation_models_pytorch")
    encoder = smp.encoders.get_encoder("efficientnet-b0", weights=None)
    images = torch.randn(2, 3, 64, 64)
    sites = find_residual_sites(encoder, 0.2, example_inputs=images)
    assert len(sites) == 9 and {s.existing for s in sites if s.depth > 0} == {"drop_connect"}
    retrofitted = apply_stochastic_depth(encoder, 0.2, example_inputs=images)
    assert len(_stochastic_depth_modules(retrofitted)) == 9
    report = verify(encoder, retrofitted, images)
    assert report.ok, report.summary()


class ReshapedDropPathBlock(nn.Module):
    """NextViT's attention residual: drop path on the token layout, then a reshape with sizes read from the
    input's shape before the addition."""

    def __init__(self, c=4, rate=0.1):
        super().__init__()
        self.attn = nn.Linear(c, c)
        self.drop_path = HubDropPath(rate)

    def forward(self, x):
        B, C, H, W = x.shape
        out = self.drop_path(self.attn(x.reshape(B, C, -1).transpose(-1, -2)))
        return x + out.transpose(-1, -2).reshape(B, C, H, W)


def test_existing_drop_path_behind_a_reshape_by_read_sizes_is_re_rated_not_stacked():
    model = nn.Sequential(ReshapedDropPathBlock(), ReshapedDropPathBlock())
    x = torch.randn(2, 4, 3, 3)
    sites = find_residual_sites(model, 0.2, example_inputs=x)
    assert [(s.block_path, s.existing) for s in sites] == [("0", "0.drop_path"), ("1", "1.drop_path")]
    retrofitted = apply_stochastic_depth(model, 0.2, example_inputs=x)
    assert _stochastic_depth_modules(retrofitted) == ["0.drop_path", "1.drop_path"]  # no second one beside it
    assert [retrofitted[i].drop_path.p for i in range(2)] == [0.0, 0.2]
