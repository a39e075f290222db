"""The pass as two public steps, ``plan_stochastic_depth`` then ``apply_plan``, and the callers that trace a
model once: ``apply_stochastic_depth``, the ``apply`` command, ``Checkpoint.retrofit`` and the trainer
callbacks' ``retrofit_in_place``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import sdsurgery
from sdsurgery import (
    NoResidualSitesError,
    StochasticDepth,
    apply_plan,
    apply_stochastic_depth,
    checkpoint,
    cli,
    plan,
    plan_stochastic_depth,
)
from sdsurgery.checkpoint import SurgeryOptions
from sdsurgery.integrations.retrofit import retrofit_in_place
from sdsurgery.specs import ModelSpec
from tiny_residual_models import ConvNet


def rates(model: torch.nn.Module) -> list[tuple[str, float, int | None, str]]:
    return [(n, m.p, m.depth, m.mode) for n, m in model.named_modules() if isinstance(m, StochasticDepth)]


@pytest.fixture
def whole_model_traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class name of every model traced whole (planning traces the model; applying traces only blocks)."""
    traced: list[str] = []
    trace_model = plan.trace_model

    def counting(model, *args, **kwargs):
        traced.append(type(model).__name__)
        return trace_model(model, *args, **kwargs)

    monkeypatch.setattr(plan, "trace_model", counting)
    return traced


def test_apply_plan_gives_what_apply_stochastic_depth_gives() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    planned = apply_plan(model, plan_stochastic_depth(model, 0.2, schedule="uniform"), mode="batch")
    direct = apply_stochastic_depth(model, 0.2, schedule="uniform", mode="batch")
    assert rates(planned) == rates(direct)
    assert len(rates(planned)) == 8
    assert list(planned.state_dict()) == list(model.state_dict())


def test_apply_plan_does_not_trace_the_whole_model(whole_model_traces: list[str]) -> None:
    model = ConvNet(blocks=3)
    surgery_plan = plan_stochastic_depth(model, 0.1)
    assert whole_model_traces == ["ConvNet"]
    apply_plan(model, surgery_plan, example_inputs=torch.randn(2, 3, 8, 8))
    assert whole_model_traces == ["ConvNet"]


def test_apply_stochastic_depth_traces_the_whole_model_once(whole_model_traces: list[str]) -> None:
    apply_stochastic_depth(ConvNet(blocks=3), 0.1, verify=False)
    assert whole_model_traces == ["ConvNet"]


def test_a_plan_applies_to_a_copy_of_its_model() -> None:
    model = ConvNet(blocks=2)
    surgery_plan = plan_stochastic_depth(model, 0.1)
    retrofitted = apply_plan(copy.deepcopy(model), surgery_plan, inplace=True, example_inputs=torch.randn(2, 3, 8, 8))
    assert [name for name, _, _, _ in rates(retrofitted)] == ["blocks.0.stochastic_depth", "blocks.1.stochastic_depth"]


def test_a_plan_for_a_model_with_more_blocks_is_refused() -> None:
    surgery_plan = plan_stochastic_depth(ConvNet(blocks=3), 0.1)
    with pytest.raises(ValueError, match=r"the plan was made for another model: a ConvNet of \d+ modules"):
        apply_plan(ConvNet(blocks=2), surgery_plan)


def test_a_plan_for_a_smaller_model_of_the_same_class_is_refused() -> None:
    # resnet18's plan names blocks that resnet34 has too: without the check it retrofitted 8 of 16 blocks.
    surgery_plan = plan_stochastic_depth(torchvision.models.resnet18(), 0.2)
    with pytest.raises(
        ValueError,
        match=r"made for another model: a ResNet of 68 modules and 62 parameters, and this is a ResNet of 116 modules",
    ):
        apply_plan(torchvision.models.resnet34(), surgery_plan)


def test_a_plan_applies_to_another_instance_of_its_architecture() -> None:
    surgery_plan = plan_stochastic_depth(torchvision.models.resnet18(), 0.2)
    assert len(rates(apply_plan(torchvision.models.resnet18(), surgery_plan))) == 8


def test_a_plan_for_other_parameter_shapes_is_refused() -> None:
    surgery_plan = plan_stochastic_depth(torchvision.models.resnet18(num_classes=10), 0.2)
    with pytest.raises(ValueError, match="their module trees or parameter shapes differ"):
        apply_plan(torchvision.models.resnet18(num_classes=1000), surgery_plan)


def test_a_plan_without_sites_is_refused() -> None:
    model = torchvision.models.vgg11()
    surgery_plan = plan_stochastic_depth(model, 0.1)
    assert surgery_plan.sites == []
    with pytest.raises(NoResidualSitesError, match="no residual addition found in VGG"):
        apply_plan(model, surgery_plan)


def test_apply_plan_leaves_the_model_alone_unless_inplace() -> None:
    model = ConvNet(blocks=2)
    apply_plan(model, plan_stochastic_depth(model, 0.1), verify=False)
    assert rates(model) == []


def test_apply_plan_rejects_an_unknown_mode() -> None:
    model = ConvNet(blocks=2)
    with pytest.raises(ValueError, match="mode must be one of 'row', 'batch', 'subset', got 'rows'"):
        apply_plan(model, plan_stochastic_depth(model, 0.1), mode="rows")


def test_the_apply_command_traces_the_model_once(tmp_path: Path, whole_model_traces: list[str]) -> None:
    status = cli.main(
        ["apply", "timm:test_resnet", "--p-max", "0.1", "--input-size", "3,32,32", "-o", str(tmp_path / "out.pt")]
    )
    assert status == 0
    assert whole_model_traces == ["ResNet"]


def test_load_traces_the_model_once(tmp_path: Path, whole_model_traces: list[str]) -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    retrofitted = apply_stochastic_depth(model, 0.1, verify=False)
    written = checkpoint.checkpoint_for(
        retrofitted,
        source=ModelSpec("timm", "test_resnet"),
        surgery=SurgeryOptions(0.1),
        sites=plan_stochastic_depth(model, 0.1).sites,
    )
    checkpoint.save(tmp_path / "sd.pt", written)
    whole_model_traces.clear()
    loaded = sdsurgery.load(tmp_path / "sd.pt")
    assert whole_model_traces == ["ResNet"]
    assert rates(loaded) == rates(retrofitted)


def test_retrofit_in_place_traces_the_model_once(whole_model_traces: list[str]) -> None:
    model = ConvNet(blocks=3)
    parameters = list(model.parameters())
    assert retrofit_in_place(model, 0.1, mode="batch", example_inputs=torch.randn(2, 3, 8, 8)) is model
    assert whole_model_traces == ["ConvNet"]
    assert [(n, m) for n, _, _, m in rates(model)] == [(f"blocks.{i}.stochastic_depth", "batch") for i in range(3)]
    assert [id(p) for p in model.parameters()] == [id(p) for p in parameters]  # the tensors an optimiser holds
