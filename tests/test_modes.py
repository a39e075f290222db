"""Batch and subset modes skip the work they drop; eval stays the original's, bit for bit.

batch: one draw per residual branch per step from a seeded CPU generator; a dropped branch is not run
(forward or backward), its parameters get zero gradients, the sum is the skip; a kept one is scaled 1/q.
subset: the branch runs on k = max(1, round(B (1 - p))) random rows, added back scaled by B / k.
"""

import copy
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

from sdsurgery import (
    SkippableBranch,
    StochasticDepth,
    apply_stochastic_depth,
    seed_block_drops,
    verify,
)
from sdsurgery.skipping import skippable_residual
from tiny_residual_models import ConvNet, MLPNet, tiny_vit

IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
SKIPPING = ["batch", "subset"]


def _retrofit(model, p_max, mode, example, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every site must be skippable: no fallback warning
        return apply_stochastic_depth(model, p_max, mode=mode, example_inputs=example, **kwargs)


def _calls(module: nn.Module) -> list[int]:
    """A list that grows by the batch size of each forward call of ``module``."""
    sizes: list[int] = []
    module.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes


def _keeps(seed: int, rates: list[float], steps: int = 1) -> list[bool]:
    """The keep decisions batch mode draws from a generator seeded with ``seed``, in call order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((), generator=generator).item() < 1 - p for _ in range(steps) for p in rates]


# --- eval and structure ---


@pytest.mark.parametrize("mode", SKIPPING)
@pytest.mark.parametrize("build,x", [(ConvNet, IMAGES), (tiny_vit, torch.randn(2, 3, 32, 32))], ids=["conv", "vit"])
def test_eval_is_bit_identical_and_the_verifier_passes(mode, build, x):
    torch.manual_seed(0)
    original = build()
    report = verify(original, _retrofit(original, 0.3, mode, x), x)
    assert report.ok, report.summary()
    assert report.eval_max_abs_diff == 0.0


@pytest.mark.parametrize("mode", SKIPPING)
def test_every_site_gets_a_skippable_branch_and_state_dict_keys_are_the_originals(mode):
    original = tiny_vit()
    retrofitted = _retrofit(original, 0.3, mode, torch.randn(2, 3, 32, 32))
    assert sum(isinstance(m, SkippableBranch) for m in retrofitted.modules()) == 4
    assert sum(isinstance(m, StochasticDepth) for m in retrofitted.modules()) == 4
    assert list(retrofitted.state_dict()) == list(original.state_dict())


@pytest.mark.parametrize("mode", SKIPPING)
def test_train_graph_calls_the_branch_and_eval_graph_keeps_the_site(mode):
    block = _retrofit(ConvNet(blocks=1), 0.3, mode, IMAGES).blocks[0]
    train, evaluate = (graph.python_code("self").src for graph in block.mode_graphs)
    assert "skippable_residual" in train and "conv1(" not in train
    assert "self.stochastic_depth(" in evaluate and "skippable_residual" not in evaluate


# --- batch mode ---


def test_batch_mode_runs_exactly_the_kept_blocks():
    model = _retrofit(ConvNet(blocks=4), 0.5, "batch", IMAGES, schedule="uniform").train()
    seed_block_drops(model, 1)
    keeps = _keeps(1, [0.5] * 4)
    assert set(keeps) == {True, False}  # the seed exercises both outcomes
    calls = [_calls(block.conv1) for block in model.blocks]
    model(IMAGES).sum().backward()
    assert [len(c) for c in calls] == [int(k) for k in keeps]


def test_batch_mode_gives_dropped_blocks_zero_gradients_and_kept_blocks_real_ones():
    model = _retrofit(ConvNet(blocks=4), 0.5, "batch", IMAGES, schedule="uniform").train()
    seed_block_drops(model, 1)
    keeps = _keeps(1, [0.5] * 4)
    model(IMAGES).sum().backward()
    for block, kept in zip(model.blocks, keeps):
        grad = block.conv1.weight.grad
        assert grad is not None  # zero, not None: DDP needs no find_unused_parameters
        assert bool(grad.abs().sum() > 0) == kept


def test_batch_mode_dropped_branch_returns_the_skip_and_kept_branch_is_scaled_by_1_over_q():
    model = _retrofit(MLPNet(blocks=1), 0.25, "batch", torch.randn(2, 6)).train()
    block = model.blocks[0]
    x = torch.randn(5, 6)
    seed_block_drops(model, 0)
    keeps = _keeps(0, [0.25], steps=8)
    assert set(keeps) == {True, False}
    with torch.no_grad():
        expected_kept = x + block.fc2(torch.relu(block.fc1(x))) / 0.75
        for kept in keeps:
            out = model(x)
            if kept:
                torch.testing.assert_close(out, expected_kept)
            else:
                assert torch.equal(out, x)


def test_batch_mode_with_inplace_relu_after_the_add_leaves_the_skip_untouched():
    # torchvision's BasicBlock does `out += identity; out = self.relu(out)` with ReLU(inplace=True).
    original = nn.Sequential(*[torchvision.models.resnet.BasicBlock(8, 8) for _ in range(3)])
    model = _retrofit(original, 0.5, "batch", torch.randn(2, 8, 8, 8), schedule="uniform").train()
    seed_block_drops(model, 1)
    assert not all(_keeps(1, [0.5] * 3))
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    before = x.detach().clone()
    model(x).sum().backward()
    assert torch.equal(x.detach(), before)


def test_seeding_the_drops_makes_batch_mode_reproducible():
    model = _retrofit(ConvNet(blocks=4), 0.5, "batch", IMAGES, schedule="uniform").train()
    twin = copy.deepcopy(model)
    outputs = []
    for m in (model, twin):
        seed_block_drops(m, 11)
        outputs.append([m(IMAGES) for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


@pytest.mark.parametrize("mode", SKIPPING)
def test_the_branch_calls_a_submodule_replaced_after_surgery(mode):
    # e.g. nn.SyncBatchNorm.convert_sync_batchnorm swaps BatchNorm modules in place after surgery
    model = _retrofit(ConvNet(blocks=1), 0.0, mode, IMAGES).train()
    block = model.blocks[0]
    block.bn1 = nn.BatchNorm2d(8)
    calls = _calls(block.bn1)
    model(IMAGES)
    assert calls == [4]


# --- subset mode ---


@pytest.mark.parametrize("batch,p,kept", [(10, 0.3, 7), (8, 0.5, 4), (3, 0.9, 1)])
def test_subset_mode_runs_the_branch_on_k_rows(batch, p, kept):
    model = _retrofit(MLPNet(blocks=1), p, "subset", torch.randn(2, 6)).train()
    calls = _calls(model.blocks[0].fc1)
    model(torch.randn(batch, 6))
    assert calls == [kept]


def test_subset_mode_adds_the_branch_to_k_rows_scaled_by_b_over_k_and_leaves_the_others():
    model = _retrofit(MLPNet(blocks=1), 0.3, "subset", torch.randn(2, 6)).train()
    block, x = model.blocks[0], torch.randn(10, 6)
    with torch.no_grad():
        out = model(x)
        untouched = (out == x).all(1)
        assert int(untouched.sum()) == 3
        expected = x[~untouched] + block.fc2(torch.relu(block.fc1(x[~untouched]))) * (10 / 7)
    torch.testing.assert_close(out[~untouched], expected)


def test_subset_mode_sends_gradients_only_through_the_kept_rows():
    model = _retrofit(MLPNet(blocks=1), 0.5, "subset", torch.randn(2, 6)).train()
    x = torch.randn(8, 6, requires_grad=True)
    out = model(x)
    out.sum().backward()
    dropped = (out == x).all(1)
    assert torch.equal(x.grad[dropped], torch.ones(4, 6))  # the skip's gradient only


# --- no host synchronisation ---


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_train_step_reads_no_device_value_on_the_host(mode):
    # On the meta device every .item() / bool(tensor) raises: a step that runs there never waits on the device.
    model = apply_stochastic_depth(ConvNet(), 0.5, mode=mode, example_inputs=IMAGES).to("meta").train()
    model(torch.randn(8, 3, 16, 16, device="meta")).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_cuda_train_step_does_not_synchronise(mode):
    model = apply_stochastic_depth(ConvNet(), 0.5, mode=mode, example_inputs=IMAGES).cuda().train()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    model(x).sum().backward()  # warm-up: allocator and kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- copies, re-application, fallbacks ---


@pytest.mark.parametrize("mode", SKIPPING)
def test_deepcopy_and_pickle_keep_skipping(mode):
    model = _retrofit(ConvNet(), 0.3, mode, IMAGES)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        expected = model.eval()(IMAGES)
        for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            assert torch.equal(clone.eval()(IMAGES), expected)
            train = clone.blocks[0].mode_graphs[0]
            assert any(node.target is skippable_residual for node in train.nodes)


@pytest.mark.parametrize("mode", SKIPPING)
def test_re_applying_re_rates_instead_of_stacking(mode):
    original = ConvNet()
    twice = _retrofit(_retrofit(original, 0.2, mode, IMAGES), 0.5, mode, IMAGES, schedule="uniform")
    assert [m.p for m in twice.modules() if isinstance(m, StochasticDepth)] == [0.5] * 3
    assert sum(isinstance(m, SkippableBranch) for m in twice.modules()) == 3
    assert verify(original, twice, IMAGES).ok


class SharesBatchSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        b = x.shape[0]
        y = x + self.fc(x).reshape(b, 6)
        return y.reshape(b, -1)  # the batch size is also used outside the branch


def test_subset_falls_back_to_row_with_a_warning_when_the_branch_reads_the_batch_size_from_outside():
    with pytest.warns(UserWarning, match="row mode instead.*computed from a tensor shape"):
        model = apply_stochastic_depth(SharesBatchSize(), 0.3, mode="subset", example_inputs=torch.randn(2, 6))
    assert model.stochastic_depth.mode == "row"
    assert not any(isinstance(m, SkippableBranch) for m in model.modules())
    assert model.train()(torch.randn(8, 6)).shape == (8, 6)


class ReturnsBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        b = self.fc(x)
        return x + b, b


def test_batch_falls_back_to_the_masked_draw_when_the_branch_output_is_used_elsewhere():
    with pytest.warns(UserWarning, match="computed and masked.*also used outside the branch"):
        model = apply_stochastic_depth(ReturnsBranch(), 0.3, mode="batch", example_inputs=torch.randn(2, 6))
    assert model.stochastic_depth.mode == "batch"
    assert not any(isinstance(m, SkippableBranch) for m in model.modules())
