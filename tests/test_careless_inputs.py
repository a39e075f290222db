"""What the Python API does with the inputs of a hurried user: wrapped models are retrofitted unwrapped (and the
warning says so), what it cannot read is refused with one clear error, never a crash or a silently wrong model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from sdsurgery import ExampleInputsError, StochasticDepth, apply_stochastic_depth, plan_stochastic_depth, verify
from tiny_residual_models import ConvNet

X = torch.randn(2, 3, 8, 8)


def drop_rates(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]


def test_a_plain_module_is_retrofitted_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drop_rates(apply_stochastic_depth(ConvNet(blocks=2), 0.2, example_inputs=X)) == [0.0, 0.2]


def test_a_compiled_model_is_retrofitted_unwrapped_and_the_warning_says_so() -> None:
    model = ConvNet(blocks=2)
    # Tracing the OptimizedModule itself with example inputs crashed the process (exit 139).
    with pytest.warns(UserWarning, match=r"retrofits the ConvNet inside OptimizedModule \(\._orig_mod\)") as caught:
        retrofitted = apply_stochastic_depth(torch.compile(model), 0.2, example_inputs=X)
    assert type(retrofitted) is ConvNet
    assert drop_rates(retrofitted) == [0.0, 0.2]
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into the library


def test_a_data_parallel_model_is_planned_for_the_module_inside() -> None:
    with pytest.warns(UserWarning, match=r"inside DataParallel \(\.module\)"):
        plan = plan_stochastic_depth(nn.DataParallel(torchvision.models.resnet18()), 0.1)
    assert len(plan.sites) == 8
    assert plan.sites[0].block_path == "layer1.0"


def test_a_scripted_model_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot retrofit a TorchScript module .*retrofit the nn.Module before"):
        apply_stochastic_depth(torch.jit.script(ConvNet(blocks=2)), 0.2)


def test_a_function_is_refused() -> None:
    with pytest.raises(TypeError, match="sdsurgery retrofits an nn.Module, got function"):
        apply_stochastic_depth(torchvision.models.resnet18, 0.2)


@pytest.mark.parametrize("p_max", [None, "high", float("nan"), 1.0, -0.1])
def test_a_rate_that_is_no_drop_rate_is_refused(p_max: object) -> None:
    with pytest.raises(ValueError, match=r"rate p must be in \[0, 1\), got"):
        apply_stochastic_depth(ConvNet(blocks=2), p_max)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_verified_on_inputs_of_its_precision(dtype: torch.dtype) -> None:
    model = torchvision.models.resnet18().to(dtype)
    assert len(drop_rates(apply_stochastic_depth(model, 0.1))) == 8  # verified on the default 3x224x224 input


def test_verifying_a_model_on_the_meta_device_is_refused_and_planning_it_is_not() -> None:
    with torch.device("meta"):
        model = ConvNet(blocks=2)
    with pytest.raises(ValueError, match="its weights are on the meta device .*pass verify=False"):
        apply_stochastic_depth(model, 0.2, example_inputs=X.to("meta"))
    assert drop_rates(apply_stochastic_depth(model, 0.2, example_inputs=X.to("meta"), verify=False)) == [0.0, 0.2]


def test_example_inputs_the_model_does_not_accept_are_named_in_one_error() -> None:
    model = torchvision.models.resnet18()
    grey = torch.randn(2, 1, 32, 32)
    with pytest.raises(
        ExampleInputsError,
        match=r"^ResNet does not run on the example inputs \(a 2x1x32x32 input\): Given groups=1, weight of size "
        r"\[64, 3, 7, 7\], expected input\[2, 1, 32, 32\] to have 3 channels.*; pass example_inputs it accepts$",
    ):
        apply_stochastic_depth(model, 0.1, example_inputs=grey)
    with pytest.raises(
        ExampleInputsError,
        match=r"^ResNet does not run on the example inputs \(x 2x3x32x32, mask None\): .* argument 'mask'",
    ):
        verify(model, apply_stochastic_depth(model, 0.1), {"x": torch.randn(2, 3, 32, 32), "mask": None})
    assert verify(model, apply_stochastic_depth(model, 0.1), torch.randn(2, 3, 32, 32)).ok  # control
