"""PreciseBN: exact population statistics for every BatchNorm layer of a model.

Layers: torch BatchNorm1d/2d/3d and SyncBatchNorm, and the rethinkbn layer family.
GhostBatchNorm normalizes the pass's batches in groups of ``pass_norm_batch_size`` samples
(None: the whole batch); DomainBatchNorm gathers per domain, with domains chosen by the model as
in training; FrozenBatchNorm is skipped unless ``include_frozen=True`` (then the statistics of its
inputs are gathered, while it keeps normalizing with its old ones). A layer called several times
per forward pools every call. Layers without running statistics are skipped. For torch's
BatchNorm each batch's ``mu_b`` and ``sigma_b^2`` are those torch's kernel computes (read back
from the running buffers with momentum 1, in the buffers' dtype), for GhostBatchNorm those it
normalized its groups with (float32 or wider); the merge is float64.

Errors name the public function that was called once, where it is entered
(:func:`rethinkbn._checks.in_context`); warnings point at the line that called it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._checks import in_context
from .._model import running_buffers, unwrap
from ..stats import Moments
from ._pass import PassResult, run_pass
from ._state import check_model_first
from .bank import Snapshot, capture_stats, install_stats
from .options import PreciseBNOptions, options_from, with_options

__all__ = ["LayerReport", "PreciseBNReport", "markdown_table", "precise_bn", "recompute_stats"]


@dataclass(frozen=True)
class LayerReport:
    """One layer's share of a PreciseBN pass.

    ``samples`` is the number of samples the layer saw (dim 0 of its inputs, summed over every call
    and, when distributed, over the ranks); ``count`` the number of values pooled per channel
    (samples x spatial positions); ``calls`` how often the layer ran on this rank. The distances
    compare the old (EMA) statistics with the new population statistics, channel by channel, as
    root mean squares:

        mean_shift    = rms_c( (mu_old - mu_new) / sqrt(var_new + eps) )
        std_log_ratio = rms_c( log(sigma_old / sigma_new) )    with sigma = sqrt(var + eps)
    """

    samples: int
    count: int
    calls: int
    mean_shift: float
    std_log_ratio: float


@dataclass(frozen=True)
class PassReport:
    """What a statistics pass saw, per layer (qualified name); ``str()`` prints a table."""

    layers: dict[str, Any]
    num_samples: int
    num_batches: int

    TITLE: ClassVar[str] = "Statistics"
    COLUMNS: ClassVar[tuple[str, ...]] = ()

    def row(self, layer: Any) -> list[object]:
        """The table's cells for one layer's report, after its name."""
        return []

    def __str__(self) -> str:
        return markdown_table(
            f"{self.TITLE} over {self.num_samples} samples in {self.num_batches} batches",
            ["layer", *self.COLUMNS], [[name, *self.row(r)] for name, r in self.layers.items()],
        )


@dataclass(frozen=True)
class PreciseBNReport(PassReport):
    """What :func:`precise_bn` did: per layer (qualified name) a :class:`LayerReport`."""

    layers: dict[str, LayerReport]
    TITLE: ClassVar[str] = "PreciseBN"
    COLUMNS: ClassVar[tuple[str, ...]] = (
        "samples", "values/channel", "calls", "mean shift (sigma)", "log std ratio")

    def row(self, layer: LayerReport) -> list[object]:
        return [layer.samples, layer.count, layer.calls, f"{layer.mean_shift:.4f}",
                f"{layer.std_log_ratio:.4f}"]


def markdown_table(
    title: str,
    header: Sequence[object],
    rows: Iterable[Sequence[object]],
    *,
    right_aligned: bool = True,
) -> str:
    """A title line (none when empty) and a markdown table of ``str(cell)``s.

    In every cell ``|`` is escaped and a newline becomes a space. The first column is
    left-aligned, the others right-aligned (numbers) unless ``right_aligned=False``. The reports'
    ``str()`` and the studies' tables both print with it.
    """
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rule = "|---|" + ("---:|" if right_aligned else "---|") * (len(header) - 1)
    lines = [title] if title else []
    lines += ["| " + " | ".join(map(cell, header)) + " |", rule]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def distances(
    old_mean: Tensor, old_var: Tensor, new_mean: Tensor, new_var: Tensor, eps: float
) -> tuple[float, float]:
    """``(mean_shift, std_log_ratio)`` as defined in :class:`LayerReport`."""
    old_mean, old_var, new_mean, new_var = (t.double() for t in (old_mean, old_var, new_mean,
                                                                 new_var))
    shift = (old_mean - new_mean) / (new_var + eps).sqrt()
    log_ratio = 0.5 * ((old_var + eps) / (new_var + eps)).log()
    return float(shift.square().mean().sqrt()), float(log_ratio.square().mean().sqrt())


def population_stats(name: str, layer: nn.Module, total: Moments) -> dict[str, Tensor]:
    """The buffers to install from a layer's pooled moments: mean and *unbiased* variance.

    Entries (channels, or domains of a DomainBatchNorm) that saw no value keep their old mean, and
    those with fewer than two values their old variance. Moments of shape ``(D, C)`` for buffers
    of shape ``(C,)`` (a DomainBatchNorm with shared population statistics) are merged over the
    domains first.
    """
    old_mean, old_var = running_buffers(layer)  # type: ignore[misc]
    label = f"'{name}' ({layer.__class__.__name__})"
    if total.shape != old_mean.shape:
        if total.mean.dim() == old_mean.dim() + 1 and total.shape[1:] == old_mean.shape:
            total = total.total()
        else:
            raise ValueError(
                f"layer {label} reported moments of shape {tuple(total.shape)}; its "
                f"running buffers have shape {tuple(old_mean.shape)}"
            )
    seen = total.count > 0
    finite = torch.isfinite(total.mean) & torch.isfinite(total.m2)
    bad = seen & ~finite
    if bad.any():
        raise ValueError(
            f"layer {label} has non-finite statistics in {int(bad.sum())} of "
            f"{bad.numel()} entries (NaN/Inf mean or variance); expected finite activations. "
            "The model is unchanged."
        )
    mean = torch.where(seen, total.mean, old_mean.double())
    var = torch.where(total.count > 1, total.var(unbiased=True), old_var.double())
    return {"running_mean": mean.to(old_mean.dtype), "running_var": var.to(old_var.dtype)}


def estimate(
    model: nn.Module, data: Iterable[Any], options: PreciseBNOptions, *, label: str
) -> tuple[PassResult, Snapshot]:
    """Run the pass and turn every layer's pooled moments into the buffers to install.

    ``label`` titles the progress bar (the entry point's name). The pass's warnings are emitted
    here, at the line that called the public function (which calls this directly, under
    :func:`~rethinkbn._checks.in_context`).
    """
    result = run_pass(model, data, options, label=label)
    for message in result.warnings:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    stats = {
        name: population_stats(name, result.layers[name], total)
        for name, total in result.totals.items()
    }
    return result, stats


def _layer_reports(result: PassResult, stats: Snapshot, old: Snapshot) -> dict[str, LayerReport]:
    """Each estimated layer's :class:`LayerReport`: old (EMA) vs new statistics, counts."""
    reports = {}
    for name, new in stats.items():
        layer, total, calls = result.layers[name], result.totals[name], result.calls.get(name)
        shift, ratio = distances(
            old[name]["running_mean"], old[name]["running_var"], new["running_mean"],
            new["running_var"], getattr(layer, "eps", 1e-5),
        )
        # per-domain counts (DomainBatchNorm) add up to the layer's values per channel
        count = int(total.count.reshape(-1, total.shape[-1])[:, 0].sum())
        reports[name] = LayerReport(result.samples.get(name, 0), count,
                                    0 if calls is None else calls.count.shape[0], shift, ratio)
    return reports


@with_options()
@in_context("precise_bn")
def precise_bn(
    model: nn.Module,
    data: Iterable[Any],
    options: PreciseBNOptions | None = None,
    **kwargs: Any,
) -> PreciseBNReport:
    """Replace every BatchNorm layer's running (EMA) statistics by exact population statistics.

    The weights are frozen (a ``torch.no_grad()`` pass) and the model runs over ``data`` with its
    BatchNorm layers normalizing with batch statistics; every other module is in eval mode
    (dropout off) unless ``keep_modes=True`` leaves all non-BatchNorm modules as they are. For
    each layer and channel, the values ``x`` of all calls ``b`` (batch ``b`` contributes ``n_b`` =
    samples x spatial positions values per channel) are pooled exactly, in float64 (Chan et al.
    merge, :mod:`rethinkbn.stats`)::

        N       = sum_b n_b
        mu_pop  = sum_b n_b * mu_b / N
        m2_pop  = sum_b (n_b * sigma_b^2 + n_b * (mu_b - mu_pop)^2)       (sigma_b^2 biased)

        running_mean <- mu_pop
        running_var  <- m2_pop / (N - 1)

    ``m2_pop / N`` is the paper's pooled variance ``E[mu_B^2 + sigma_B^2] - mu_pop^2``. The
    *unbiased* ``m2_pop / (N - 1)`` is installed because that is what torch's ``running_var``
    holds (a pass over one batch installs exactly what BatchNorm with momentum 1 would); with the
    default 10^4 samples the two differ by a factor ``1 + 1/(N - 1)``, under 10^-4. Unlike the
    average of per-batch variances, this is not biased by small batches. Which layers and which
    per-batch statistics: see :mod:`rethinkbn.population.precise` (every BatchNorm layer with
    running statistics; FrozenBatchNorm only with ``include_frozen=True``).

    Args:
        data: an iterable of batches (see ``forward`` below). Empty batches (N=0) contribute
            nothing.

    Distributed: when torch.distributed is initialized, the ranks first exchange their status
    (bounded by ``timeout``), then every layer's moments are gathered across ``process_group``
    in one collective and merged exactly in rank order, so every rank installs bit-identical
    statistics, those of the union of the ranks' data. A rank that raises makes every other rank
    raise RuntimeError at once, naming it; a rank that never arrives makes the others raise
    TimeoutError after ``timeout``; ranks whose models differ in their BatchNorm layers (number,
    names or channels) all raise ValueError naming the first layer that differs.

    Side effects: only ``running_mean`` / ``running_var`` change, in place, and only once the
    whole pass succeeded; ``num_batches_tracked``, momenta, modes, observers and hooks end as they
    were. On any exception (KeyboardInterrupt included), an empty or (strict) short ``data``, or
    non-finite statistics (ValueError naming the layer) the model is exactly as before.
    A (Distributed)DataParallel model is unwrapped; its buffers are the same tensors, updated
    identically on every rank.
    """
    check_model_first(model, data)
    opts = options_from(options, kwargs)
    model = unwrap(model)
    old = capture_stats(model)
    result, stats = estimate(model, data, opts, label="precise_bn")
    install_stats(model, stats, partial=True)
    return PreciseBNReport(_layer_reports(result, stats, old), result.num_samples,
                           result.num_batches)


@with_options()
@in_context("recompute_stats")
def recompute_stats(
    model: nn.Module,
    data: Iterable[Any],
    options: PreciseBNOptions | None = None,
    *,
    install: bool = False,
    **kwargs: Any,
) -> Snapshot:
    """Population statistics of ``model`` on ``data`` as a snapshot, installed only if asked.

    Same pass and options as :func:`precise_bn`; the returned snapshot
    (``{layer: {"running_mean", "running_var"}}``) covers every layer with running statistics,
    those not estimated (e.g. FrozenBatchNorm) holding their current values, so it can go into a
    :class:`StatsBank`. With ``install=False`` (default) the model is left exactly as it was.
    """
    check_model_first(model, data)
    opts = options_from(options, kwargs)
    model = unwrap(model)
    _, stats = estimate(model, data, opts, label="recompute_stats")
    snapshot = {**capture_stats(model), **stats}
    if install:
        install_stats(model, snapshot)
    return snapshot
