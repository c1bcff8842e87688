"""Shuffling a batch across gloo processes: all_to_all (ours) against an all_gather shuffle.

    python benchmarks/bench_shuffle.py

For 2 and 4 processes (one thread each), every rank shuffles its local batch across the ranks and
unshuffles it back (one round trip, no autograd), with

* ours: :class:`rethinkbn.distributed.ShufflePlan` (one all_to_all_single per direction, each
  sample sent once, to its destination);
* the all_gather shuffle (MoCo's ``_batch_shuffle_ddp``): all_gather the whole batch on every
  rank, take this rank's share of the permuted batch; unshuffle by all_gather again.

Rank 0 reports the median time ratio. Bytes sent per rank per round trip come from the tensor
sizes: ours sends the samples that leave the rank (exactly, from the plan), the ring all_gather
sends ``W - 1`` local batches per rank and direction.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from rethinkbn.distributed import ShufflePlan, shuffle_permutation
from rethinkbn.distributed.launch import end_process_group, launch

SHAPE = (32, 3, 32, 32)  # per rank: a batch of small images, float32
WORLD_SIZES = (2, 4)
REPEATS, STEPS = 11, 3


def gather_shuffle(x: Tensor, perm: Tensor, rank: int, world: int) -> Tensor:
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    n = x.size(0)
    return torch.cat(gathered)[perm[rank * n: (rank + 1) * n]]


def worker() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(SHAPE)
    sizes = [SHAPE[0]] * world
    leaving = 0

    def ours(step: int) -> Tensor:
        nonlocal leaving
        plan = ShufflePlan.across_ranks(SHAPE[0], seed=0, step=step, sizes=sizes)
        leaving = SHAPE[0] - plan.route.send_counts[rank]
        return plan.unshuffle(plan.shuffle(x))

    def all_gather(step: int) -> Tensor:
        perm = shuffle_permutation(SHAPE[0] * world, 0, step)
        y = gather_shuffle(x, perm, rank, world)
        return gather_shuffle(y, torch.argsort(perm), rank, world)

    methods = {"all_to_all": ours, "all_gather": all_gather}
    for step in range(2):
        assert torch.equal(ours(step), x) and torch.equal(all_gather(step), x)
    times: dict[str, list[float]] = {name: [] for name in methods}
    sent = {"all_to_all": [], "all_gather": []}
    sample_bytes = x[0].numel() * x.element_size()
    for rep in range(REPEATS):
        for name, fn in methods.items():
            dist.barrier()
            start = time.perf_counter()
            for step in range(STEPS):
                fn(rep * STEPS + step)
            times[name].append((time.perf_counter() - start) / STEPS)
        sent["all_to_all"].append(2 * leaving * sample_bytes)
        sent["all_gather"].append(2 * (world - 1) * SHAPE[0] * sample_bytes)
    if rank == 0:
        print(json.dumps({
            "time": {k: statistics.median(v) for k, v in times.items()},
            "bytes": {k: statistics.mean(v) for k, v in sent.items()},
        }))
    end_process_group()


def main() -> None:
    print(f"Per-rank batch {SHAPE} float32, gloo on CPU, one thread per process; shuffle + "
          f"unshuffle round trip, median of {REPEATS} x {STEPS}.\n")
    print("| processes | time all_to_all / all_gather | bytes sent per rank: all_to_all | "
          "all_gather | bytes ratio |")
    print("|---:|---:|---:|---:|---:|")
    for world in WORLD_SIZES:
        rank0 = launch(Path(__file__), world, ["--worker"], timeout_s=120)[0]
        r = json.loads(rank0.strip().splitlines()[-1])
        t, b = r["time"], r["bytes"]
        print(f"| {world} | {t['all_to_all'] / t['all_gather']:.2f} | "
              f"{b['all_to_all'] / 1e6:.2f} MB | {b['all_gather'] / 1e6:.2f} MB | "
              f"{b['all_to_all'] / b['all_gather']:.2f} |", flush=True)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
