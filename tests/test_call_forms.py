"""Call forms: a retrofitted model accepts every call the original accepts (optional masks given or not,
flags, other batch sizes and lengths) and gives the original's eval outputs on each; a block traced for one
form never runs a call of another form through that trace."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sdsurgery import StochasticDepth, apply_stochastic_depth, find_residual_sites, verify
from sdsurgery.callforms import TRACED, CallForm

TOKENS = torch.randn(2, 5, 8)
MASK = torch.randn(5, 5)


class MaskedBlock(nn.Module):
    """Attention with an optional additive mask (``attn_mask=None`` reads ``attn_mask.to`` only when given)
    and a flag that changes the computation, then an MLP: two residual additions."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, sharpen: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        scores = q @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)
        if sharpen:
            scores = scores * 2
        x = x + self.proj(scores.softmax(-1) @ v)
        return x + self.mlp(x)


class MaskedModel(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MaskedBlock() for _ in range(depth)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, sharpen: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, sharpen=sharpen)
        return x


CALLS = {
    "no mask": (TOKENS,),
    "mask": (TOKENS, MASK),
    "other batch and length, no mask": (torch.randn(3, 7, 8),),
    "other batch and length, mask": (torch.randn(3, 7, 8), torch.randn(7, 7)),
    "flag": (TOKENS, None, True),
    "mask and flag by keyword": (TOKENS,),
}
KEYWORDS = {"mask and flag by keyword": {"mask": MASK, "sharpen": True}}


@pytest.fixture(params=["example without mask", "example with mask"])
def models(request):
    torch.manual_seed(0)
    original = MaskedModel().eval()
    example = (TOKENS,) if request.param == "example without mask" else (TOKENS, MASK)
    return original, apply_stochastic_depth(original, 0.3, example_inputs=example).eval()


@pytest.mark.parametrize("call", CALLS)
def test_every_call_form_gives_the_original_eval_outputs(models, call):
    original, retrofitted = models
    args, kwargs = CALLS[call], KEYWORDS.get(call, {})
    with torch.no_grad():
        assert torch.equal(retrofitted(*args, **kwargs), original(*args, **kwargs))


def test_blocks_are_traced_for_the_example_call_form():
    retrofitted = apply_stochastic_depth(MaskedModel(), 0.3, example_inputs=TOKENS)
    assert retrofitted.blocks[0].call_form == CallForm((("x", TRACED), ("attn_mask", None), ("sharpen", (bool, False))))
    with_mask = apply_stochastic_depth(MaskedModel(), 0.3, example_inputs=(TOKENS, MASK))
    assert dict(with_mask.blocks[0].call_form.forms)["attn_mask"] is TRACED


def _stochastic_depth_calls(model: nn.Module, *args) -> int:
    calls = []
    handles = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, StochasticDepth)
    ]
    try:
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


def test_another_call_form_trains_with_stochastic_depth_too():
    retrofitted = apply_stochastic_depth(MaskedModel(), 0.3, example_inputs=TOKENS).train()
    assert _stochastic_depth_calls(retrofitted, TOKENS) == 4  # the traced form: two blocks, two sites each
    assert _stochastic_depth_calls(retrofitted, TOKENS, MASK) == 4  # a mask: traced for that form on first use
    assert _stochastic_depth_calls(retrofitted, TOKENS, MASK, True) == 4


def test_the_traced_form_drops_to_the_skip_in_training():
    torch.manual_seed(0)
    original = MaskedModel(depth=1)
    retrofitted = apply_stochastic_depth(original, 0.0, example_inputs=TOKENS).train()
    retrofitted.blocks[0].stochastic_depth.p = 0.999999
    retrofitted.blocks[0].stochastic_depth_1.p = 0.999999
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(retrofitted(TOKENS, MASK), TOKENS)  # both branches dropped: the skip comes through
        assert not torch.equal(original.train()(TOKENS, MASK), TOKENS)  # positive control: no drop, no identity


def test_verify_accepts_a_call_form_other_than_the_example():
    original = MaskedModel()
    retrofitted = apply_stochastic_depth(original, 0.3, example_inputs=TOKENS)
    report = verify(original, retrofitted, (TOKENS, MASK))
    assert report.ok and len(report.sites) == 4, report.summary()


class Options:
    """An argument object, as Hugging Face passes a key-value cache: it becomes an input of a block's trace."""

    def __init__(self, scale: float, enabled: bool = True) -> None:
        self.scale = scale
        self.enabled = enabled


class TakesAnObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        scale = options.scale if options is not None else 1.0
        return x + self.f(x) * scale


class BranchesOnAnObject(TakesAnObject):
    def forward(self, x: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        if options is not None and not options.enabled:  # Python control flow on the object: no trace takes it
            return x
        return x + self.f(x)


def test_an_object_argument_is_an_input_of_a_trace_made_for_that_call():
    original = nn.Sequential(TakesAnObject())
    retrofitted = apply_stochastic_depth(original, 0.0, example_inputs=TOKENS).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stochastic depth stays on: nothing to warn about
        for scale in (2.0, 3.0):
            assert torch.equal(retrofitted[0](TOKENS, Options(scale)), original[0](TOKENS, Options(scale)))
    assert not torch.equal(retrofitted[0](TOKENS, Options(2.0)), retrofitted[0](TOKENS))  # positive control


def test_a_call_that_cannot_be_traced_runs_the_original_code_and_says_so_in_training():
    original = nn.Sequential(BranchesOnAnObject())
    block = apply_stochastic_depth(original, 0.3, example_inputs=TOKENS)[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(block.eval()(TOKENS, Options(1.0, False)), original[0](TOKENS, Options(1.0, False)))
    block.train()
    with pytest.warns(
        UserWarning, match="block .0. is called with options of type Options, not as it was traced.*original code"
    ):
        assert torch.equal(block(TOKENS, Options(1.0, False)), TOKENS)


def test_a_call_running_the_original_code_is_warned_about_once_per_block_not_per_step():
    block = apply_stochastic_depth(nn.Sequential(BranchesOnAnObject()), 0.3, example_inputs=TOKENS)[0].train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            block(TOKENS, Options(1.0, False))
    assert len([w for w in caught if "original code" in str(w.message)]) == 1


def test_sites_are_found_whichever_form_the_example_has():
    without = find_residual_sites(MaskedModel(), 0.3, example_inputs=TOKENS)
    with_mask = find_residual_sites(MaskedModel(), 0.3, example_inputs=(TOKENS, MASK))
    assert [s.block_path for s in without] == [s.block_path for s in with_mask] == ["blocks.0"] * 2 + ["blocks.1"] * 2
