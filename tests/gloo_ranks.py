"""Run a training function on each rank of a gloo process group on the CPU, for the distributed tests."""

import json
import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Train = Callable[[int, int], dict]


def run_on_gloo_ranks(train: Train, world: int, out_dir: str) -> list[dict]:
    """Call ``train(rank, world)`` in ``world`` spawned processes that share one gloo process group; return
    what each rank returned (JSON-serialisable), in rank order. ``train`` must be a module-level function."""
    mp.spawn(_run_rank, args=(train, world, out_dir), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def same_on_every_rank(value: object) -> bool:
    """Whether every rank of the current group holds an equal ``value`` (a collective: all ranks call it)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


def _run_rank(rank: int, train: Train, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous, not a TCP store: no port to race for, and no store server that lives only as long
    # as rank 0, whose exit aborts a rank still shutting down.
    store = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    try:
        results = train(rank, world)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
