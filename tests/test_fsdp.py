"""FSDP2 (torch.distributed.fsdp.fully_shard on each retrofitted block, then on the model) with two gloo
processes on CPU: at rate 0 sharded training equals unsharded training on the whole batch (a positive
control that sharding sees the retrofitted blocks' parameters), and at rate 0.5 every mode trains; in batch
mode every rank skips the same blocks and dropped blocks still get (zero) gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks, same_on_every_rank
from sdsurgery import RetrofittedBlock, apply_stochastic_depth, set_drop_rates
from tiny_residual_models import MLPNet

MODES = ("row", "batch", "subset")
WORLD = 2
STEPS = 4


def _batches(world: int):
    data = torch.Generator().manual_seed(100)
    return [
        (torch.randn(8 * world, 6, generator=data), torch.randint(0, 6, (8 * world,), generator=data))
        for _ in range(STEPS)
    ]


def _step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _train(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    results = {}
    for mode in MODES:
        for p_max in (0.0, 0.5):
            torch.manual_seed(0)  # same weights and the same drop seed on every rank
            model = apply_stochastic_depth(MLPNet(blocks=4, width=6), 0.5, mode=mode, example_inputs=torch.randn(2, 6))
            set_drop_rates(model, p_max, schedule="uniform")
            reference = copy.deepcopy(model)
            ran = []  # which blocks computed their branch, step by step
            for i, block in enumerate(model.blocks):
                block.fc1.register_forward_hook(lambda *args, i=i, ran=ran: ran.append(i))
            for block in model.blocks:
                assert isinstance(block, RetrofittedBlock)
                fully_shard(block)
            fully_shard(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
            before = [p.detach().clone() for p in reference.parameters()]
            for x, y in _batches(world):
                rows = slice(8 * rank, 8 * (rank + 1))
                _step(model, optimizer, x[rows], y[rows])
                if p_max == 0.0:
                    _step(reference, reference_optimizer, x, y)
            full = [p.full_tensor().detach() for p in model.parameters()]
            results[f"{mode}-{p_max}"] = {
                "equals_unsharded": p_max == 0.0
                and all(torch.allclose(f, r, rtol=1e-5, atol=1e-6) for f, r in zip(full, reference.parameters())),
                "trained": all(not torch.equal(f, b) for f, b in zip(full, before)),
                "same_blocks_ran": same_on_every_rank(ran),
                "branch_calls": len(ran),
            }
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_on_gloo_ranks(_train, WORLD, str(tmp_path_factory.mktemp("fsdp")))[0]


@pytest.mark.parametrize("mode", MODES)
def test_sharded_training_at_rate_zero_equals_unsharded_training_on_the_whole_batch(trained, mode):
    assert trained[f"{mode}-0.0"]["equals_unsharded"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_sharded(trained, mode):
    assert trained[f"{mode}-0.5"]["trained"]


def test_batch_mode_skips_the_same_blocks_on_every_rank(trained):
    assert trained["batch-0.5"]["same_blocks_ran"]
    assert 0 < trained["batch-0.5"]["branch_calls"] < 4 * STEPS  # blocks were both run and skipped
