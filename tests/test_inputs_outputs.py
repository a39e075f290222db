"""Example inputs of any shape (tensor, positional tuple, keyword dict) and outputs of any shape (tuples,
lists, dicts, dataclasses, ModelOutput): planning, surgery and verification take and compare them all."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sdsurgery import (
    VerificationError,
    apply_stochastic_depth,
    find_residual_sites,
    plan_stochastic_depth,
    verify,
)
from sdsurgery.inputs import ExampleCall, as_call
from sdsurgery.verification import compare_outputs, output_leaves

X = torch.randn(2, 8)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class KeywordModel(nn.Module):
    """Called like a Hugging Face model: ``model(features=..., scale=...)``; ``scale`` scales the residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Residual(), Residual())

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.blocks(features * scale)


KEYWORDS = {"scale": torch.full((1, 8), 0.5), "features": X}  # not in signature order: bound by name


def test_keyword_example_inputs_plan_every_site():
    sites = find_residual_sites(KeywordModel(), 0.2, example_inputs=KEYWORDS)
    assert [(s.block_path, s.drop_rate) for s in sites] == [("blocks.0", 0.0), ("blocks.1", 0.2)]


def test_keyword_example_inputs_retrofit_and_verify():
    original = KeywordModel()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=KEYWORDS)
    report = verify(original, retrofitted, KEYWORDS)
    assert report.ok, report.summary()
    assert (report.eval_max_abs_diff, len(report.sites)) == (0.0, 2)


def test_tensor_tuple_and_dict_are_one_call():
    assert as_call(X) == ExampleCall((X,))
    assert as_call((X, 3)) == ExampleCall((X, 3))
    assert as_call({"x": X}) == ExampleCall((), {"x": X})


@pytest.mark.parametrize("bad", [[X], "x", {1: X}])
def test_other_example_inputs_are_a_clear_type_error(bad):
    with pytest.raises(TypeError, match="example_inputs must be a tensor, a tuple of positional arguments or a dict"):
        plan_stochastic_depth(KeywordModel(), 0.1, example_inputs=bad)


@dataclass
class Prediction:
    logits: torch.Tensor
    extras: dict
    label: str


class StructuredOutput(nn.Module):
    """Returns a dataclass holding a dict of a tuple and a list: the verifier compares every leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Residual()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Prediction:
        h = self.block(x)
        return Prediction(self.head(h), {"features": (h, [h.sum(-1)])}, "ok")


def test_structured_outputs_verify_leaf_by_leaf():
    original = StructuredOutput()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    report = verify(original, retrofitted, X)
    assert report.ok and report.eval_mismatch is None, report.summary()


def test_a_changed_leaf_deep_in_the_output_is_measured():
    original = StructuredOutput()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    with torch.no_grad():
        retrofitted.head.bias.add_(0.25)  # only .logits changes
    report = verify(original, retrofitted, X)
    assert not report.eval_ok and report.eval_mismatch is None
    assert report.eval_max_abs_diff == pytest.approx(0.25)


def test_leaves_are_named_by_where_they_are():
    h = torch.zeros(2)
    leaves = output_leaves(Prediction(h, {"features": (h, [h])}, "ok"))
    assert [k for k in leaves if not k.endswith(">")] == [
        ".logits",
        ".extras['features'][0]",
        ".extras['features'][1][0]",
        ".label",
    ]


def test_a_different_structure_is_a_mismatch_not_a_crash():
    h = torch.zeros(2)
    assert compare_outputs({"a": h}, {"a": h}).mismatch is None
    assert compare_outputs({"a": h}, {"b": h}).mismatch == "output['a'] is in one output only"
    assert compare_outputs((h,), (h, h)).max_abs_diff == float("inf")
    assert compare_outputs([h], [torch.zeros(3)]).mismatch == "output[0]: expected shape (2,), got (3,)"
    assert compare_outputs(Prediction(h, {}, "ok"), Prediction(h, {}, "no")).mismatch == (
        "output.label: expected 'ok', got 'no'"
    )


def test_the_same_nan_and_inf_are_no_difference():
    value = torch.tensor([float("nan"), float("inf"), 1.0])
    assert compare_outputs(value, value.clone()).max_abs_diff == 0.0
    assert compare_outputs(value, torch.tensor([float("nan"), float("inf"), 2.0])).max_abs_diff == 1.0


def test_hugging_face_model_output_is_compared_by_field():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    h = torch.ones(2, 3)
    expected = modeling_outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h, h))
    assert compare_outputs(expected, modeling_outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h, h))) == (
        compare_outputs(h, h)
    )
    changed = modeling_outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h, h + 1))
    assert compare_outputs(expected, changed).max_abs_diff == 1.0


@torch.fx.wrap
def clamp_window(window: list, size: list) -> list:
    """Shrinks ``window`` in place to ``size``, like torchvision's swin3d ``_get_window_and_shift_size``."""
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


class WindowBlock(nn.Module):
    """A residual block whose fx-wrapped helper mutates a list argument."""

    def __init__(self, window: int = 16) -> None:
        super().__init__()
        self.window = window
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = clamp_window([self.window], [x.shape[-1]])
        return x + self.f(x) * (window[0] / self.window)


def test_verify_runs_helpers_that_mutate_their_list_arguments():
    original = nn.Sequential(WindowBlock(), WindowBlock())
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    report = verify(original, retrofitted, X)
    assert report.ok and len(report.sites) == 2, report.summary()


class BreaksInEval(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken on purpose")


def test_a_retrofitted_model_that_raises_is_a_verification_error():
    original = nn.Sequential(Residual(), nn.Identity())
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    assert verify(original, retrofitted, X).ok  # positive control
    retrofitted[1] = BreaksInEval()
    with pytest.raises(
        VerificationError, match="retrofitted model raised RuntimeError in eval mode.*broken on purpose"
    ):
        verify(original, retrofitted, X)


class WantsTargetsInTraining(nn.Module):
    """Like a torchvision detector: in train mode it needs targets."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Residual()

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and targets is None:
            raise ValueError("targets should be passed in training mode")
        return self.block(x)


def test_train_check_is_skipped_and_said_so_when_the_original_needs_other_inputs_in_training():
    original = WantsTargetsInTraining()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    report = verify(original, retrofitted, X)
    assert report.ok and report.train_max_abs_diff is None
    assert "train check skipped (the original raises in train mode on these inputs: targets should be passed" in (
        report.summary()
    )
    full = verify(original, retrofitted, (X, X))  # positive control: with targets the train check runs
    assert full.train_max_abs_diff == 0.0 and full.train_skipped is None
