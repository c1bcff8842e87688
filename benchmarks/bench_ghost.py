"""Ghost BatchNorm forward+backward time relative to torch's BatchNorm, per normalization size.

    python benchmarks/bench_ghost.py            # the issue's shapes, writes benchmarks/results/
    python benchmarks/bench_ghost.py --quick    # batch sizes / 4, fewer pairs, writes nothing
    python benchmarks/run.py ghost              # the same as the first line

For every shape and NBS it reports ``time(candidate) / time(torch BatchNorm)`` (target <= 1.05)
for GhostBatchNorm with contiguous and with strided groups, and for the Python loop over groups
that composer and timm use (``torch.cat([bn(chunk) for chunk in x.split(nbs)])``), all on the same
tensor, in training mode (running statistics updated), fwd+bwd, on one thread.

Method: on a machine shared with other jobs absolute times mean little, so each cell is the
median of ``--pairs`` paired runs: the candidate and torch's layer run back to back in the same
process, in alternating order (candidate first on even pairs, torch first on odd ones), each
timed with the process's CPU time (``time.process_time``); the cell shows the median ratio and
its interquartile range ``[q1-q3]``. Without ``--quick`` the table is written, with the date,
the command, torch's version and the number of pairs, to ``benchmarks/results/ghost.md``, which
the README quotes (tests/test_benchmark_results.py checks that they agree).

Where the time went (torch.profiler, (256,64,16,16), NBS 2, 10 steps, one thread), before the
row kernels: ``addcmul`` 43% of the step (8.7 ms a call: torch's CPU addcmul is several times
slower than a plain multiply when its factors broadcast over two dims), ``sum`` 18%, ``mul`` 11%
(``linalg.vecdot`` materializes ``dy * xc``), ``addcmul_`` 9%, ``sub`` 7%. The contiguous path now
hands the per-row work to torch's fused kernels on zero-copy ``(1, G*n*C, S)`` views: the eval
BatchNorm kernel, writing into its own input, for the multiply-adds of the forward and backward
(a scale and a shift per row), and the BatchNorm backward kernel for two sums in one pass
(``sum(xc)`` and ``sum(xc^2)`` in the forward, ``sum(dy)`` and ``sum(dy * xc)`` in the backward);
what remains of ours is a row sum, the centring ``x - m0`` written into the buffer of the output
(forward) or of the input's gradient (backward, where it is recomputed: only ``x`` is kept) and
one ``addcmul_`` per backward. A step allocates two activation-sized buffers, as torch's layer
does: each fresh one is paged in on first touch (system time, counted by ``process_time``; up
to a third of torch's own step on this machine), so the ratios move with the allocator's state
and a kernel with more fresh buffers loses more than its passes cost. Issue 21's regression of
this table (contiguous 1.24-1.80 where the code before gave 0.94-1.32) was two such buffers a
step more on the row path and, on the (128, 256, 8, 8) and (1024, 64, 40) rows, the transposed
kernels' five copies of a large activation (they now run only on activations of at most
``ghost_kernels.TRANSPOSE_BYTES``). The whole-batch column (NBS full) is torch's own kernel
plus the NaN policy's few small kernels on ``(C,)`` tensors (about 50-80 us a step).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rethinkbn.distributed.launch import cpu_threads
from rethinkbn.layers import GhostBatchNorm

SHAPES = [(256, 64, 16, 16), (128, 256, 8, 8), (1024, 64, 40)]
NBS = [2, 4, 32, None]
TORCH_BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
RESULTS = Path(__file__).resolve().parent / "results" / "ghost.md"
COMMAND = "python benchmarks/run.py ghost"


class LoopGhostBatchNorm(nn.Module):
    """Ghost BN the way composer/timm write it: one torch BatchNorm call per group."""

    def __init__(self, bn: nn.Module, norm_batch_size: int | None) -> None:
        super().__init__()
        self.bn, self.norm_batch_size = bn, norm_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_batch_size is None:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.split(self.norm_batch_size)])


Step = Callable[[], None]


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    def run() -> None:
        x.grad = None
        layer(x).backward(grad)

    return run


def paired_ratios(candidate: Step, baseline: Step, pairs: int) -> list[float]:
    """``time(candidate) / time(baseline)`` of ``pairs`` back-to-back pairs, alternating which
    runs first (after two warm-up pairs)."""
    for fn in (candidate, baseline, candidate, baseline):
        fn()
    ratios = []
    for i in range(pairs):
        order = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)
        elapsed = {}
        for fn in order:
            start = time.process_time()
            fn()
            elapsed[fn] = time.process_time() - start
        ratios.append(elapsed[candidate] / elapsed[baseline])
    return ratios


def cell(ratios: list[float]) -> str:
    """``median [q1-q3]`` of paired ratios."""
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]"


def table(quick: bool, pairs: int) -> list[str]:
    lines = ["| shape | NBS | ghost contiguous | ghost strided | Python loop over groups |",
             "|---|---|---|---|---|"]
    torch.manual_seed(0)
    for shape in SHAPES:
        if quick:
            shape = (shape[0] // 4, *shape[1:])
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        channels = shape[1]
        baseline = step(TORCH_BN[len(shape)](channels), x, grad)
        for nbs in NBS:
            cells = []
            for grouping in ("contiguous", "strided"):
                layer = GhostBatchNorm(channels, nbs, grouping=grouping)
                cells.append(cell(paired_ratios(step(layer, x, grad), baseline, pairs)))
            loop = LoopGhostBatchNorm(TORCH_BN[len(shape)](channels), nbs)
            cells.append(cell(paired_ratios(step(loop, x, grad), baseline, pairs)))
            label = "full" if nbs is None else str(nbs)
            lines.append(f"| {shape} | {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch sizes / 4, fewer pairs, "
                        "nothing written")
    parser.add_argument("--pairs", type=int, default=None, help="paired runs per cell "
                        "(default 31, --quick 7)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pairs = args.pairs or (7 if args.quick else 31)
    header = (f"time(candidate fwd+bwd) / time(torch BatchNorm fwd+bwd) on the same tensor, "
              f"training mode, 1 thread, CPU time; each cell: median [interquartile range] of "
              f"{pairs} paired runs in alternating order (target: ghost <= 1.05)")
    print(header + "\n", flush=True)
    # One thread: on a shared machine, timings with several threads are mostly scheduler noise.
    with cpu_threads(1):
        lines = table(args.quick, pairs)
    if args.quick:
        return
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        f"`{COMMAND}` on {today}, torch {torch.__version__}, CPU, {pairs} pairs per cell.\n"
        f"{header}.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"\nwritten to {RESULTS.relative_to(RESULTS.parents[2])}")


if __name__ == "__main__":
    main()
