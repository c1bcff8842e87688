"""What `rethinkbn.diagnose` costs, in passes of `precise_bn` over the same samples.

    python benchmarks/bench_diagnose.py

A 1-D conv net shaped like the studies' ResNet (stem and three stages of conv-BN-ReLU, widths
32/64/128, 7 BatchNorm layers; built here, since the benchmarks use the library only), untrained,
on 2048 random MNIST-1D-shaped samples in batches of 32, one thread. Prints the median over 3
repetitions of diagnose's time divided by one `precise_bn` pass over `num_samples`, without and
with `eval_data` (the docstring promises about two, and about four with `eval_data`).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn

from rethinkbn import diagnose, precise_bn


def resnet1d() -> nn.Module:
    """Stem, then per stage two conv-BN-ReLU (the first strided), pooling and a classifier."""
    layers: list[nn.Module] = [nn.Conv1d(1, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU()]
    for i, (c_in, c_out) in enumerate([(32, 32), (32, 64), (64, 128)]):
        for j, (a, b) in enumerate([(c_in, c_out), (c_out, c_out)]):
            layers += [nn.Conv1d(a, b, 3, stride=2 if i and not j else 1, padding=1),
                       nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 10))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = resnet1d().eval()
    x, y = torch.randn(2048, 1, 40), torch.randint(0, 10, (2048,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 2048, 32)]

    def accuracy(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (out.argmax(1) == batch[1]).float().mean()

    def seconds(fn: object) -> float:
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - start

    ratios: dict[str, list[float]] = {"train_data only": [], "with eval_data": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            one = seconds(lambda: precise_bn(model, loader, num_samples=2048, progress=False))
            ratios["train_data only"].append(seconds(lambda: diagnose(
                model, loader, num_samples=2048, metric=accuracy, progress=False)) / one)
            ratios["with eval_data"].append(seconds(lambda: diagnose(
                model, loader, loader, num_samples=2048, metric=accuracy, progress=False)) / one)
    for label, values in ratios.items():
        print(f"diagnose, {label}: {statistics.median(values):.2f} precise_bn passes "
              f"(median of {len(values)})")


if __name__ == "__main__":
    main()
