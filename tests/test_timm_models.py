"""timm models: placement and rates equal timm's native drop path; the model stays a timm model."""

import copy
from collections import defaultdict

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

from sdsurgery import RetrofittedBlock, StochasticDepth, apply_stochastic_depth

P_MAX = 0.2


def _drop_path_calls(model, kind):
    """(block path -> sorted non-zero rates) of the drop-path calls one train forward makes."""
    calls = defaultdict(list)
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls[names[m].rpartition(".")[0]].append(round(m.drop_prob, 6)))
        for m in model.modules()
        if isinstance(m, kind)
    ]
    return calls, hooks


def _native_and_retrofitted(name, schedule="linear"):
    torch.manual_seed(0)
    plain = timm.create_model(name, drop_path_rate=0.0)
    native = timm.create_model(name, drop_path_rate=P_MAX)
    native.load_state_dict(plain.state_dict())
    return plain, native, apply_stochastic_depth(plain, P_MAX, schedule=schedule)


@pytest.mark.parametrize(
    "name, schedule",
    [
        ("vit_tiny_patch16_224", "linear"),
        ("deit_tiny_patch16_224", "linear"),
        ("resnet26", "linear"),
        ("convnext_atto", "linear"),
        ("swin_tiny_patch4_window7_224", "linear"),
        ("poolformer_s12", "linear"),
        ("pvt_v2_b0", "linear"),
        ("mixer_s16_224", "uniform"),  # timm's Mixer gives every block the same rate
    ],
)
def test_matches_timm_native_drop_path(name, schedule):
    _, native, retrofitted = _native_and_retrofitted(name, schedule)
    x = torch.randn(2, *native.pretrained_cfg["input_size"])
    native_calls, native_hooks = _drop_path_calls(native, DropPath)
    our_calls, our_hooks = _drop_path_calls(retrofitted, StochasticDepth)
    torch.manual_seed(1)
    expected = native.train()(x)
    torch.manual_seed(1)
    actual = retrofitted.train()(x)
    for hook in native_hooks + our_hooks:
        hook.remove()

    non_zero = {block: sorted(r for r in rates if r > 0) for block, rates in our_calls.items()}
    assert {b: r for b, r in non_zero.items() if r} == {b: sorted(r) for b, r in native_calls.items()}
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002"])
def test_batchnorm_act_blocks_switch_between_train_and_eval(name):
    torch.manual_seed(0)
    original = timm.create_model(name).eval()
    retrofitted = apply_stochastic_depth(original, P_MAX)
    # BatchNormAct2d reads self.training in Python: those blocks carry a graph for each mode.
    assert any(b.eval_graph is not None for b in retrofitted.modules() if isinstance(b, RetrofittedBlock))
    x = torch.randn(2, *original.pretrained_cfg["input_size"])
    with torch.no_grad():
        expected = original(x)
        retrofitted.train()
        retrofitted.eval()
        assert torch.equal(retrofitted(x), expected)


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002"])
def test_batchnorm_act_blocks_train_like_the_original_at_rate_zero(name):
    torch.manual_seed(0)
    original = timm.create_model(name)
    retrofitted = apply_stochastic_depth(original, 0.0)
    x = torch.randn(2, *original.pretrained_cfg["input_size"])
    with torch.no_grad():
        retrofitted.eval()
        retrofitted.train()
        assert torch.equal(retrofitted(x), original.train()(x))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    original = timm.create_model("vit_tiny_patch16_224")
    return original, apply_stochastic_depth(original, 0.1)


def test_retrofitted_vit_is_still_a_vision_transformer(vit):
    _, retrofitted = vit
    assert isinstance(retrofitted, VisionTransformer)
    assert retrofitted.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"


def test_resolve_data_config_is_unchanged(vit):
    original, retrofitted = vit
    assert resolve_data_config({}, model=retrofitted) == resolve_data_config({}, model=original)


def test_no_weight_decay_is_unchanged(vit):
    original, retrofitted = vit
    assert retrofitted.no_weight_decay() == original.no_weight_decay()


def test_create_optimizer_groups_parameters_the_same_way(vit):
    original, retrofitted = vit

    def groups(model):
        optimizer = create_optimizer_v2(model, "adamw", weight_decay=0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups]

    assert groups(retrofitted) == groups(original)


def test_forward_features_is_stochastic_in_train_and_exact_in_eval(vit):
    original, retrofitted = vit
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        retrofitted.train()
        assert not torch.equal(retrofitted.forward_features(x), retrofitted.forward_features(x))
        retrofitted.eval()
        assert torch.equal(retrofitted.forward_features(x), original.eval().forward_features(x))


def test_forward_head_runs_on_retrofitted_features(vit):
    original, retrofitted = vit
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = retrofitted.eval().forward_features(x)
        assert torch.equal(retrofitted.forward_head(features), original.eval()(x))


def test_grad_checkpointing_runs_the_retrofitted_blocks(vit):
    original, retrofitted = vit
    retrofitted = copy.deepcopy(retrofitted)
    retrofitted.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 224, 224, requires_grad=True)
    retrofitted.train()(x).sum().backward()
    with torch.no_grad():
        assert torch.equal(retrofitted.eval()(x), original.eval()(x))


def test_reset_classifier_after_surgery(vit):
    _, retrofitted = vit
    retrofitted = copy.deepcopy(retrofitted)
    retrofitted.reset_classifier(5)
    assert retrofitted(torch.randn(2, 3, 224, 224)).shape == (2, 5)
