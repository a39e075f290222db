"""Tracing that copes: concrete shapes where code reads them, timm's leaves only where needed, and a model
whose own forward does not trace retrofitted part by part with one depth numbering."""

import functools
import math
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn

from sdsurgery import (
    RetrofittedBlock,
    StochasticDepth,
    TraceError,
    apply_stochastic_depth,
    find_residual_sites,
    plan_stochastic_depth,
    verify,
)
from tiny_residual_models import Residual

X = torch.randn(2, 8)


def _rates(model):
    return {n: (m.p, m.depth) for n, m in model.named_modules() if isinstance(m, StochasticDepth)}


def _quiet_apply(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_stochastic_depth(model, *args, **kwargs)


# A model whose own forward does not trace: its children are traced separately.


class DataDependentRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = Residual()  # registered first, called last: depth follows execution
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.Sequential(Residual(), Residual())

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = self.blocks(x)
        else:
            x = self.blocks(-x)
        return self.head(x)


def test_root_failure_falls_back_to_children_in_execution_order():
    plan = plan_stochastic_depth(DataDependentRoot(), 0.2, example_inputs=X)
    assert plan.untraced == {"": "symbolically traced variables cannot be used as inputs to control flow"}
    assert plan.parts == ["stem", "blocks", "head"]


def test_parts_share_one_depth_numbering():
    sites = find_residual_sites(DataDependentRoot(), 0.2, example_inputs=X)
    assert [(s.block_path, s.depth, s.drop_rate) for s in sites] == [
        ("blocks.0", 0, 0.0),
        ("blocks.1", 1, 0.1),
        ("head", 2, 0.2),
    ]


def test_root_failure_retrofits_every_part_and_verifies():
    original = DataDependentRoot()
    with pytest.warns(UserWarning, match=r"<model forward> \(symbolically traced variables"):
        retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=X)
    assert _rates(retrofitted) == {
        "head.stochastic_depth": (0.2, 2),
        "blocks.0.stochastic_depth": (0.0, 0),
        "blocks.1.stochastic_depth": (0.1, 1),
    }
    assert type(retrofitted) is DataDependentRoot
    assert verify(original, retrofitted, X).ok


class DataDependentContainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = Residual()
        self.second = Residual()

    def forward(self, x):
        return self.second(self.first(x)) if x.sum() > 0 else self.first(x)


class NestedDataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.container = DataDependentContainer()
        self.last = Residual()

    def forward(self, x):
        return self.last(self.container(x)) if x.mean() > -10 else x


def test_fallback_recurses_into_children_that_do_not_trace_either():
    plan = plan_stochastic_depth(NestedDataDependent(), 0.2, example_inputs=torch.ones(2, 8))
    assert set(plan.untraced) == {"", "container"}
    assert plan.parts == ["container.first", "container.second", "last"]
    assert [(s.block_path, s.depth) for s in plan.sites] == [
        ("container.first", 0),
        ("container.second", 1),
        ("last", 2),
    ]


def test_without_an_example_input_parts_follow_registration_order():
    plan = plan_stochastic_depth(DataDependentRoot(), 0.2)
    assert plan.parts == ["head", "stem", "blocks"]


class DataDependentLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x) if x.sum() > 0 else x


def test_root_failure_without_any_traceable_residual_raises_the_root_error():
    with pytest.raises(TraceError, match=r"DataDependentLinear"):
        plan_stochastic_depth(DataDependentLinear(), 0.2, example_inputs=X)


# Shape-dependent code traces with the example input's concrete shapes, guarded.


class WindowBlock(nn.Module):
    """Reads shapes in Python like timm's TinyViT / MobileViT / Swin blocks."""

    def __init__(self, window=4):
        super().__init__()
        self.window = window
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        B, N, C = x.shape
        side = int(math.sqrt(N))
        if side == self.window:
            y = self.f(x)
        else:
            y = self.f(x.flip(1)).flip(1)
        return x + y


class Windowed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = WindowBlock()
        self.other = Residual()

    def forward(self, x):
        return self.other(self.block(x))


TOKENS = torch.randn(2, 16, 8)


def test_shape_dependent_block_traces_with_the_example_shapes():
    plan = plan_stochastic_depth(Windowed(), 0.1, example_inputs=TOKENS)
    assert [s.block_path for s in plan.sites] == ["block", "other"]
    assert plan.untraced == {}
    assert list(plan.specialised) == ["block"]
    assert plan.specialised["block"].startswith("tests/test_tracing.py:")


def test_shape_dependent_block_is_kept_whole_without_an_example_input():
    plan = plan_stochastic_depth(Windowed(), 0.1)
    assert [s.block_path for s in plan.sites] == ["other"]
    assert list(plan.untraced) == ["block"]
    assert plan.specialised == {}


def test_specialised_block_is_exact_on_its_shapes():
    original = Windowed()
    retrofitted = apply_stochastic_depth(original, 0.1, example_inputs=TOKENS)
    assert verify(original, retrofitted, TOKENS).ok
    with torch.no_grad():  # batch size stays symbolic
        assert torch.equal(retrofitted.eval()(TOKENS[:1]), original.eval()(TOKENS[:1]))


def test_specialised_block_refuses_to_train_on_an_input_that_would_take_another_branch():
    retrofitted = apply_stochastic_depth(Windowed(), 0.1, example_inputs=TOKENS)
    with pytest.raises(AssertionError, match="sdsurgery specialised this block on its example input's shapes"):
        retrofitted.train()(torch.randn(2, 9, 8))


def test_specialised_block_in_eval_runs_its_own_code_on_another_shape():
    original = Windowed()
    retrofitted = apply_stochastic_depth(original, 0.1, example_inputs=TOKENS)
    other = torch.randn(2, 9, 8)
    with torch.no_grad():
        assert torch.equal(retrofitted.eval()(other), original.eval()(other))


class LenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        if len(x.shape) == 3:
            x = x.mean(1)
        return x + self.f(x)


def test_len_of_a_shape_traces_with_the_example_shapes():
    plan = plan_stochastic_depth(LenBlock(), 0.1, example_inputs=TOKENS)
    assert (len(plan.sites), plan.untraced, list(plan.specialised)) == (1, {}, [""])


def test_data_dependent_control_flow_is_never_specialised():
    plan = plan_stochastic_depth(NestedDataDependent(), 0.2, example_inputs=torch.ones(2, 8))
    assert plan.specialised == {}


# timm: registered leaves only where a module does not trace otherwise.


def test_timm_leaf_class_that_traces_is_traced_through():
    # NormFreeBlock is on timm's leaf list but traces: its residuals are found.
    plan = plan_stochastic_depth(timm.create_model("nf_regnet_b0"), 0.1)
    assert (len(plan.sites), plan.untraced, plan.specialised) == (16, {}, {})


def test_timm_leaf_residual_block_is_traced_with_concrete_shapes():
    # TinyVitBlock is on timm's leaf list; its forward branches on H == window_size.
    plan = plan_stochastic_depth(timm.create_model("tiny_vit_5m_224"), 0.1)
    assert (len(plan.sites), plan.num_blocks, plan.untraced) == (22, 12, {})
    assert sorted(plan.specialised) == sorted(
        f"stages.{s}.blocks.{b}" for s, n in ((1, 2), (2, 6), (3, 2)) for b in range(n)
    )


def test_timm_leaf_class_that_does_not_trace_is_kept_whole_by_class():
    plan = plan_stochastic_depth(timm.create_model("convit_tiny"), 0.1)
    assert sorted(plan.untraced) == sorted(f"blocks.{i}.attn" for i in range(10))
    assert all(why.startswith("timm registers GPSA as not traceable") for why in plan.untraced.values())
    assert len(plan.sites) == 24


# Tracing changes nothing in the model.


class CachingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.cache = {}
        self.last_shape = None

    def forward(self, x):
        self.cache["k"] = x * 2  # a cache filled during the forward
        self.last_shape = x.shape[-1]
        if self.last_shape == 8:
            return x + self.f(x)
        return x


def test_tracing_leaves_attributes_and_caches_as_they_were():
    model = nn.Sequential(CachingBlock())
    plan = plan_stochastic_depth(model, 0.1, example_inputs=X)
    assert len(plan.sites) == 1
    assert model[0].cache == {} and model[0].last_shape is None


class FrozenDict(OrderedDict):
    """A dict whose methods refuse changes, as diffusers' ``FrozenDict`` (a model's ``config``) does."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("You cannot change a FrozenDict instance.")

    update = pop = setdefault = __delitem__ = _refuse


class FrozenConfigNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = FrozenDict(width=8, layers=2)
        self.blocks = nn.Sequential(CachingBlock(), CachingBlock())

    def forward(self, x):
        return self.blocks(x)


def test_a_frozen_container_of_the_model_is_left_as_it_was():
    model = FrozenConfigNet()
    retrofitted = apply_stochastic_depth(model, 0.1, example_inputs=X, verify=False)
    assert list(model.config.items()) == [("width", 8), ("layers", 2)]
    assert [b.cache for b in model.blocks] == [{}, {}]  # control: the containers traced code fills are emptied
    assert verify(model, retrofitted, X).ok


def test_tracing_on_example_values_does_not_update_batch_norm_statistics():
    model = nn.Sequential(nn.BatchNorm1d(8), WindowBlockOnFlat())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_stochastic_depth(model.train(), 0.1, example_inputs=torch.randn(4, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class WindowBlockOnFlat(Residual):
    def forward(self, x):
        if x.shape[-1] == 8:
            return x + self.f(x)
        return x


# Users' own leaves and wrapped functions.


def flipped(x):
    return x.flip(1) if x.shape[1] > 1 else x


class CallsHelper(Residual):
    def forward(self, x):
        return x + self.f(flipped(x))


def test_autowrap_functions_keep_a_helper_as_one_call():
    plan = plan_stochastic_depth(CallsHelper(), 0.1, autowrap_functions=[flipped])
    assert (len(plan.sites), plan.untraced, plan.specialised) == (1, {}, {})


def test_leaf_modules_keep_a_class_opaque_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrofitted = apply_stochastic_depth(Windowed(), 0.1, leaf_modules=[WindowBlock])
    assert set(_rates(retrofitted)) == {"other.stochastic_depth"}


# A shared module registered near the root but called inside a block is rewritten first.


class Shared(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.shared = shared
        self.g = nn.Linear(8, 8)

    def forward(self, x):
        x = self.shared(x)
        return x + self.g(x)


class SharedEncoding(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoding = Residual()  # like CoaT's shared convolutional position encodings
        self.blocks = nn.Sequential(Shared(self.encoding), Shared(self.encoding))

    def forward(self, x):
        return self.blocks(x)


def test_shared_module_called_inside_blocks_gets_its_stochastic_depth_in_every_call():
    original = SharedEncoding()
    retrofitted = apply_stochastic_depth(original, 0.1, example_inputs=X)
    report = verify(original, retrofitted, X)
    assert report.ok
    assert sorted(c.module for c in report.sites) == [
        "blocks.0.stochastic_depth",
        "blocks.1.stochastic_depth",
        "encoding.stochastic_depth",
    ]


class ReassignsItsBuffer(nn.Module):
    """A model whose own forward moves a buffer (``self.table = self.table.to(x.dtype)``) and then does not
    trace (data-dependent control flow): its blocks are traced separately."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.ones(8))
        self.blocks = nn.Sequential(Residual(), Residual())

    def forward(self, x):
        self.table = self.table.to(x.dtype)
        x = x * self.table
        return self.blocks(x if x.sum() > 0 else -x)


def test_a_failed_trace_of_the_model_leaves_its_buffers_as_they_were():
    model = ReassignsItsBuffer()
    table = model.table
    plan = plan_stochastic_depth(model, 0.2, example_inputs=X)
    assert model.table is table  # not a proxy of the failed trace
    assert list(plan.untraced) == [""] and [s.block_path for s in plan.sites] == ["blocks.0", "blocks.1"]
    assert verify(model, _quiet_apply(model, 0.2, example_inputs=X), X).ok


class ClampsToItsDtype(nn.Module):
    """A residual block reading the range of its input's dtype in Python (attention-mask code does)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        limit = torch.finfo(x.dtype).max / 2
        return x + self.f(x).clamp(-limit, limit)


def test_dtype_ranges_trace_with_the_example_dtype_guarded():
    model = nn.Sequential(ClampsToItsDtype(), ClampsToItsDtype())
    retrofitted = apply_stochastic_depth(model, 0.2, example_inputs=X)
    assert isinstance(retrofitted[0], RetrofittedBlock) and verify(model, retrofitted, X).ok
    with pytest.raises(AssertionError, match=r"specialised this block .* \(.*: dtype was torch.float32\)"):
        retrofitted.double().train()(X.double())


class MasksWithOnes(nn.Module):
    """A residual block making a tensor of the input's sizes, read one by one from its shape (mask code does)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        batch, length, _ = x.shape
        mask = torch.ones(batch, length, 1, device=x.device)
        return x + self.f(x) * mask


def test_a_tensor_sized_from_the_input_shape_traces_and_follows_other_sizes():
    model = nn.Sequential(MasksWithOnes(), MasksWithOnes())
    retrofitted = apply_stochastic_depth(model, 0.0, example_inputs=TOKENS)  # rate 0: training runs the graphs as is
    assert [isinstance(m, RetrofittedBlock) for m in retrofitted] == [True, True]
    other = torch.randn(3, 7, 8)  # the graphs read the sizes, they did not keep the example's
    with torch.no_grad():
        assert torch.equal(retrofitted.train()(other), model.train()(other))


class Shelf:
    """An object layers leave values on for later layers (Gemma 4 shares keys and values between layers)."""

    def __init__(self):
        self.items = {}

    def __setitem__(self, key, value):
        self.items[key] = value

    def __getitem__(self, key):
        return self.items[key]


class SharesThroughAShelf(nn.Module):
    def __init__(self, writes: bool):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.writes = writes

    def forward(self, x, shelf):
        if self.writes:
            shelf["kv"] = self.f(x)
        return x + shelf["kv"] * self.f(x)


class SharingLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([SharesThroughAShelf(True), SharesThroughAShelf(False)])

    def forward(self, x):
        shelf = Shelf()
        for layer in self.layers:
            x = layer(x, shelf)
        return x, shelf  # an object no graph holds: the model's own forward is kept, its layers are traced


def test_a_layer_storing_into_an_object_argument_stores_in_training_too():
    model = SharingLayers()
    retrofitted = apply_stochastic_depth(model, 0.0, example_inputs=X)
    assert [isinstance(m, RetrofittedBlock) for m in retrofitted.layers] == [True, True]
    with torch.no_grad():
        expected, actual = model.train()(X), retrofitted.train()(X)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1]["kv"], expected[1]["kv"])


class CachedPositions(nn.Module):
    """Position values cached by length (transformers caches position embeddings with ``lru_cache``)."""

    @functools.lru_cache(maxsize=1)  # noqa: B019 - the pattern under test
    def forward(self, length):
        return torch.arange(length, dtype=torch.float32)


class WithCachedPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)
        self.positions = CachedPositions()

    def forward(self, x):
        return x + self.f(x) * self.positions(x.shape[1])[None, :, None]


def test_planning_leaves_no_value_of_its_runs_in_a_method_cache():
    # Running the model on fake tensors (to learn how its blocks are called) fills the cache with a fake tensor;
    # the model would return it from then on.
    model = WithCachedPositions()
    plan_stochastic_depth(model, 0.2, example_inputs=TOKENS)
    output = model(TOKENS)
    assert type(output) is torch.Tensor
    assert torch.equal(output, TOKENS + model.f(TOKENS) * torch.arange(16.0)[None, :, None])
