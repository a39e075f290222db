"""Blocks whose forward is decorated, or takes ``**kwargs``: traced through, and called as before."""

import functools

import pytest
import torch
from torch import nn

from sdsurgery import RetrofittedBlock, apply_stochastic_depth
from sdsurgery.decorators import rewrap


def renamed_keyword(old, new):
    """Like transformers' ``deprecate_kwarg``: accept ``old=`` for ``new=``."""

    def decorator(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return forward(self, *args, **kwargs)

        return wrapper

    return decorator


def counted(forward):
    """Counts the calls that went through it, on the module."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        self.decorated_calls = getattr(self, "decorated_calls", 0) + 1
        return forward(self, *args, **kwargs)

    return wrapper


class DecoratedBlock(nn.Module):
    scale_default = 1.0  # a class-level setting a decorator or library may read

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    @renamed_keyword("gain", "scale")
    @counted
    def forward(self, x, scale=None):
        y = self.fc(x)
        if scale is not None:
            y = y * scale
        return x + y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([DecoratedBlock(), DecoratedBlock()])

    def forward(self, x, scale=None):
        for block in self.blocks:
            x = block(x, scale=scale)
        return x


class KeywordsBlock(nn.Module):
    """A block passing its ``**kwargs`` on, like a transformers decoder layer."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x, **kwargs):
        return x + self.fc(x) * kwargs["gate"]


class KeywordsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([KeywordsBlock(), KeywordsBlock()])

    def forward(self, x, gate):
        for block in self.blocks:
            x = block(x, gate=gate)
        return x


def test_decorated_block_is_retrofitted_through_its_decorators():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 8)
    result = apply_stochastic_depth(model, 0.2, example_inputs=(x,))
    block = result.blocks[1]
    assert isinstance(block, RetrofittedBlock) and block.block_class is DecoratedBlock
    before = getattr(block, "decorated_calls", 0)
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out, model.blocks[1](x))
    assert block.decorated_calls == before + 1  # the copied decorator ran on the retrofitted block


def test_decorator_semantics_survive_the_retrofit():
    # The renamed keyword is still accepted: the decorator maps gain= to scale= before the traced forward.
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 8)
    result = apply_stochastic_depth(model, 0.2, example_inputs=(x,))
    block, original = result.blocks[0], model.blocks[0]
    with torch.no_grad():
        assert torch.equal(block(x), original(x))
        assert torch.equal(block(x, gain=None), original(x, gain=None))


def test_class_settings_of_the_original_block_read_the_same():
    torch.manual_seed(0)
    result = apply_stochastic_depth(Net().eval(), 0.2, example_inputs=(torch.randn(2, 8),))
    assert result.blocks[0].scale_default == 1.0
    with pytest.raises(AttributeError, match="no_such_setting"):
        _ = result.blocks[0].no_such_setting


def test_rewrap_refuses_a_wrapper_that_does_not_hold_what_it_wraps():
    def inner(self, x):
        return x

    def wrapper(self, x):  # claims to wrap inner, but calls a global instead
        return x

    wrapper.__wrapped__ = inner
    with pytest.raises(ValueError, match="does not hold the function it wraps"):
        rewrap(wrapper, inner)


def test_keyword_arguments_are_traced_from_the_call_and_checked():
    torch.manual_seed(0)
    model = KeywordsNet().eval()
    x, gate = torch.randn(2, 8), torch.rand(2, 1)
    result = apply_stochastic_depth(model, 0.2, example_inputs=(x, gate))
    assert all(isinstance(b, RetrofittedBlock) for b in result.blocks)
    other_gate = torch.rand(3, 1)
    with torch.no_grad():
        y = torch.randn(3, 8)
        assert torch.equal(result(y, other_gate), model(y, other_gate))
        # Other keywords in eval: the block's own code runs, exactly.
        assert torch.equal(result.blocks[0](x, gate=gate, other=1), model.blocks[0](x, gate=gate, other=1))
    with pytest.raises(TypeError, match=r"keyword arguments \['gate'\] in \*\*kwargs, got \['gate', 'other'\]"):
        result.blocks[0].train()(x, gate=gate, other=1)
