"""The BatchNorm operations the studies need, each one call into rethinkbn's public API.

NBS: :func:`rethinkbn.convert.to_ghost_bn` (GhostBatchNorm). PreciseBN:
:func:`rethinkbn.population.precise_bn`. Mini-batch statistics at inference:
:func:`rethinkbn.population.batch_stats_inference`. FrozenBN for the last epochs:
:func:`rethinkbn.population.freeze_with_precise_stats`. The studies only add the choice of
samples (a seeded subset of the training set) and the error computation.

Table 2's ablation adds what the library deliberately does not offer: the *per-batch*
estimator of population statistics (the average of per-batch means and unbiased variances, what
``torch.optim.swa_utils.update_bn`` and older PreciseBN implementations install), and batch
statistics gathered *layer by layer* (each layer's input computed with every earlier layer
normalizing with population statistics). :func:`batch_moments` records the per-batch moments of
every layer, :func:`per_batch_stats` and :func:`pooled_stats` turn them into statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rethinkbn.convert import to_ghost_bn
from rethinkbn.population import (
    PreciseBNReport,
    Snapshot,
    batch_stats_inference,
    capture_stats,
    freeze_with_precise_stats,
    precise_bn,
)
from rethinkbn.stats import Moments

__all__ = [
    "batch_moments",
    "eval_error_minibatch",
    "freeze_with_population_stats",
    "per_batch_stats",
    "pooled_stats",
    "recompute_population",
    "set_norm_batch_size",
    "stats_distances",
    "wrong_minibatch",
]


def set_norm_batch_size(model: nn.Module, norm_batch_size: int) -> nn.Module:
    """Every BN of ``model`` normalizes training batches in groups of ``norm_batch_size``."""
    return to_ghost_bn(model, norm_batch_size)


def _pass_order(x: Tensor, num_samples: int, seed: int) -> Tensor:
    """The samples of a statistics pass, in pass order: a seeded random subset of ``x``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(len(x), generator=gen)[: min(num_samples, len(x))]


def _batches(model: nn.Module, x: Tensor, batch_size: int, num_samples: int,
             seed: int) -> list[Tensor]:
    idx = _pass_order(x, num_samples, seed)
    device = next(model.parameters()).device
    return [x[idx[i : i + batch_size]].to(device) for i in range(0, len(idx), batch_size)]


def recompute_population(model: nn.Module, x: Tensor, *, batch_size: int, num_samples: int,
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
    """FrozenBN: PreciseBN statistics (as :func:`recompute_population`), then every BN normalizes
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


# Samples per forward call of :func:`batch_moments` (rounded down to whole pass batches).
_CHUNK = 1000


@torch.no_grad()
def batch_moments(model: nn.Module, x: Tensor, *, batch_size: int, num_samples: int,
                  seed: int = 0, layer_by_layer: bool = False) -> dict[str, Moments]:
    """Per BatchNorm layer (qualified name), the moments of its input in every pass batch:
    shape ``(num_batches, C)``, batch ``k`` holding samples ``k*B .. k*B + B - 1`` of the same
    seeded pass order as :func:`recompute_population` (the last batch may be smaller).

    ``layer_by_layer=False`` (the "whole" pass, PreciseBN's): every BatchNorm normalizes each
    batch of ``batch_size`` with that batch's own statistics, so a layer's input depends on the
    earlier layers' batch-``B`` normalization. ``layer_by_layer=True``: the model runs in eval
    mode, every layer normalizing with its running (population) statistics, and each layer's
    input is grouped into the same batches afterwards: what estimating the layers one at a time,
    each after installing the earlier layers' statistics, sees when those are the running ones.
    Batches are computed ``_CHUNK`` samples per forward call (groups of ``batch_size`` in one
    call normalize separately, as :func:`rethinkbn.population.batch_stats_inference` does).

    The model ends as it was: no statistic, mode or hook changes."""
    if batch_size < 1:
        raise ValueError(f"batch_moments: batch_size must be >= 1, got {batch_size}")
    if min(num_samples, len(x)) < 1:
        raise ValueError(f"batch_moments: no samples to estimate statistics from (num_samples="
                         f"{num_samples}, {len(x)} inputs); PreciseBN refuses this too")
    layers = {name: model.get_submodule(name) for name in capture_stats(model)}
    rows: dict[str, list[Moments]] = {name: [] for name in layers}

    def recorder(name: str) -> Any:
        def hook(_layer: nn.Module, args: tuple[Any, ...]) -> None:
            inp = args[0]
            groups = inp.size(0) // batch_size if inp.size(0) % batch_size == 0 else 1
            rows[name].append(Moments.of(inp, num_groups=groups))
        return hook

    idx = _pass_order(x, num_samples, seed)
    device = next(model.parameters()).device
    full = len(idx) - len(idx) % batch_size
    step = batch_size * max(1, _CHUNK // batch_size)
    chunks = [idx[i : min(i + step, full)] for i in range(0, full, step)]
    if full < len(idx):
        chunks.append(idx[full:])
    modes = {m: m.training for m in model.modules()}
    hooks = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        if layer_by_layer:
            model.eval()
            for chunk in chunks:
                model(x[chunk].to(device))
        else:
            with batch_stats_inference(model, norm_batch_size=batch_size):
                for chunk in chunks:
                    model(x[chunk].to(device))
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    out = {name: Moments(*(torch.cat([getattr(r, f) for r in rs])
                           for f in ("count", "mean", "m2")))
           for name, rs in rows.items() if rs}
    for name, moments in out.items():
        # A NaN or inf in the inputs would reach the estimators unseen: refuse it here, by layer.
        if not (torch.isfinite(moments.mean).all() and torch.isfinite(moments.m2).all()):
            raise ValueError(f"batch_moments: {name}: its input has non-finite values (NaN or "
                             f"inf) in some pass batch; check the inputs and the model")
    return out


def per_batch_stats(moments: dict[str, Moments]) -> Snapshot:
    """The per-batch estimator of population statistics from :func:`batch_moments`: over the
    ``K`` batches, every batch weighing the same whatever its size::

        running_mean = (1/K) sum_k mu_k,      running_var = (1/K) sum_k s2_k

    with ``s2_k`` batch ``k``'s unbiased variance. This is what
    ``torch.optim.swa_utils.update_bn`` (momentum None: a cumulative average of what each batch
    writes) and PreciseBN implementations before the paper's install. Unlike the pooled
    variance (:func:`pooled_stats`) it misses the spread *between* the batches' means: with
    batches of B samples of S positions, ``E[s2_k]`` falls short of the population variance by
    about the variance of a batch mean, which for B = 2 is half the variance of the per-sample
    means. float64."""
    return {name: {"running_mean": m.mean.mean(0), "running_var": m.var(unbiased=True).mean(0)}
            for name, m in moments.items()}


def pooled_stats(moments: dict[str, Moments]) -> Snapshot:
    """The exact pooled estimator from :func:`batch_moments`: the mean and unbiased variance
    of all values of all batches merged (what :func:`rethinkbn.population.precise_bn`
    installs). float64."""
    totals = {name: m.total() for name, m in moments.items()}
    return {name: {"running_mean": t.mean, "running_var": t.var(unbiased=True)}
            for name, t in totals.items()}


def stats_distances(reference: nn.Module, stats: Snapshot) -> dict[str, tuple[float, float, float]]:
    """Per layer of ``stats``, how far its statistics lie from ``reference``'s running ones:
    ``(mean_shift, std_log_ratio, std_log_bias)``, the first two as PreciseBN's report defines
    them (root mean squares over the channels; ``sigma = sqrt(var + eps)``)::

        mean_shift    = rms_c( (mu - mu_ref) / sigma_ref )
        std_log_ratio = rms_c( log(sigma / sigma_ref) )
        std_log_bias  = mean_c( log(sigma / sigma_ref) )      (signed: < 0 when too small)
    """
    out = {}
    for name, s in stats.items():
        layer = reference.get_submodule(name)
        eps = float(getattr(layer, "eps", 1e-5))
        ref_mean, ref_var = (getattr(layer, k).double().cpu()
                             for k in ("running_mean", "running_var"))
        mean, var = (s[k].double().cpu() for k in ("running_mean", "running_var"))
        shift = (mean - ref_mean) / (ref_var + eps).sqrt()
        log_ratio = 0.5 * ((var + eps) / (ref_var + eps)).log()
        out[name] = (float(shift.square().mean().sqrt()), float(log_ratio.square().mean().sqrt()),
                     float(log_ratio.mean()))
    return out
