"""The pass as a whole: what it keeps, what it refuses, and that it is idempotent."""

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

from sdsurgery import (
    NoResidualSitesError,
    RetrofittedBlock,
    StochasticDepth,
    TraceError,
    apply_stochastic_depth,
    find_residual_sites,
    verify,
)
from tiny_residual_models import Residual


def _rates(model):
    return {n: (m.p, m.depth) for n, m in model.named_modules() if isinstance(m, StochasticDepth)}


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_state_dict_keys_are_exactly_the_originals(resnet):
    retrofitted = apply_stochastic_depth(resnet, 0.2)
    assert list(retrofitted.state_dict()) == list(resnet.state_dict())


def test_original_checkpoint_loads_strictly(resnet):
    retrofitted = apply_stochastic_depth(torchvision.models.resnet18(), 0.2)
    retrofitted.load_state_dict(resnet.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(retrofitted.eval()(x), resnet.eval()(x))


def test_no_parameters_or_buffers_are_added(resnet):
    retrofitted = apply_stochastic_depth(resnet, 0.2)
    assert sum(1 for _ in retrofitted.parameters()) == sum(1 for _ in resnet.parameters())
    assert sum(1 for _ in retrofitted.buffers()) == sum(1 for _ in resnet.buffers())


def test_input_model_is_untouched(resnet):
    before = copy.deepcopy(resnet)
    apply_stochastic_depth(resnet, 0.2)
    assert [type(m) for m in resnet.modules()] == [type(m) for m in before.modules()]
    assert vars(resnet).keys() == vars(before).keys()
    for (name, a), (_, b) in zip(resnet.state_dict().items(), before.state_dict().items()):
        assert torch.equal(a, b), name


def test_inplace_rewrites_and_returns_the_same_model(resnet):
    assert apply_stochastic_depth(resnet, 0.2, inplace=True) is resnet
    assert isinstance(resnet.layer1[0], RetrofittedBlock)


def test_keeps_the_model_class(resnet):
    assert type(apply_stochastic_depth(resnet, 0.2)) is torchvision.models.ResNet


def test_stochastic_depth_modules_sit_under_their_blocks(resnet):
    rates = _rates(apply_stochastic_depth(resnet, 0.7))
    assert list(rates) == [f"layer{i}.{j}.stochastic_depth" for i in range(1, 5) for j in range(2)]
    assert [depth for _, depth in rates.values()] == list(range(8))
    assert rates["layer4.1.stochastic_depth"] == (0.7, 7)


def test_applying_twice_equals_applying_once(resnet):
    once = apply_stochastic_depth(resnet, 0.2)
    twice = apply_stochastic_depth(once, 0.2)
    assert _rates(twice) == _rates(once)
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    expected = once.train()(x)
    torch.manual_seed(0)
    assert torch.equal(twice.train()(x), expected)


def test_re_applying_re_rates_instead_of_stacking(resnet):
    twice = apply_stochastic_depth(apply_stochastic_depth(resnet, 0.2), 0.5, schedule="uniform")
    assert {p for p, _ in _rates(twice).values()} == {0.5}
    assert len(_rates(twice)) == 8


def test_retrofitted_model_survives_deepcopy_and_pickle(resnet):
    retrofitted = apply_stochastic_depth(resnet, 0.2)
    buffer = io.BytesIO()
    torch.save(retrofitted, buffer)
    buffer.seek(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = retrofitted.eval()(x)
        for clone in (copy.deepcopy(retrofitted), torch.load(buffer, weights_only=False)):
            assert _rates(clone) == _rates(retrofitted)
            assert torch.equal(clone.eval()(x), expected)


def test_include_keeps_only_matching_blocks(resnet):
    sites = find_residual_sites(resnet, 0.2, include=["layer4.*"])
    assert [(s.block_path, s.drop_rate) for s in sites] == [("layer4.0", 0.0), ("layer4.1", 0.2)]


def test_exclude_by_class_drops_matching_blocks():
    model = torchvision.models.resnet50()
    assert find_residual_sites(model, exclude=[torchvision.models.resnet.Bottleneck]) == []


def test_exclude_by_another_class_keeps_every_block():
    model = torchvision.models.resnet50()
    sites = find_residual_sites(model, exclude=[torchvision.models.resnet.BasicBlock])
    assert [s.block_path for s in sites] == [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)]


def test_uniform_schedule(resnet):
    assert {p for p, _ in _rates(apply_stochastic_depth(resnet, 0.1, schedule="uniform")).values()} == {0.1}


def test_explicit_rates(resnet):
    rates = [i / 10 for i in range(8)]
    assert [p for p, _ in _rates(apply_stochastic_depth(resnet, 0.1, schedule=rates)).values()] == rates


def test_batch_mode_is_passed_to_every_module(resnet):
    modules = apply_stochastic_depth(resnet, 0.1, mode="batch").modules()
    assert {m.mode for m in modules if isinstance(m, StochasticDepth)} == {"batch"}


class ConstantScaledResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(2, 2)

    def forward(self, x):
        return x + self.f(x) * torch.tensor([1.0, 2.0])  # fx lifts the tensor into a graph constant


def test_graph_constants_follow_the_model_to_another_device_and_dtype():
    retrofitted = apply_stochastic_depth(nn.Sequential(ConstantScaledResidual()), 0.1).to("meta", torch.float64)
    output = retrofitted(torch.empty(3, 2, device="meta", dtype=torch.float64))
    assert (output.device.type, output.dtype) == ("meta", torch.float64)
    assert all(c.device.type == "meta" for c in retrofitted[0].constants.values())


# A residual written in the model's own forward, and blocks nested in it.


class RootResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Residual()
        self.g = nn.Linear(8, 8)

    def forward(self, x):
        x = self.block(x)
        return x + self.g(torch.relu(x))


def test_additions_in_the_models_own_forward_are_blocks_of_their_own():
    sites = find_residual_sites(RootResidual(), 0.2)
    assert [(s.block_path, s.depth, s.drop_rate) for s in sites] == [("block", 0, 0.0), ("", 1, 0.2)]


def test_root_residual_makes_the_root_a_retrofitted_block():
    original = RootResidual()
    retrofitted = apply_stochastic_depth(original, 0.2)
    assert isinstance(retrofitted, RetrofittedBlock) and isinstance(retrofitted.block, RetrofittedBlock)
    assert set(_rates(retrofitted)) == {"stochastic_depth", "block.stochastic_depth"}
    assert verify(original, retrofitted, torch.randn(4, 8)).ok


# Refusals.


def test_model_without_residuals_raises():
    with pytest.raises(NoResidualSitesError, match="no residual addition found in VGG"):
        apply_stochastic_depth(torchvision.models.vgg11(), 0.1)


class DataDependentRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # the residual is in the forward that does not trace; its child holds none
            return x + self.f(x)
        return x


def test_untraceable_model_raises_naming_the_forward():
    with pytest.raises(TraceError, match=r"DataDependentRoot.*leaf_modules"):
        apply_stochastic_depth(DataDependentRoot(), 0.1)


class DataDependentBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x) if x.sum() > 0 else x


class PartlyTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.good = Residual()
        self.bad = DataDependentBlock()

    def forward(self, x):
        return self.bad(self.good(x))


def test_untraceable_submodule_is_kept_as_is_with_a_warning():
    original = PartlyTraceable()
    with pytest.warns(UserWarning, match=r"bad \(symbolically traced variables"):
        retrofitted = apply_stochastic_depth(original, 0.1)
    assert set(_rates(retrofitted)) == {"good.stochastic_depth"}
    assert type(retrofitted.bad) is DataDependentBlock


def test_untraceable_submodule_can_be_declared_a_leaf_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrofitted = apply_stochastic_depth(PartlyTraceable(), 0.1, leaf_modules=[DataDependentBlock])
    assert set(_rates(retrofitted)) == {"good.stochastic_depth"}


@pytest.mark.parametrize("p_max", [-0.5, 1.0])
def test_p_max_outside_unit_interval_raises(resnet, p_max):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        apply_stochastic_depth(resnet, p_max)


def test_unknown_schedule_raises(resnet):
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        apply_stochastic_depth(resnet, 0.1, schedule="cosine")


def test_unknown_mode_raises(resnet):
    with pytest.raises(ValueError, match="mode"):
        apply_stochastic_depth(resnet, 0.1, mode="sometimes")
