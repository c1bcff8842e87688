"""PreciseBN cost against a bare forward, and statistics-bank switch cost against one forward.

    python benchmarks/bench_precise.py

Rows (medians of interleaved repeats; ratios to the baseline measured in the same run):

- bare: a no-grad, train-mode forward over the batches (what any PreciseBN must at least do);
- precise_bn: rethinkbn's exact, atomic, distributed-ready pass over the same batches;
- fvcore-style: the momentum-1 buffer reading of fvcore's ``update_bn_stats``, written here as a
  reference (running averages of the per-batch buffers, no restore, no hooks);
- input-hook: the same exact pooling, with a forward-pre-hook computing ``Moments.of(input)``
  for every BatchNorm call (an extra pass over every activation; the design precise_bn avoids
  for torch layers).

Then the time of ``StatsBank.use`` (switch in and back) and ``StatsBank.install`` for a model
with 50 BatchNorm layers, as a fraction of one eval forward of that model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rethinkbn.distributed.launch import cpu_threads
from rethinkbn.population import StatsBank, capture_stats, precise_bn
from rethinkbn.stats import Moments

REPEATS = 9
BATCHES = 16
BATCH_SIZE = 64
SIZE = 16


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet(channels: int = 16, blocks: int = 3) -> nn.Module:
    """A ResNet-style CNN: stem, ``blocks`` residual blocks of two conv-BN, a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        *[Block(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    )


def bare(model: nn.Module, data: list[Tensor]) -> None:
    """The baseline: train-mode forwards over ``data`` (what any statistics pass costs)."""
    model.train()
    with torch.no_grad():
        for x in data:
            model(x)


def fvcore_style(model: nn.Module, data: list[Tensor]) -> None:
    """fvcore's update_bn_stats in essence: momentum 1, average the per-batch buffers."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        for i, x in enumerate(data):
            model(x)
            for bn, mean, var in zip(bns, means, variances, strict=True):
                mean += (bn.running_mean - mean) / (i + 1)
                var += (bn.running_var - var) / (i + 1)
    for bn, mean, var, momentum in zip(bns, means, variances, momenta, strict=True):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.momentum = momentum


def input_hook(model: nn.Module, data: list[Tensor]) -> None:
    """Exact pooling from every BatchNorm input: one extra reduction pass per activation."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    rows: dict[nn.Module, list[Moments]] = {bn: [] for bn in bns}
    handles = [bn.register_forward_pre_hook(lambda m, a: rows[m].append(Moments.of(a[0])))
               for bn in bns]
    model.train()
    try:
        with torch.no_grad():
            for x in data:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for bn in bns:
        stacked = Moments(*(torch.stack([getattr(r, f) for r in rows[bn]])
                            for f in ("count", "mean", "m2")))
        total = stacked.total()
        bn.running_mean.copy_(total.mean)
        bn.running_var.copy_(total.var(unbiased=True))


def ours(model: nn.Module, data: list[Tensor]) -> None:
    """rethinkbn.precise_bn over every batch of ``data``."""
    precise_bn(model, data, num_batches=len(data), progress=False)


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds one call ``fn(*args)`` takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def median_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over repeats of the ratio to the baseline timed in the same repeat (load drifts)."""
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def precise_table() -> None:
    """Print PreciseBN's time against a bare forward pass, and two other designs'."""
    torch.manual_seed(0)
    model = resnet()
    data = [torch.randn(BATCH_SIZE, 3, SIZE, SIZE) for _ in range(BATCHES)]
    methods = {"bare forward": bare, "precise_bn": ours, "fvcore-style": fvcore_style,
               "input-hook": input_hook}
    for fn in methods.values():  # warm-up
        fn(model, data[:2])
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(REPEATS):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no fixed order
            times[name].append(timed(methods[name], model, data))
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(f"PreciseBN over {BATCHES} batches of {BATCH_SIZE} x 3 x {SIZE} x {SIZE}, ResNet-style "
          f"CNN with {num_bn} BatchNorm layers (median of {REPEATS} paired ratios)\n")
    print("| method | time / bare forward |")
    print("|---|---:|")
    for name in methods:
        print(f"| {name} | {median_ratio(times[name], times['bare forward']):.3f}x |")


def bank_table() -> None:
    """Print the StatsBank's switch and install times against one eval forward."""
    torch.manual_seed(0)
    layers = []
    for _ in range(50):
        layers += [nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    bank = StatsBank()
    bank.capture(model, "source")
    bank["target"] = {name: {k: v + 1 for k, v in stats.items()}
                      for name, stats in capture_stats(model).items()}
    x = torch.randn(8, 32, 16, 16)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def switch() -> None:
        with bank.use(model, "target"):
            pass

    def install() -> None:
        bank.install(model, "target")

    forward()
    times: dict[str, list[float]] = {"forward": [], "use (in and back)": [], "install": []}
    for _ in range(REPEATS * 3):
        times["forward"].append(timed(forward))
        times["use (in and back)"].append(timed(switch))
        times["install"].append(timed(install))
    print("\nStatistics bank, 50 BatchNorm layers (Conv 32->32 on 8 x 32 x 16 x 16), "
          f"median of {REPEATS * 3} paired ratios\n")
    print("| operation | time / one eval forward |")
    print("|---|---:|")
    for name in ("use (in and back)", "install"):
        print(f"| {name} | {median_ratio(times[name], times['forward']):.3f}x |")


def main() -> None:
    # one thread: on a shared machine, competing for cores adds more noise than it removes
    with cpu_threads(1):
        precise_table()
        bank_table()


if __name__ == "__main__":
    main()
