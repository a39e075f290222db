"""The verifier catches every way a retrofit can be wrong: changed outputs, SD on the skip, SD after the add,
and SD where a wrong residual rule put it."""

import random

import numpy as np
import pytest
import timm
import torch
import torchvision

from sdsurgery import (
    apply_stochastic_depth,
    default_example_inputs,
    residuals,
    strip_stochastic_depth,
    verification,
    verify,
)
from tiny_residual_models import MLPNet


class NumpyMaskedMLP(MLPNet):
    """Masks its input with NumPy's random numbers in training, in its own forward (as Hugging Face's
    wav2vec2 draws its SpecAugment masks); the retrofitted model keeps that forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x * torch.from_numpy(np.random.rand(*x.shape) > 0.5).to(x.dtype)
        return super().forward(x)


@pytest.fixture
def models():
    torch.manual_seed(0)
    original = torchvision.models.resnet18()
    return original, apply_stochastic_depth(original, 0.2)


def _move_stochastic_depth(block, onto):
    """Rewire the block's stochastic-depth call onto the skip operand or after the addition."""
    graph = block.graph
    sd = next(n for n in graph.nodes if n.op == "call_module" and n.target == "stochastic_depth")
    add = next(iter(sd.users))
    branch, skip = sd.args[0], next(a for a in add.args if a is not sd)
    add.replace_input_with(sd, branch)
    if onto == "skip":
        sd.args = (skip,)
        add.replace_input_with(skip, sd)
    else:
        sd.args = (add,)
        add.append(sd)  # keep topological order: the call now runs right after the addition
        for user in list(add.users):
            if user is not sd:
                user.replace_input_with(add, sd)
    block.recompile()


def test_correct_retrofit_passes(models):
    report = verify(*models)
    assert report.ok and report.eval_ok and report.train_ok and report.sites_ok
    assert (report.eval_max_abs_diff, report.train_max_abs_diff) == (0.0, 0.0)
    assert all(check.on_branch for check in report.sites)


# a BasicBlock's branch is conv1, bn1, conv2, bn2; an identity skip has no layer, a projection two
RESNET18_LAYERS = {
    "layer1.0": (4, 0),
    "layer1.1": (4, 0),
    "layer2.0": (4, 2),
    "layer2.1": (4, 0),
    "layer3.0": (4, 2),
    "layer3.1": (4, 0),
    "layer4.0": (4, 2),
    "layer4.1": (4, 0),
}


def _layers_by_block(report):
    return {c.module.removesuffix(".stochastic_depth"): (c.branch_layers, c.skip_layers) for c in report.sites}


def test_each_site_is_shown_on_its_branch_by_the_layers_that_reach_it(models):
    assert _layers_by_block(verify(*models)) == RESNET18_LAYERS


def test_a_zero_initialised_branch_is_still_reached_by_its_layers():
    """timm zero-initialises each branch's last norm: the branch is then a constant of its first layers, yet it
    is computed from them, and autograd's graph records that."""
    torch.manual_seed(0)
    original = timm.create_model("resnet18", zero_init_last=True)
    assert all(not block.bn2.weight.any() for stage in (original.layer1, original.layer4) for block in stage)
    retrofitted = apply_stochastic_depth(original, 0.2, verify=False)
    report = verify(original, retrofitted, torch.randn(2, 3, 64, 64))
    assert report.ok and _layers_by_block(report) == RESNET18_LAYERS


def test_the_perturbation_fallback_finds_the_same_layers(models, monkeypatch):
    """A block whose layers autograd cannot show (its run fails with gradients recorded, or a value is not a
    float) is perturbed one layer at a time instead, with the same result."""
    monkeypatch.setattr(verification, "_reached_by_each_layer", lambda *args: None)
    report = verify(*models, torch.randn(2, 3, 64, 64))  # a small input: one run per layer
    assert report.ok and _layers_by_block(report) == RESNET18_LAYERS


def test_a_wrong_rule_is_caught_not_only_a_wrong_rewrite(monkeypatch):
    """A rule that takes the heavier path for the skip puts stochastic depth on the projection shortcut. The
    rewrite follows the rule faithfully: eval and train outputs stay equal and a drop returns the other
    operand; only a view of the branch that does not reuse the rule catches it. The wrong rule stays in
    force while verifying, as it would if it were the package's own."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18()
    layer_count = residuals._layer_count
    monkeypatch.setattr(residuals, "_layer_count", lambda nodes, root: -layer_count(nodes, root))
    retrofitted = apply_stochastic_depth(original, 0.2, verify=False)
    sd = next(n for n in retrofitted.layer2[0].graph.nodes if n.target == "stochastic_depth")
    assert sd.args[0].target == "downsample.1"  # the rule's skip/branch swap, rewritten as the rule said

    report = verify(original, retrofitted)
    failed = [(c.module, c.on_branch, c.branch_layers, c.skip_layers) for c in report.sites if not c.ok]
    assert failed == [
        ("layer2.0.stochastic_depth", False, 2, 4),
        ("layer3.0.stochastic_depth", False, 2, 4),
        ("layer4.0.stochastic_depth", False, 2, 4),
    ]
    assert report.eval_ok and report.train_ok and all(c.drops_to_skip and c.skip_unchanged for c in report.sites)
    assert not report.ok


def test_changed_weights_fail_the_eval_check(models):
    original, retrofitted = models
    with torch.no_grad():
        retrofitted.fc.bias.add_(1.0)
    report = verify(original, retrofitted)
    assert not report.eval_ok and not report.ok
    assert report.eval_max_abs_diff == pytest.approx(1.0)


def test_stochastic_depth_on_the_skip_is_caught(models):
    original, retrofitted = models
    _move_stochastic_depth(retrofitted.layer1[1], onto="skip")
    report = verify(original, retrofitted)
    failed = [c for c in report.sites if not c.ok]
    assert [(c.module, c.on_branch) for c in failed] == [("layer1.1.stochastic_depth", False)]
    assert report.eval_ok and not report.ok


def test_stochastic_depth_after_the_addition_is_caught(models):
    original, retrofitted = models
    _move_stochastic_depth(retrofitted.layer2[0], onto="after")
    report = verify(original, retrofitted)
    assert [c.module for c in report.sites if not c.ok] == ["layer2.0.stochastic_depth"]
    assert not report.ok


def test_summary_names_the_failing_site(models):
    original, retrofitted = models
    _move_stochastic_depth(retrofitted.layer1[1], onto="skip")
    assert "failed: layer1.1.stochastic_depth" in verify(original, retrofitted).summary()


def test_a_model_without_stochastic_depth_fails_and_the_summary_says_why(models):
    original, retrofitted = models
    stripped = strip_stochastic_depth(retrofitted)
    report = verify(stripped, stripped)
    assert (report.eval_ok, report.train_ok, report.sites, report.ok) == (True, True, [], False)
    assert report.summary().endswith(
        "0/0 sites drop to their skip (the retrofitted model holds no stochastic depth on a residual branch: it is "
        "an original or a stripped model; verify the model apply_stochastic_depth returned)"
    )
    assert "holds no stochastic depth" not in verify(original, retrofitted).summary()  # control


def test_models_are_left_unchanged(models):
    original, retrofitted = models
    before = {k: v.clone() for k, v in retrofitted.state_dict().items()}
    retrofitted.train()
    verify(original, retrofitted)
    assert retrofitted.training
    assert all(torch.equal(v, before[k]) for k, v in retrofitted.state_dict().items())


def test_a_model_drawing_numpy_random_numbers_in_training_verifies():
    torch.manual_seed(0)
    original = NumpyMaskedMLP(blocks=3)
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=torch.randn(4, 6), verify=False)
    report = verify(original, retrofitted, torch.randn(4, 6))
    assert report.ok and report.train_max_abs_diff == 0.0


def test_verification_leaves_the_callers_random_generators_as_they_were(models):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    verify(*models)
    assert (random.random(), np.random.rand(), torch.rand(())) == expected


def test_default_input_for_torchvision_is_224():
    assert default_example_inputs(torchvision.models.resnet18())[0].shape == (2, 3, 224, 224)


def test_default_input_for_timm_follows_its_pretrained_cfg():
    model = timm.create_model("resnet18", pretrained_cfg_overlay={"input_size": (3, 160, 160)})
    assert default_example_inputs(model)[0].shape == (2, 3, 160, 160)


def test_unknown_input_size_asks_for_example_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="verify needs example_inputs"):
        verify(model, model)
