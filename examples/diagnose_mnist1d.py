"""Train the studies' 1-D ResNet on MNIST-1D for a short while, then diagnose its BatchNorm.

    python examples/diagnose_mnist1d.py                       # ~1-2 minutes on 2 CPU cores
    python examples/diagnose_mnist1d.py --contrast 0.5        # evaluate on lower-contrast data
    python examples/diagnose_mnist1d.py --tiny                # seconds (tests)
    rethinkbn diagnose examples.diagnose_mnist1d:build        # the same model through the CLI

Needs the ``studies`` extra (mnist1d, matplotlib). The dataset is generated locally.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from rethinkbn import Diagnosis, diagnose
from rethinkbn_studies.toolkit.data import load_mnist1d
from rethinkbn_studies.toolkit.models import build_model
from rethinkbn_studies.toolkit.train import TrainConfig, train


def accuracy(out: torch.Tensor, batch: Any) -> torch.Tensor:
    return (out.argmax(1) == batch[1]).float().mean()


def build(tiny: bool = False, epochs: int = 3, batch_size: int = 32, contrast: float = 1.0,
          cache: str | None = None) -> dict[str, Any]:
    """A trained model and its loaders, as ``rethinkbn diagnose`` SPECs return them."""
    data = load_mnist1d(400 if tiny else 4000, cache_dir=cache)
    torch.manual_seed(0)
    model = build_model(data, widths=(8, 16) if tiny else (32, 64, 128))
    config = TrainConfig(epochs=1 if tiny else epochs, batch_size=batch_size, lr=0.1,
                         warmup_epochs=0.0 if tiny else 0.5)
    train(model, data.train_x, data.train_y, config, seed=0)
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(1))
    x, y = data.train_x[order], data.train_y[order]
    train_loader = [(x[i:i + batch_size], y[i:i + batch_size])
                    for i in range(0, len(x) - batch_size + 1, batch_size)]
    val_x = contrast * data.val_x
    eval_loader = [(val_x[i:i + batch_size], data.val_y[i:i + batch_size])
                   for i in range(0, len(val_x) - batch_size + 1, batch_size)]
    return {"model": model.eval(), "train_data": train_loader, "eval_data": eval_loader,
            "metric": accuracy}


def main(argv: list[str] | None = None) -> Diagnosis:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and dataset (tests)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--contrast", type=float, default=1.0,
                        help="multiply the evaluation inputs by this (a domain shift)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples per diagnosis pass (default 2000; 64 with --tiny)")
    parser.add_argument("--out", default=None, help="write the report here")
    parser.add_argument("--cache", default=None, help="cache the generated MNIST-1D arrays here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    made = build(args.tiny, args.epochs, contrast=args.contrast, cache=args.cache)
    trained = time.perf_counter()
    num_samples = args.num_samples or (64 if args.tiny else 2000)
    result = diagnose(made.pop("model"), made.pop("train_data"), num_samples=num_samples, **made)
    done = time.perf_counter()
    print(result)
    print(f"(training {trained - start:.0f} s, diagnosis {done - trained:.0f} s)")
    if args.out:
        print(f"report: {result.save(args.out)[0]}")
    return result


if __name__ == "__main__":
    main()
