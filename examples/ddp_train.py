"""Train a small CNN with DDP on CPU (gloo), with rethinkbn's SyncBatchNorm and PreciseBN.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 3

Every rank draws its own shard of a synthetic image task (class = which quadrant holds a bright
blob), the model's BatchNorm layers become :class:`rethinkbn.SyncBatchNorm` (normalized over the
batches of all ranks; ``--group-size k`` syncs within groups of ``k`` ranks instead), DDP averages
the gradients, and after training :func:`rethinkbn.population.precise_bn` replaces the EMA
statistics by population statistics pooled over every rank's data. The script checks that every
rank ends with identical BatchNorm statistics and exits non-zero otherwise.

Runs with gloo on CPU; with ``--device cuda`` (one GPU per rank) it uses NCCL.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rethinkbn import SyncBatchNorm, to_sync_bn
from rethinkbn.distributed.launch import end_process_group
from rethinkbn.population import precise_bn


def make_data(num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` 1x16x16 images: noise plus a blob in quadrant ``label`` (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (num,), generator=g)
    images = torch.randn(num, 1, 16, 16, generator=g) * 0.5
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, 8 * row + 2: 8 * row + 6, 8 * col + 2: 8 * col + 6] += 2.0
    return images, labels


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def bn_stats_identical_on_every_rank(model: nn.Module) -> bool:
    """All-gather every BatchNorm buffer and compare it bit for bit with rank 0's."""
    flat = torch.cat([
        torch.cat([m.running_mean, m.running_var]) for m in model.modules()
        if isinstance(m, SyncBatchNorm)
    ])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def train_and_check(args: argparse.Namespace, device: torch.device) -> bool:
    """Train with DDP, run PreciseBN, and say whether every rank ends with the same statistics.

    Everything that holds the process group (DDP's reducer, the SyncBatchNorm layers) is freed
    when this returns, before ``main`` ends the group.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    images, labels = make_data(args.batch_size * (args.steps + args.precise_batches), seed=rank)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = to_sync_bn(make_model(), group_size=args.group_size).to(device)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    batches = list(zip(images.split(args.batch_size), labels.split(args.batch_size), strict=True))
    for step, (x, y) in enumerate(batches[: args.steps]):
        loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    held_out = [x.to(device) for x, _ in batches[args.steps:]]
    report = precise_bn(ddp, held_out, num_samples=None, num_batches=len(held_out),
                        progress=False)
    identical = bn_stats_identical_on_every_rank(model)
    if rank == 0:
        print(report)
        verdict = "identical" if identical else "DIFFERENT"
        print(f"precise_bn: BatchNorm statistics {verdict} on {world} ranks", flush=True)
    return identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--precise-batches", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(1)
    try:
        identical = train_and_check(args, device)
    except BaseException:
        dist.destroy_process_group()
        raise
    # every rank done with its collectives before the group goes, and no tensor left for a gloo
    # worker thread to free while the interpreter shuts down (see end_process_group)
    end_process_group()
    if not identical:  # the same on every rank: the check all-gathers
        raise SystemExit(1)


if __name__ == "__main__":
    main()
