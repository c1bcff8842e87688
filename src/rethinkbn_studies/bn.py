"""The BatchNorm operations the studies need, each one call into rethinkbn's public API.

NBS: :func:`rethinkbn.convert.to_ghost_bn` (GhostBatchNorm). PreciseBN:
:func:`rethinkbn.population.precise_bn`. Mini-batch statistics at inference:
:func:`rethinkbn.population.batch_stats_inference`. FrozenBN for the last epochs:
:func:`rethinkbn.population.freeze_with_precise_stats`. The studies only add the choice of
samples (a seeded subset of the training set) and the error computation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rethinkbn.convert import to_ghost_bn
from rethinkbn.population import (
    PreciseBNReport,
    batch_stats_inference,
    freeze_with_precise_stats,
    precise_bn,
)

__all__ = [
    "eval_error_minibatch",
    "freeze_with_population_stats",
    "population_stats",
    "set_norm_batch_size",
    "wrong_minibatch",
]


def set_norm_batch_size(model: nn.Module, norm_batch_size: int) -> nn.Module:
    """Every BN of ``model`` normalizes training batches in groups of ``norm_batch_size``."""
    return to_ghost_bn(model, norm_batch_size)


def _batches(model: nn.Module, x: Tensor, batch_size: int, num_samples: int,
             seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[: min(num_samples, len(x))]
    device = next(model.parameters()).device
    return [x[idx[i : i + batch_size]].to(device) for i in range(0, len(idx), batch_size)]


def population_stats(model: nn.Module, x: Tensor, *, batch_size: int, num_samples: int,
                     seed: int = 0, pass_norm_batch_size: int | None = None) -> PreciseBNReport:
    """PreciseBN in place: every BN's running statistics become those of ``num_samples``
    training inputs ``x`` (a seeded random subset) run in batches of ``batch_size``.

    Ghost BN layers normalize each pass batch in groups of ``pass_norm_batch_size`` (None: the
    whole batch of ``batch_size``, the paper's PreciseBN batch B). Returns PreciseBN's report:
    per layer, the distances of the statistics it replaced from the new ones."""
    batches = _batches(model, x, batch_size, num_samples, seed)
    return precise_bn(model, batches, num_samples=None, num_batches=len(batches),
               pass_norm_batch_size=pass_norm_batch_size, progress=False)


def freeze_with_population_stats(model: nn.Module, x: Tensor, *, batch_size: int,
                                 num_samples: int, seed: int,
                                 pass_norm_batch_size: int | None) -> nn.Module:
    """FrozenBN: PreciseBN statistics (as :func:`population_stats`), then every BN normalizes
    with them in training too; weight and bias stay the same parameters and keep training."""
    batches = _batches(model, x, batch_size, num_samples, seed)
    return freeze_with_precise_stats(model, batches, num_samples=None,
                                     num_batches=len(batches),
                                     pass_norm_batch_size=pass_norm_batch_size, progress=False)


@torch.no_grad()
def wrong_minibatch(model: nn.Module, x: Tensor, y: Tensor, norm_batch_size: int) -> Tensor:
    """Which of the first ``n`` samples (``n`` the largest multiple of ``norm_batch_size``)
    ``model`` gets wrong with mini-batch statistics: each group of ``norm_batch_size`` inputs
    is normalized with its own statistics (the paper's "mu_B" evaluation); a remainder of fewer
    than ``norm_batch_size`` samples is left out. Bool, one per sample; the model is left as it
    was."""
    n = (len(x) // norm_batch_size) * norm_batch_size
    if n == 0:
        raise ValueError(f"mini-batch evaluation needs >= norm_batch_size={norm_batch_size} "
                         f"samples, got {len(x)}")
    chunk = norm_batch_size * max(1, 1000 // norm_batch_size)
    device = next(model.parameters()).device
    wrong = []
    with batch_stats_inference(model, norm_batch_size=norm_batch_size):
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            wrong.append(model(x[i:j].to(device)).argmax(1).cpu() != y[i:j])
    return torch.cat(wrong)


def eval_error_minibatch(model: nn.Module, x: Tensor, y: Tensor, norm_batch_size: int) -> float:
    """Top-1 error (%) with mini-batch statistics (see :func:`wrong_minibatch`)."""
    return 100.0 * float(wrong_minibatch(model, x, y, norm_batch_size).float().mean())
