"""Eval-mode inference of a small ResNet-style CNN, with BatchNorm folded vs unfolded.

    python benchmarks/bench_fold.py

Prints the median time of the unfolded model divided by the folded model's (a speedup; target
>= 1.2), measured in the same run, for a few batch shapes. Also checks the outputs agree.

What folding saves is one elementwise pass and one module call per BatchNorm. On a CPU, where a
3x3 convolution costs ~100x an eval-mode BatchNorm over the same tensor, that shows at small
batches (per-call overhead) and fades to ~1.0x as the batch grows.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from rethinkbn.convert import fold_batchnorm
from rethinkbn.distributed.launch import cpu_threads

SHAPES = [(1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32)]
REPEATS = 50


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet() -> nn.Module:
    """A ResNet-20-like CNN for 32x32 images: 3 stages of 16/32/64 channels."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        layers.append(Block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def paired_ratio(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Median over repeats of ``time(a(x)) / time(b(x))``, the two calls back to back.

    Pairing adjacent calls cancels most of the slow drifts of a shared machine's load.
    """
    ratios = []
    with torch.inference_mode():
        for model in (a, b, a, b):
            model(x)
        for _ in range(REPEATS):
            elapsed = []
            for model in (a, b):
                start = time.perf_counter()
                model(x)
                elapsed.append(time.perf_counter() - start)
            ratios.append(elapsed[0] / elapsed[1])
    return statistics.median(ratios)


def main() -> None:
    torch.manual_seed(0)
    # One thread: on a shared machine, timings with several threads are mostly scheduler noise.
    with cpu_threads(1):
        model = resnet()
        folded = fold_batchnorm(model)
        count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - sum(
            isinstance(m, nn.BatchNorm2d) for m in folded.modules()
        )
        print(f"ResNet-style CNN (ResNet-20 layout), {count} BatchNorm layers folded, 1 thread, "
              f"median of {REPEATS} back-to-back pairs\n")
        print("| input shape | unfolded time / folded time | max rel. output diff |")
        print("|---|---|---|")
        for shape in SHAPES:
            x = torch.randn(shape)
            ratio = paired_ratio(model, folded, x)
            with torch.inference_mode():
                ref = model(x)
                diff = ((folded(x) - ref).abs().max() / ref.abs().max()).item()
            print(f"| {tuple(shape)} | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
