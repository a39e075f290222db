"""Activation (gradient) checkpointing: torch.utils.checkpoint around retrofitted blocks recomputes each
block's forward in backward with the same drop decisions, so gradients equal those without checkpointing
under the same seed, in every mode, with both checkpoint implementations and through timm's
set_grad_checkpointing."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdsurgery import apply_stochastic_depth, seed_block_drops
from tiny_residual_models import ConvNet, tiny_vit

MODES = ("row", "batch", "subset")
IMAGES = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
VIT_IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def _grads(model, x, steps=3):
    """Gradients of ``steps`` successive steps under one seed (each step draws new decisions)."""
    torch.manual_seed(0)
    seed_block_drops(model, 0)
    grads = []
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), LABELS).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def _retrofit(model, mode, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback warning is not what these tests are about
        return apply_stochastic_depth(model, 0.5, mode=mode, schedule="uniform", example_inputs=x).train()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_blocks_give_the_same_gradients(mode, use_reentrant):
    torch.manual_seed(0)
    plain = _retrofit(ConvNet(blocks=4, channels=4), mode, IMAGES)
    wrapped = copy.deepcopy(plain)
    for i, block in enumerate(wrapped.blocks):
        wrapped.blocks[i] = Checkpointed(block, use_reentrant)
    expected, got = _grads(plain, IMAGES), _grads(wrapped, IMAGES)
    for step_expected, step_got in zip(expected, got):
        for e, g in zip(step_expected, step_got):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("mode", MODES)
def test_timm_grad_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    plain = _retrofit(tiny_vit(depth=3), mode, VIT_IMAGES)
    wrapped = copy.deepcopy(plain)
    wrapped.set_grad_checkpointing(True)
    expected, got = _grads(plain, VIT_IMAGES, steps=2), _grads(wrapped, VIT_IMAGES, steps=2)
    for step_expected, step_got in zip(expected, got):
        for e, g in zip(step_expected, step_got):
            torch.testing.assert_close(g, e)


def test_positive_control_different_seeds_give_different_gradients():
    torch.manual_seed(0)
    model = _retrofit(ConvNet(blocks=4, channels=4), "row", IMAGES)
    first = _grads(model, IMAGES, steps=1)[0]
    torch.manual_seed(1)
    model.zero_grad()
    F.cross_entropy(model(IMAGES), LABELS).backward()
    assert any(not torch.allclose(p.grad, g) for p, g in zip(model.parameters(), first))
