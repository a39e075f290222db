"""DistributedDataParallel: two gloo processes on localhost train a retrofitted model in every mode with
DDP's defaults (find_unused_parameters=False); parameters stay identical across ranks, and in batch mode
every rank skips the same blocks.

Batch mode needs no find_unused_parameters: a dropped branch still gives its parameters (zero) gradients,
so every parameter is reduced in every step. All ranks skip the same blocks when the drop generator has
the same seed on each: it is seeded from torch.initial_seed() at surgery (same on ranks that called
torch.manual_seed with one seed), or by sdsurgery.seed_block_drops(model, seed)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gloo_ranks import run_on_gloo_ranks, same_on_every_rank
from sdsurgery import apply_stochastic_depth
from tiny_residual_models import ConvNet

MODES = ("row", "batch", "subset")
WORLD = 2
STEPS = 4


def _train(rank: int, world: int) -> dict:
    results = {}
    for mode in MODES:
        torch.manual_seed(0)  # same weights and the same drop seed on every rank
        model = apply_stochastic_depth(
            ConvNet(blocks=4, channels=4),
            0.5,
            mode=mode,
            schedule="uniform",
            example_inputs=torch.randn(2, 3, 8, 8),
        )
        ran = []  # which blocks computed their branch, step by step
        for i, block in enumerate(model.blocks):
            block.conv1.register_forward_hook(lambda *args, i=i, ran=ran: ran.append(i))
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for _ in range(STEPS):
            x, y = torch.randn(8, 3, 8, 8, generator=data), torch.randint(0, 10, (8,), generator=data)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[mode] = {
            "same_parameters": same_on_every_rank(flat.tolist()),
            "same_blocks_ran": same_on_every_rank(ran),
            "branch_calls": len(ran),
        }
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return run_on_gloo_ranks(_train, WORLD, str(tmp_path_factory.mktemp("ddp")))[0]


@pytest.mark.parametrize("mode", MODES)
def test_parameters_stay_identical_across_ranks(trained, mode):
    assert trained[mode]["same_parameters"]


def test_batch_mode_skips_the_same_blocks_on_every_rank(trained):
    assert trained["batch"]["same_blocks_ran"]
    assert 0 < trained["batch"]["branch_calls"] < 4 * STEPS  # blocks were both run and skipped
