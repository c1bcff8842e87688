"""SyncBatchNorm across processes: step time against local BatchNorm and torch's SyncBatchNorm.

    python benchmarks/bench_sync.py                  # CPU, gloo, 2 and 4 processes
    python benchmarks/bench_sync.py --device cuda    # GPU: NCCL with a GPU per rank, else gloo

Every rank times forward + backward of torch's BatchNorm on its local batch (the baseline), of
rethinkbn's SyncBatchNorm and, where it runs (CUDA tensors only), of ``torch.nn.SyncBatchNorm``
on the same batch, interleaved, after several warm-up steps; rank 0 reports the median. On CUDA
the steps are timed with CUDA events, on CPU with the wall clock (the ranks wait for each other,
which is part of the cost). What runs where is printed, never chosen silently: with fewer GPUs
than ranks the ranks share the GPUs and use gloo with CUDA tensors (NCCL cannot put two ranks on
one GPU), which measures gloo's device-host copies, not NCCL.

Bytes per rank and step are computed from the tensor sizes, for a ring all_reduce
(``2 (W-1)/W`` of the payload sent per rank) and a ring all_gather (``(W-1)`` chunks per rank):

* ours: forward all_reduce of ``3C`` float64 moments (plus a 5-number layout header), backward
  all_reduce of ``2C`` float32 sums;
* the all_gather design (torch.nn.SyncBatchNorm): forward all_gather of every rank's
  ``(mean, invstd, count)`` in float32 (``2C + 1``), backward all_reduce of ``2C`` float32 sums.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.distributed.launch import end_process_group, launch

# (per-rank shape, dtype, channels_last): a ResNet-50 stage-1 BN on GPU, a small one on CPU.
GPU_CASES = [
    ((32, 256, 56, 56), "float32", False),
    ((32, 256, 56, 56), "float16", False),
    ((32, 256, 56, 56), "float32", True),
    ((32, 256, 56, 56), "float16", True),
    ((64, 1024, 14, 14), "float16", True),
]
CPU_CASES = [((32, 64, 16, 16), "float32", False), ((32, 64, 16, 16), "float32", True)]
WARMUP, REPEATS, STEPS = 5, 11, 3


def ring_all_reduce(payload: int, world: int) -> float:
    return 2 * (world - 1) / world * payload


def ours_bytes(channels: int, world: int) -> float:
    forward = (3 * channels + 5) * 8
    return ring_all_reduce(forward, world) + ring_all_reduce(2 * channels * 4, world)


def all_gather_design_bytes(channels: int, world: int) -> float:
    return (world - 1) * (2 * channels + 1) * 4 + ring_all_reduce(2 * channels * 4, world)


def backend_for(device: str, world: int) -> str:
    if device == "cuda" and torch.cuda.device_count() >= world:
        return "nccl"
    return "gloo"


class Timer:
    """Seconds of ``fn()``: CUDA events on the GPU, the wall clock on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self, fn: Callable[[], None], steps: int) -> float:
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            return (time.perf_counter() - start) / steps
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000 / steps


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer(x.detach().requires_grad_()).backward(dy)

    return run


def worker(device_kind: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    cuda = device_kind == "cuda"
    backend = backend_for(device_kind, world)
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    torch.set_num_threads(1)
    torch.manual_seed(dist.get_rank())
    timer = Timer(cuda)
    rows = []
    for shape, dtype_name, channels_last in GPU_CASES if cuda else CPU_CASES:
        dtype = getattr(torch, dtype_name)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        dy = torch.randn_like(x)
        channels = shape[1]
        layers: dict[str, nn.Module] = {"local": nn.BatchNorm2d(channels),
                                        "ours": SyncBatchNorm(channels)}
        if cuda:
            layers["torch"] = nn.SyncBatchNorm(channels)
        layers = {k: v.to(device) for k, v in layers.items()}
        times: dict[str, list[float]] = {k: [] for k in layers}
        errors: dict[str, str] = {}

        for name, layer in list(layers.items()):
            try:
                for _ in range(WARMUP):
                    step(layer, x, dy)()
            except RuntimeError as exc:  # torch's SyncBatchNorm on a backend it does not take
                errors[name] = str(exc).splitlines()[0][:120]
                del layers[name]
        for _ in range(REPEATS):
            for name, layer in layers.items():
                dist.barrier()
                times[name].append(timer(step(layer, x, dy), STEPS))
        rows.append({"shape": shape, "dtype": dtype_name, "channels_last": channels_last,
                     "median": {k: statistics.median(v) for k, v in times.items() if v},
                     "errors": errors})
    if dist.get_rank() == 0:
        print(json.dumps({"backend": backend, "rows": rows}))
    end_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_sync: --device cuda but no CUDA device here; skipped")
        return
    worlds = (2,) if args.device == "cuda" else (2, 4)
    timing = "CUDA events" if args.device == "cuda" else "wall clock"
    print(f"SyncBatchNorm forward+backward, {timing}, median of {REPEATS} x {STEPS} steps after "
          f"{WARMUP} warm-up steps, one thread per process.\n")
    for world in worlds:
        backend = backend_for(args.device, world)
        if args.device == "cuda" and backend == "gloo":
            print(f"NOTE: {torch.cuda.device_count()} GPU(s) for {world} ranks: the ranks share "
                  "them over gloo with CUDA tensors (NCCL needs one GPU per rank); these "
                  "numbers measure gloo's device-host copies, not NCCL.\n")
        rank0 = launch(Path(__file__), world, ["--worker", args.device], timeout_s=300)[0]
        result = json.loads(rank0.strip().splitlines()[-1])
        print(f"### {world} processes, {args.device}, {result['backend']}\n")
        print("| per-rank shape | dtype | channels_last | ours / local BatchNorm | "
              "ours / torch.nn.SyncBatchNorm | ours ms |")
        print("|---|---|---|---:|---:|---:|")
        for row in result["rows"]:
            t = row["median"]
            torch_cell = (f"{t['ours'] / t['torch']:.2f}" if "torch" in t else
                          row["errors"].get("torch", "(CUDA only)"))
            print(f"| {tuple(row['shape'])} | {row['dtype']} | {row['channels_last']} | "
                  f"{t['ours'] / t['local']:.2f} | {torch_cell} | {t['ours'] * 1e3:.2f} |",
                  flush=True)
        print()
    channels = (GPU_CASES if args.device == "cuda" else CPU_CASES)[0][0][1]
    print(f"Bytes sent per rank per training step ({channels} channels):\n")
    print("| processes | ours (2 all_reduce) | all_gather design | ours / all_gather |")
    print("|---:|---:|---:|---:|")
    for world in (*worlds, 8, 64):
        ours, gather = ours_bytes(channels, world), all_gather_design_bytes(channels, world)
        print(f"| {world} | {ours:.0f} | {gather:.0f} | {ours / gather:.2f} |")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main()
