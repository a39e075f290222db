"""DistributedDataParallel: two gloo processes on localhost train a retrofitted model in every mode with
DDP's defaults (find_unused_parameters=False); parameters stay identical across ranks, and in batch mode
every rank skips the same blocks.

Batch mode needs no find_unused_parameters: a dropped branch still gives its parameters (zero) gradients,
so every parameter is reduced in every step. All ranks skip the same blocks when the drop generator has
the same seed on each: it is seeded from torch.initial_seed() at surgery (same on ranks that called
torch.manual_seed with one seed), or by sdsurgery.seed_block_drops(model, seed)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sdsurgery import apply_stochastic_depth
from tiny_residual_models import ConvNet

MODES = ("row", "batch", "subset")
WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
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
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            runs = [None] * world
            dist.all_gather_object(runs, ran)
            results[mode] = {
                "same_parameters": all(torch.equal(gathered[0], g) for g in gathered),
                "same_blocks_ran": all(r == runs[0] for r in runs),
                "branch_calls": len(ran),
            }
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_train, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)
    with open(os.path.join(out_dir, "rank0.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("mode", MODES)
def test_parameters_stay_identical_across_ranks(trained, mode):
    assert trained[mode]["same_parameters"]


def test_batch_mode_skips_the_same_blocks_on_every_rank(trained):
    assert trained["batch"]["same_blocks_ran"]
    assert 0 < trained["batch"]["branch_calls"] < 4 * STEPS  # blocks were both run and skipped
