"""Nothing silent: modules that do not trace are named, with why, by find_residual_sites and by the error
when no site is found."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sdsurgery import (
    NoResidualSitesError,
    ResidualSites,
    RetrofittedBlock,
    TraceError,
    apply_stochastic_depth,
    find_residual_sites,
    plan_stochastic_depth,
)

X = torch.randn(2, 8)


class DataDependentBlock(nn.Module):
    """A residual block whose forward branches on tensor values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + self.f(x)
        return x + self.f(-x)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


UNTRACED_REASON = "symbolically traced variables cannot be used as inputs to control flow"


def test_no_site_error_names_the_modules_that_did_not_trace():
    model = nn.Sequential(DataDependentBlock(), nn.Linear(8, 8))
    with pytest.raises(NoResidualSitesError) as raised:
        apply_stochastic_depth(model, 0.1, example_inputs=X)
    message = str(raised.value)
    assert message.startswith("no residual addition found in Sequential")
    assert (
        f"these modules did not trace, so their residual additions (if any) could not be found: 0 ({UNTRACED_REASON})"
        in (message)
    )


def test_no_site_error_without_untraced_modules_says_only_that():
    with pytest.raises(NoResidualSitesError) as raised:
        apply_stochastic_depth(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), 0.1, example_inputs=X)
    assert "did not trace" not in str(raised.value)


def test_find_residual_sites_reports_untraced_modules():
    with pytest.warns(UserWarning, match=r"kept these modules as they are because they do not trace: 0 \("):
        sites = find_residual_sites(nn.Sequential(DataDependentBlock(), Plain()), example_inputs=X)
    assert isinstance(sites, ResidualSites) and isinstance(sites, list)
    assert [s.block_path for s in sites] == ["1"]
    assert sites.untraced == {"0": UNTRACED_REASON}


def test_the_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="kept these modules as they are because they do not trace: 0 [(]") as caught:
        apply_stochastic_depth(nn.Sequential(DataDependentBlock(), Plain()), 0.1, example_inputs=X)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, CALL_LINE)]


CALL_LINE = test_the_warning_points_at_the_callers_line.__code__.co_firstlineno + 2


class Cache:
    """An object no graph can hold (transformers' ``DynamicCache``)."""


class ReturnsACache(nn.Module):
    """Layers run in a loop and returned with a cache: the model's own forward does not trace, its layers
    do. With ``residual_here`` the forward adds each layer's output to its input too."""

    def __init__(self, residual_here: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Plain() for _ in range(2))
        self.residual_here = residual_here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Cache]:
        for layer in self.layers:
            x = x + layer(x) if self.residual_here else layer(x)
        return x, Cache()


def test_a_forward_that_does_not_trace_but_adds_nothing_itself_is_named_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_stochastic_depth(ReturnsACache(residual_here=False), 0.1, example_inputs=X)
        retrofitted = apply_stochastic_depth(ReturnsACache(residual_here=False), 0.1, example_inputs=X)
    assert list(plan.untraced) == [""] and plan.untraced_without_additions == ("",)
    assert [s.block_path for s in plan.sites] == ["layers.0", "layers.1"]
    assert [isinstance(m, RetrofittedBlock) for m in retrofitted.layers] == [True, True]


def test_a_forward_that_does_not_trace_and_adds_tensors_itself_is_warned_about():
    with pytest.warns(UserWarning, match=r"kept these modules as they are because they do not trace: <model forward>"):
        apply_stochastic_depth(ReturnsACache(residual_here=True), 0.1, example_inputs=X)
    plan = plan_stochastic_depth(ReturnsACache(residual_here=True), 0.1, example_inputs=X)
    assert list(plan.untraced) == [""] and plan.untraced_without_additions == ()
    assert [s.block_path for s in plan.sites] == ["layers.0", "layers.1"]  # the forward's own additions are lost


def test_find_residual_sites_of_a_fully_traced_model_has_nothing_untraced():
    sites = find_residual_sites(nn.Sequential(Plain(), Plain()), example_inputs=X)
    assert sites.untraced == {} and [s.block_path for s in sites] == ["0", "1"]


class TrainOnlyCheckBlock(nn.Module):
    """A residual block whose train-mode code branches on tensor values (DETR's encoder layers clamp
    non-finite activations in training): it traces in eval mode, not in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x)
        if self.training and not torch.isfinite(x).all():
            x = x.clamp(-1e4, 1e4)
        return x


def test_a_block_that_does_not_trace_in_train_mode_is_left_as_it_is_and_named():
    model = nn.Sequential(Plain(), TrainOnlyCheckBlock(), Plain()).eval()
    assert [s.block_path for s in find_residual_sites(model, example_inputs=X)] == ["0", "1", "2"]  # eval traces
    with pytest.warns(UserWarning, match=rf"left these blocks without stochastic depth .*: 1 \({UNTRACED_REASON}\)"):
        result = apply_stochastic_depth(model, 0.1, example_inputs=X)
    assert [type(m).__name__ for m in result] == ["Plain", "TrainOnlyCheckBlock", "Plain"]
    assert [isinstance(m, RetrofittedBlock) for m in result] == [True, False, True]
    assert torch.equal(result.eval()(X), model(X))


def test_a_model_whose_only_block_does_not_trace_in_train_mode_raises_naming_it():
    model = nn.Sequential(TrainOnlyCheckBlock()).eval()
    with pytest.raises(TraceError, match=rf"module '0' \(TrainOnlyCheckBlock\): {UNTRACED_REASON}"):
        apply_stochastic_depth(model, 0.1, example_inputs=X)


class LayerDrop(nn.Module):
    """Residual layers skipped at random in training (Hugging Face's ``layerdrop``): the draw is data."""

    def __init__(self, layer_drop: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.layer_drop = layer_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.layer_drop and self.training and torch.rand([]) < 0.5:
                continue
            x = x + layer(x)
        return x


def test_a_random_draw_deciding_control_flow_does_not_trace_instead_of_being_baked_in():
    # Run once while tracing, torch.rand([]) would fix which layers a training step skips, for every step.
    assert isinstance(apply_stochastic_depth(LayerDrop(False).eval(), 0.1, example_inputs=X), RetrofittedBlock)
    with pytest.raises(TraceError, match=rf"the model's own forward \(LayerDrop\): {UNTRACED_REASON}"):
        apply_stochastic_depth(LayerDrop(True).eval(), 0.1, example_inputs=X)


class TrainOnlyStatistics(nn.Module):
    """A parameter-free part that reads tensor values in training only (a quantiser tracking its range)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("largest", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.abs().max() > self.largest:
            self.largest = x.abs().max().detach()
        return x


class BlockWithTrainOnlyPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.statistics = TrainOnlyStatistics()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.statistics(self.f(x))


def test_a_part_of_a_block_that_does_not_trace_in_train_mode_runs_as_one_call():
    model = nn.Sequential(BlockWithTrainOnlyPart(), BlockWithTrainOnlyPart()).eval()
    result = apply_stochastic_depth(model, 0.0, example_inputs=X)  # rate 0: training runs the graphs as they are
    assert [isinstance(m, RetrofittedBlock) for m in result] == [True, True]
    assert [type(m.statistics).__name__ for m in result] == ["TrainOnlyStatistics", "TrainOnlyStatistics"]
    with torch.no_grad():
        assert torch.equal(result.train()(X), model.train()(X))
    assert [float(m.statistics.largest) > 0 for m in result] == [True, True]  # its own code ran in training
