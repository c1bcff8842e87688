"""SyncBatchNorm across gloo processes on CPU: step time against local BatchNorm, and bytes.

    python benchmarks/bench_sync.py

For 2 and 4 processes (one thread each), every rank times forward + backward of torch's
BatchNorm2d on its local batch (the baseline) and of rethinkbn's SyncBatchNorm on the same batch,
interleaved, and rank 0 reports the median ratio. Bytes per rank and step are computed from the
tensor sizes, for a ring all_reduce (``2 (W-1)/W`` of the payload sent per rank) and a ring
all_gather (``(W-1)`` chunks sent per rank):

* ours: forward all_reduce of ``3C`` float64 moments, backward all_reduce of ``2C`` float32 sums;
* the all_gather design (torch.nn.SyncBatchNorm): forward all_gather of every rank's
  ``(mean, invstd, count)`` in float32 (``2C + 1``), backward all_reduce of ``2C`` float32 sums.

With one GPU per process available, the ranks run on CUDA with NCCL instead, and torch's own
SyncBatchNorm (GPU only) is timed too: ours / torch's, target not slower.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rethinkbn.distributed import SyncBatchNorm
from rethinkbn_studies.processes import launch

SHAPE = (32, 64, 16, 16)  # per rank: N, C, H, W
WORLD_SIZES = (2, 4)
REPEATS, STEPS = 11, 3


def ring_all_reduce(payload: int, world: int) -> float:
    return 2 * (world - 1) / world * payload


def ours_bytes(channels: int, world: int) -> float:
    return ring_all_reduce(3 * channels * 8, world) + ring_all_reduce(2 * channels * 4, world)


def all_gather_design_bytes(channels: int, world: int) -> float:
    return (world - 1) * (2 * channels + 1) * 4 + ring_all_reduce(2 * channels * 4, world)


def use_gpus(world: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def worker() -> None:
    cuda = use_gpus(int(os.environ["WORLD_SIZE"]))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    torch.manual_seed(dist.get_rank())
    x, dy = torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)
    layers = {"local": nn.BatchNorm2d(SHAPE[1]), "sync": SyncBatchNorm(SHAPE[1])}
    if cuda:
        layers["torch_sync"] = nn.SyncBatchNorm(SHAPE[1])
    layers = {name: layer.to(device) for name, layer in layers.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}

    def step(layer: nn.Module) -> None:
        xr = x.clone().requires_grad_()
        layer(xr).backward(dy)
        if cuda:
            torch.cuda.synchronize()

    for layer in layers.values():
        step(layer)  # warm-up
    for _ in range(REPEATS):
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(STEPS):
                step(layer)
            times[name].append((time.perf_counter() - start) / STEPS)
    if dist.get_rank() == 0:
        print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
    dist.destroy_process_group()


def main() -> None:
    channels = SHAPE[1]
    print(f"Per-rank batch {SHAPE} float32, one thread per process; "
          f"median of {REPEATS} x {STEPS} forward+backward steps.\n")
    print("| processes | device | SyncBatchNorm step / local BatchNorm2d step | "
          "ours / torch.nn.SyncBatchNorm |")
    print("|---:|---|---:|---:|")
    for world in WORLD_SIZES:
        rank0 = launch(Path(__file__), world, ["--worker"], timeout_s=120)[0]
        t = json.loads(rank0.strip().splitlines()[-1])
        versus_torch = f"{t['sync'] / t['torch_sync']:.2f}" if "torch_sync" in t else "(GPU only)"
        device = "cuda/nccl" if use_gpus(world) else "cpu/gloo"
        print(f"| {world} | {device} | {t['sync'] / t['local']:.2f} | {versus_torch} |",
              flush=True)
    print(f"\nBytes sent per rank per training step ({channels} channels):\n")
    print("| processes | ours (2 all_reduce) | all_gather design | ours / all_gather |")
    print("|---:|---:|---:|---:|")
    for world in (*WORLD_SIZES, 8, 64):
        ours, gather = ours_bytes(channels, world), all_gather_design_bytes(channels, world)
        print(f"| {world} | {ours:.0f} | {gather:.0f} | {ours / gather:.2f} |")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
