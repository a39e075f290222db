"""torchvision classifiers: every residual branch gets stochastic depth and the verifier passes."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from sdsurgery import StochasticDepth, apply_stochastic_depth, find_residual_sites, verify


def _verified(name, expected_sites):
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None)
    retrofitted = apply_stochastic_depth(original, 0.2)
    report = verify(original, retrofitted)
    assert report.ok, report.summary()
    assert report.eval_max_abs_diff == 0.0
    assert len(report.sites) == expected_sites
    return original, retrofitted


@pytest.mark.parametrize(
    "name, sites",
    [
        ("resnet18", 8),
        ("resnet50", 16),  # the four projection shortcuts count
        ("convnext_tiny", 18),
        ("swin_t", 24),
        ("efficientnet_b0", 9),
        ("mobilenet_v2", 10),
        ("vit_b_16", 24),
    ],
)
def test_verifier_passes(name, sites):
    _verified(name, sites)


def test_resnet50_projection_shortcuts_are_sites_with_the_downsample_as_skip():
    sites = find_residual_sites(torchvision.models.resnet50(), 0.2)
    projections = [s for s in sites if s.shortcut == "projection"]
    assert [s.block_path for s in projections] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(s.skip.endswith("downsample_1") for s in projections)


def test_convnext_existing_stochastic_depth_is_re_rated_like_torchvision():
    p = 0.3
    native = torchvision.models.convnext_tiny(stochastic_depth_prob=p)
    expected = {n: m.p for n, m in native.named_modules() if isinstance(m, TorchvisionStochasticDepth)}
    retrofitted = apply_stochastic_depth(torchvision.models.convnext_tiny(), p)
    actual = {n: m.p for n, m in retrofitted.named_modules() if isinstance(m, StochasticDepth)}
    assert actual.keys() == expected.keys()
    assert actual == pytest.approx(expected, abs=1e-12)
    assert not any(isinstance(m, TorchvisionStochasticDepth) for m in retrofitted.modules())


def test_classifier_can_be_replaced_after_surgery():
    retrofitted = apply_stochastic_depth(torchvision.models.resnet18(), 0.1)
    retrofitted.fc = nn.Linear(512, 10)
    assert retrofitted(torch.randn(2, 3, 64, 64)).shape == (2, 10)
