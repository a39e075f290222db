"""set_drop_rates re-rates a retrofitted model in place by block depth; strip_stochastic_depth takes stochastic
depth out for inference, eval-identical to the original."""

import warnings

import pytest
import timm
import torch
from torch import fx, nn

from sdsurgery import (
    StochasticDepth,
    apply_stochastic_depth,
    seed_block_drops,
    set_drop_rates,
    strip_stochastic_depth,
)
from sdsurgery.ops import is_stochastic_depth_op
from sdsurgery.residuals import is_stochastic_depth
from tiny_residual_models import ConvNet, tiny_vit

IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
VIT_IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _rates_by_depth(model):
    return [(m.depth, m.p) for m in model.modules() if isinstance(m, StochasticDepth)]


@pytest.fixture
def convnet():
    return apply_stochastic_depth(ConvNet(blocks=4), 0.1, example_inputs=IMAGES)


# --- set_drop_rates ---


def test_linear_schedule_rises_to_p_max_by_depth(convnet):
    assert set_drop_rates(convnet, 0.3) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert _rates_by_depth(convnet) == [(i, pytest.approx(0.1 * i)) for i in range(4)]


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("uniform", [0.3] * 4),
        ([0.0, 0.05, 0.1, 0.4], [0.0, 0.05, 0.1, 0.4]),
        (lambda i, n: 0.1 * (n - 1 - i), [0.3, 0.2, 0.1, 0.0]),
    ],
    ids=["uniform", "list", "callable"],
)
def test_other_schedules(convnet, schedule, expected):
    assert set_drop_rates(convnet, 0.3, schedule=schedule) == pytest.approx(expected)
    assert [p for _, p in _rates_by_depth(convnet)] == pytest.approx(expected)


def test_additions_of_one_block_share_its_rate():
    model = apply_stochastic_depth(tiny_vit(depth=3), 0.1, example_inputs=VIT_IMAGES)
    assert set_drop_rates(model, 0.4) == pytest.approx([0.0, 0.2, 0.4])
    assert [p for _, p in _rates_by_depth(model)] == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.4, 0.4])


def test_reaches_through_wrappers(convnet):
    set_drop_rates(nn.Sequential(torch.compile(convnet)), 0.3, schedule="uniform")
    assert {p for _, p in _rates_by_depth(convnet)} == {0.3}


def test_warm_up_recipe_ramps_the_rates_per_epoch(convnet):
    seen = [set_drop_rates(convnet, 0.3 * min(1.0, epoch / 2))[-1] for epoch in range(4)]
    assert seen == pytest.approx([0.0, 0.15, 0.3, 0.3])


def test_zero_rates_make_batch_mode_compute_every_block():
    model = apply_stochastic_depth(ConvNet(blocks=4), 0.9, mode="batch", example_inputs=IMAGES, schedule="uniform")
    set_drop_rates(model, 0.0)
    calls = []
    for block in model.blocks:
        block.conv1.register_forward_hook(lambda *args: calls.append(1))
    seed_block_drops(model, 0)
    model.train()(IMAGES)
    assert len(calls) == 4


def test_model_without_stochastic_depth_raises():
    with pytest.raises(ValueError, match="apply_stochastic_depth first"):
        set_drop_rates(ConvNet(), 0.1)


def test_stochastic_depth_without_a_depth_index_raises():
    model = nn.Sequential(nn.Linear(2, 2), StochasticDepth(0.1))
    with pytest.raises(ValueError, match="no depth index.*1"):
        set_drop_rates(model, 0.1)


@pytest.mark.parametrize("p_max", [-0.1, 1.0])
def test_rate_outside_unit_interval_raises(convnet, p_max):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_drop_rates(convnet, p_max)


# --- strip_stochastic_depth ---


def _stochastic_depth_left(model):
    modules = [n for n, m in model.named_modules() if is_stochastic_depth_op(m)]
    nodes = [
        n.name
        for m in model.modules()
        if isinstance(m, fx.GraphModule)
        for n in m.graph.nodes
        if is_stochastic_depth(n, m)
    ]
    return modules + nodes


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_strip_leaves_no_stochastic_depth_and_is_eval_identical_to_the_original(mode):
    original = tiny_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stripped = strip_stochastic_depth(apply_stochastic_depth(original, 0.3, mode=mode, example_inputs=VIT_IMAGES))
    assert _stochastic_depth_left(stripped) == []
    assert not stripped.training
    with torch.no_grad():
        assert torch.equal(stripped(VIT_IMAGES), original.eval()(VIT_IMAGES))


def test_strip_keeps_state_dict_keys_and_block_class_names(convnet):
    stripped = strip_stochastic_depth(convnet)
    assert list(stripped.state_dict()) == list(ConvNet(blocks=4).state_dict())
    assert type(stripped.blocks[0]).__name__ == "ConvBlock"
    assert isinstance(stripped.blocks[0], fx.GraphModule)


def test_strip_leaves_the_retrofitted_model_unchanged(convnet):
    strip_stochastic_depth(convnet)
    assert len(_rates_by_depth(convnet)) == 4
    assert convnet.training


def test_strip_removes_native_timm_drop_path():
    torch.manual_seed(0)
    native = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_path_rate=0.2)
    stripped = strip_stochastic_depth(native)
    assert _stochastic_depth_left(stripped) == []
    with torch.no_grad():
        assert torch.equal(stripped(VIT_IMAGES), native.eval()(VIT_IMAGES))
