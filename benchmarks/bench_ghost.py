"""Ghost BatchNorm forward+backward time relative to torch's BatchNorm, per normalization size.

    python benchmarks/bench_ghost.py            # the issue's shapes (under a minute)
    python benchmarks/bench_ghost.py --quick    # batch sizes / 4 (a few seconds)

For every shape and NBS it prints ``time(candidate) / time(torch BatchNorm)`` (target <= 1.05)
for GhostBatchNorm with contiguous and with strided groups, and for the Python loop over groups
that composer and timm use (``torch.cat([bn(chunk) for chunk in x.split(nbs)])``). Each ratio is
the median over back-to-back pairs of calls, in training mode (running statistics updated), on
one thread, timed with the process's CPU time (``time.process_time``): on a machine shared with
other jobs, wall-clock time mostly measures the scheduler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from rethinkbn.layers import GhostBatchNorm
from rethinkbn_studies.processes import cpu_threads

SHAPES = [(256, 64, 16, 16), (128, 256, 8, 8), (1024, 64, 40)]
NBS = [2, 4, 32, None]
TORCH_BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class LoopGhostBatchNorm(nn.Module):
    """Ghost BN the way composer/timm write it: one torch BatchNorm call per group."""

    def __init__(self, bn: nn.Module, norm_batch_size: int | None) -> None:
        super().__init__()
        self.bn, self.norm_batch_size = bn, norm_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_batch_size is None:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.split(self.norm_batch_size)])


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).backward(grad)

    return run


Step = Callable[[], None]


def paired_ratio(candidate: Step, baseline: Step, repeats: int) -> float:
    """Median over repeats of ``time(candidate) / time(baseline)``, the two run back to back."""
    for fn in (candidate, baseline, candidate, baseline):
        fn()
    ratios = []
    for _ in range(repeats):
        elapsed = []
        for fn in (candidate, baseline):
            start = time.process_time()
            fn()
            elapsed.append(time.process_time() - start)
        ratios.append(elapsed[0] / elapsed[1])
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch sizes / 4, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (5 if args.quick else 9)
    torch.manual_seed(0)
    # One thread: on a shared machine, timings with several threads are mostly scheduler noise.
    with cpu_threads(1):
        print(f"time(candidate fwd+bwd) / time(torch BatchNorm fwd+bwd), training mode, 1 thread, "
              f"CPU time, median of {repeats} back-to-back pairs (target: ghost <= 1.05)\n")
        print("| shape | NBS | ghost contiguous | ghost strided | Python loop over groups |")
        print("|---|---|---|---|---|")
        for shape in SHAPES:
            if args.quick:
                shape = (shape[0] // 4, *shape[1:])
            x = torch.randn(shape, requires_grad=True)
            grad = torch.randn(shape)
            channels = shape[1]
            baseline = step(TORCH_BN[len(shape)](channels), x, grad)
            for nbs in NBS:
                cells = []
                for grouping in ("contiguous", "strided"):
                    layer = GhostBatchNorm(channels, nbs, grouping=grouping)
                    cells.append(paired_ratio(step(layer, x, grad), baseline, repeats))
                loop = LoopGhostBatchNorm(TORCH_BN[len(shape)](channels), nbs)
                cells.append(paired_ratio(step(loop, x, grad), baseline, repeats))
                label = "full" if nbs is None else str(nbs)
                print(f"| {shape} | {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
