"""Study ``multi-domain`` (Sec. 5, Table 5): a head shared by feature levels, BN per domain or not.

An FPN-like classifier for 1-D signals: a stem (no normalization) computes features ``f`` of the
input; level ``l`` (``l = 0, 1, 2``) is ``g_l * lateral_l(avgpool(f, 2^l)) + o_l`` upsampled back
to the input length, so the levels see the same input at three resolutions through their own
lateral convolution. The fixed per-level gain and offset, ``g_l = 2^(s (l - 1))`` and ``o_l = s (l
- 1)`` with the *separation* ``s``, make the levels' statistics differ by construction (``s = 0``:
only the resolution differs); the study sweeps ``s`` and measures the resulting mean shift and std
ratio of the levels at the head's first norm. One head ``conv-norm-ReLU-conv-norm-ReLU-pool-fc`` is
shared by all levels (the levels are concatenated along the batch with their level as domain id)
and every level predicts the class. The loss is the mean of the levels' cross-entropies; the metric
is the mean of the levels' errors (each level is a detector for its scale, as an FPN level is for
its object sizes).

The norms in the head are :class:`~rethinkbn.layers.DomainBatchNorm` with the six combinations of
(SGD training statistics, population statistics, affine) of the paper's Table 5, plus GroupNorm
and no normalization. Rows that differ only by their population statistics share one training
(one model, several evaluations). Population statistics come from
:func:`~rethinkbn.population.precise_bn`: per level, or shared. "Shared" after per-level training
is what the paper's EMA over the levels' batches estimates: the mean of the levels' means and
of their variances (:func:`mean_of_levels`); the pooled statistics of all levels together
(which add the between-level variance) are kept as the labelled variant "pooled". With shared
training statistics the pooled ones are what training normalized with.

GroupNorm / no-norm heads are compared with the BN head at matched training: each of them (and
the domain/*/shared BN training) runs over a small learning-rate grid (:data:`LR_GRID`) and keeps
the learning rate with the lowest training loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rethinkbn.layers import DomainBatchNorm
from rethinkbn.population import precise_bn
from rethinkbn.stats import Moments

from ..contract import paper
from ..contract.base import (
    INCONCLUSIVE,
    ProgressFactory,
    RunContext,
    StudyResult,
    SummaryRow,
    Table,
    Task,
    Verdict,
    explain,
    mean_std,
    register_study,
)
from ..contract.verdicts import equivalent, exceeds, paired_bootstrap
from ..toolkit.common import fmt, pyplot, save_plot
from ..toolkit.data import DataSplit
from ..toolkit.train import TrainConfig, sgd, shuffled_batches

__all__ = [
    "HEADS",
    "LevelNet",
    "MultiDomainScale",
    "collapse_separation",
    "mean_of_levels",
    "run",
    "run_training",
    "verdicts",
]

NUM_LEVELS = 3

# name -> (SGD training stats, population stats, affine) as DomainBatchNorm flags, or a norm kind.
# Population stats "pooled": shared buffers estimated over all levels pooled (our variant).
HEADS: dict[str, tuple[str, str, str]] = {
    "shared/shared/shared": ("shared", "shared", "shared"),
    "shared/domain/shared": ("shared", "domain", "shared"),
    "domain/shared/shared": ("domain", "shared", "shared"),
    "domain/domain/shared": ("domain", "domain", "shared"),
    "domain/shared/domain": ("domain", "shared", "domain"),
    "domain/domain/domain": ("domain", "domain", "domain"),
    "domain/pooled/shared": ("domain", "pooled", "shared"),
    "domain/pooled/domain": ("domain", "pooled", "domain"),
    "GroupNorm": ("group", "-", "-"),
    "no norm": ("none", "-", "-"),
}
CONSISTENT = ("shared/shared/shared", "domain/domain/shared", "domain/domain/domain")
INCONSISTENT = ("shared/domain/shared", "domain/shared/shared", "domain/shared/domain")
# One training per (training stats, affine): the rows it serves differ only at inference.
TRAININGS: dict[str, tuple[str, ...]] = {
    "shared/*/shared": ("shared/shared/shared", "shared/domain/shared"),
    "domain/*/shared": ("domain/shared/shared", "domain/domain/shared", "domain/pooled/shared"),
    "domain/*/domain": ("domain/shared/domain", "domain/domain/domain", "domain/pooled/domain"),
    "GroupNorm": ("GroupNorm",),
    "no norm": ("no norm",),
}
# Trainings run over the learning-rate grid (matched training of GN / no norm vs BN).
LR_GRID_TRAININGS = ("domain/*/shared", "GroupNorm", "no norm")
# Trainings of the separation sweep (the rows 1-4 of Table 5).
SWEEP_TRAININGS = ("shared/*/shared", "domain/*/shared")
SEPARATION = 1.0  # of the main table
CHANCE_PT = 90.0  # % error of chance on 10 classes
# "Collapses": the error rises from the consistent row (shared training, shared population
# stats) more than this fraction of the way to chance (the paper: 39.1 -> 2.1 AP, 95% of the
# way to 0), a criterion relative to the consistent row and chance instead of a fixed error.
COLLAPSE_FRACTION = 0.5
CONSISTENT_ROW = "shared/shared/shared"
COLLAPSE_CLAIM = "Sec. 5: shared training stats + domain-specific population stats collapses"
# A measured quantity "follows" the rise over the separation sweep when its rank correlation
# with the rise is at least this (descriptive: the sweep has a handful of separations).
FOLLOWS_RANK = 0.5


def collapse_threshold(consistent_err: float) -> float:
    """Rise (pt) over the consistent row's error that counts as a collapse:
    ``COLLAPSE_FRACTION * (CHANCE_PT - consistent_err)``."""
    return COLLAPSE_FRACTION * (CHANCE_PT - consistent_err)
EQUIV_PT = 2.0  # equivalence margin (error points): GN / no norm vs the best BN head


@dataclass(frozen=True)
class MultiDomainScale:
    num_train: int
    num_val: int
    epochs: int
    width: int = 32
    batch_size: int = 64
    lr: float = 0.05
    precise_samples: int = 2000
    lr_grid: tuple[float, ...] = (0.05, 0.15)
    separations: tuple[float, ...] = (0.0, 1.0, 3.0)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["lr_grid"], d["separations"] = list(self.lr_grid), list(self.separations)
        return d


# Full mode trains on this many samples (of 8000 on MNIST-1D): with all of them x 20 epochs the
# study's 63 runs took about 95 s each on one core (measured 2026-12-01, 7 runs), well over an
# hour for this study alone on 2 cores.
FULL_TRAIN_SAMPLES = 4000


def scale_for(ctx: RunContext, data: DataSplit) -> MultiDomainScale:
    """Tiny (tests): 256 samples, 1 epoch; quick: 2000 samples x 8 epochs; full: 4000 samples x
    12 epochs, a finer separation sweep and learning-rate grid."""
    if ctx.tiny:
        return MultiDomainScale(256, 128, 1, width=8, precise_samples=256,
                                separations=(0.0, 1.0))
    if ctx.quick:
        return MultiDomainScale(min(2000, len(data.train_x)), min(1000, len(data.val_x)), 8)
    return MultiDomainScale(min(FULL_TRAIN_SAMPLES, len(data.train_x)), len(data.val_x), 12,
                            lr_grid=(0.02, 0.05, 0.15), separations=(0.0, 0.5, 1.0, 2.0, 3.0))


class _Head(nn.Module):
    """The shared head; DomainBatchNorm layers get the per-sample level ids."""

    def __init__(self, width: int, num_classes: int, norm: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1)
        self.norm1 = norm()
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.norm2 = norm()
        self.fc = nn.Linear(width, num_classes)

    def _norm(self, layer: nn.Module, x: Tensor, domain: Tensor) -> Tensor:
        return layer(x, domain) if isinstance(layer, DomainBatchNorm) else layer(x)

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        x = F.relu(self._norm(self.norm1, self.conv1(x), domain))
        x = F.relu(self._norm(self.norm2, self.conv2(x), domain))
        return self.fc(x.mean(-1))


class LevelNet(nn.Module):
    """Stem, three FPN-like levels with a fixed per-level gain/offset (``separation``), one head
    shared by the levels.

    ``forward(x (N, C, L))`` returns logits of shape ``(levels, N, classes)``.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: Any,
                 separation: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.laterals = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(NUM_LEVELS))
        self.head = _Head(width, num_classes, norm)
        self.separation = float(separation)

    def forward(self, x: Tensor) -> Tensor:
        f = self.stem(x)
        length = x.size(-1)
        s = self.separation
        levels = [
            F.interpolate(lat(F.avg_pool1d(f, 2**i)) if i else lat(f), size=length,
                          mode="nearest") * 2.0 ** (s * (i - 1)) + s * (i - 1)
            for i, lat in enumerate(self.laterals)
        ]
        domain = torch.arange(NUM_LEVELS, device=x.device).repeat_interleave(x.size(0))
        logits = self.head(torch.cat(levels), domain)
        return logits.view(NUM_LEVELS, x.size(0), -1)


def build_model(name: str, data: DataSplit, width: int, seed: int, separation: float = 0.0
                ) -> LevelNet:
    """The LevelNet whose head norm is ``HEADS[name]`` (initialization fixed by ``seed``)."""
    if data.spatial_dims != 1:
        raise ValueError(
            f"multi-domain: the levels are 1-D feature maps; expected 1-D data (N, C, L), got "
            f"{data.name} with inputs of shape {tuple(data.train_x.shape[1:])}"
        )
    train_stats, pop_stats, affine = HEADS[name]

    def norm() -> nn.Module:
        if train_stats == "group":
            return nn.GroupNorm(8 if width % 8 == 0 else 1, width)
        if train_stats == "none":
            return nn.Identity()
        return DomainBatchNorm(width, NUM_LEVELS, train_stats=train_stats,
                               population_stats="shared" if pop_stats == "pooled" else pop_stats,
                               affine=affine)

    torch.manual_seed(seed)
    return LevelNet(data.in_channels, data.num_classes, width, norm, separation)


def train_levels(model: LevelNet, data: DataSplit, scale: MultiDomainScale, seed: int,
                 progress: ProgressFactory | None = None, lr: float | None = None) -> float:
    """SGD (momentum 0.9, cosine lr) on the mean of the levels' cross-entropies; returns the
    last step's loss. ``progress`` (optional) draws a bar over the epochs."""
    x, y = data.train_x[: scale.num_train], data.train_y[: scale.num_train]
    config = TrainConfig(epochs=scale.epochs, batch_size=scale.batch_size,
                         lr=scale.lr if lr is None else lr)
    return sgd(model, config, shuffled_batches(len(x), scale.batch_size, seed),
               lambda m, idx: F.cross_entropy(m(x[idx]).flatten(0, 1),
                                              y[idx].repeat(NUM_LEVELS)),
               steps_per_epoch=len(x) // scale.batch_size, progress=progress, desc="epochs")


@torch.no_grad()
def level_wrong(model: LevelNet, x: Tensor, y: Tensor) -> Tensor:
    """Which samples each level gets wrong, ``(levels, N)`` bool, with population statistics."""
    model.eval()
    return model(x).argmax(-1) != y


def level_errors(model: LevelNet, x: Tensor, y: Tensor) -> list[float]:
    """Error (%) of each level's prediction, with population statistics (eval mode)."""
    return [100.0 * float(w.float().mean()) for w in level_wrong(model, x, y)]


@torch.no_grad()
def training_loss(model: LevelNet, data: DataSplit, scale: MultiDomainScale) -> float:
    """Mean cross-entropy of the levels over the training samples, eval mode (population
    statistics): the same measure for every head, to pick learning rates and match training."""
    model.eval()
    x, y = data.train_x[: scale.num_train], data.train_y[: scale.num_train]
    return float(F.cross_entropy(model(x).flatten(0, 1), y.repeat(NUM_LEVELS)))


def _layers(model: nn.Module) -> list[DomainBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm)]


def level_shift(model: LevelNet) -> float | None:
    """How far apart the levels' population statistics are: the mean over layers, levels and
    channels of ``|mu_l - mu| / sigma``, where ``mu, sigma^2`` pool the levels (equal weights).

    None when no layer keeps per-level population statistics.
    """
    shifts = []
    for layer in _layers(model):
        if layer.population_stats == "domain":
            mean = layer.running_mean.detach().double()  # type: ignore[union-attr]
            var = layer.running_var.detach().double()  # type: ignore[union-attr]
            pooled = Moments.from_var_mean(torch.ones_like(mean), mean, var).total()
            shifts.append(((mean - pooled.mean).abs() / pooled.var().sqrt()).mean())
    return float(torch.stack(shifts).mean()) if shifts else None


def level_separation(model: LevelNet) -> dict[str, float] | None:
    """The levels' statistics at the head's first norm (its per-level population statistics):
    ``mean_shift`` = mean over channels of ``(max_l mu_l - min_l mu_l) / sqrt(mean_l var_l)``
    and ``std_ratio`` = mean over channels of ``max_l sigma_l / min_l sigma_l``. None without
    per-level statistics."""
    layers = [m for m in _layers(model) if m.population_stats == "domain"]
    if not layers:
        return None
    mean = layers[0].running_mean.detach().double()  # type: ignore[union-attr]
    std = layers[0].running_var.detach().double().sqrt()  # type: ignore[union-attr]
    spread = (std ** 2).mean(0).sqrt()
    return {"mean_shift": float(((mean.amax(0) - mean.amin(0)) / spread).mean()),
            "std_ratio": float((std.amax(0) / std.amin(0)).mean())}


def mean_of_levels(shared: LevelNet, per_level: LevelNet) -> None:
    """Install into ``shared``'s shared buffers the mean over levels of ``per_level``'s
    per-level means and variances: the fixed point of the paper's EMA over the levels' batches
    (equal batch sizes), which unlike pooling leaves out the variance between the levels."""
    for s, d in zip(_layers(shared), _layers(per_level), strict=True):
        s.running_mean.copy_(d.running_mean.mean(0))  # type: ignore[union-attr,operator]
        s.running_var.copy_(d.running_var.mean(0))  # type: ignore[union-attr,operator]


def _sibling(name: str, trained: LevelNet, data: DataSplit, scale: MultiDomainScale,
             seed: int) -> LevelNet:
    """The head ``name`` with ``trained``'s parameters (its population statistics to be set)."""
    model = build_model(name, data, scale.width, seed, trained.separation)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    return model


def run_training(training: str, data: DataSplit, scale: MultiDomainScale, seed: int,
                 separation: float, lr: float, progress: ProgressFactory | None = None
                 ) -> dict[str, Any]:
    """Train once for ``training`` (a key of :data:`TRAININGS`), then evaluate every head it
    serves: ``{head: {"error", "levels", "wrong" (levels, N) bool, "train_loss", ...}}``."""
    heads = TRAININGS[training]
    trained = build_model(heads[-1] if training.startswith("domain") else heads[0], data,
                          scale.width, seed, separation)
    train_levels(trained, data, scale, seed, progress, lr)
    x = data.train_x[: scale.num_train]
    batches = [x[i:i + scale.batch_size] for i in range(0, len(x), scale.batch_size)]

    def precise(model: LevelNet) -> LevelNet:
        if _layers(model):
            precise_bn(model, batches, num_samples=min(scale.precise_samples, len(x)),
                       progress=False)
        return model

    per_level = None
    if _layers(trained):
        per_level = precise(_sibling(heads[0].split("/")[0] + "/domain/" +
                                     heads[0].split("/")[2], trained, data, scale, seed))
    out: dict[str, Any] = {}
    for head in heads:
        _, pop, _ = HEADS[head]
        model = _sibling(head, trained, data, scale, seed)
        if pop == "shared" and HEADS[head][0] == "domain":
            assert per_level is not None
            mean_of_levels(model, per_level)
        else:
            precise(model)
        wrong = level_wrong(model, data.val_x[: scale.num_val], data.val_y[: scale.num_val])
        errors = [100.0 * float(w.float().mean()) for w in wrong]
        out[head] = {"error": sum(errors) / len(errors), "levels": errors, "wrong": wrong,
                     "train_loss": training_loss(model, data, scale),
                     "level_shift": level_shift(model)}
    if per_level is not None:
        out["separation"] = level_separation(per_level)
    return out


def _training_task(ctx: RunContext, training: str, scale: MultiDomainScale, seed: int,
                   separation: float, lr: float) -> dict[str, Any]:
    """:func:`run_training` as a task of ``ctx.run_all`` (a worker process loads the data
    itself)."""
    return run_training(training, ctx.dataset(), scale, seed, separation, lr, ctx.progress)


def consistent_head(training: str) -> str:
    """The head of ``training`` whose population statistics match its training statistics."""
    heads = TRAININGS[training]
    return next((h for h in heads if h in CONSISTENT), heads[0])


def _per_sample(wrong: np.ndarray) -> np.ndarray:
    """``(seeds, levels, N)`` 0/1 -> ``(seeds, N)``: each sample's error averaged over levels."""
    return np.asarray(wrong, dtype=np.float64).mean(1)


def _err(wrong: dict[str, np.ndarray], name: str) -> float:
    return 100.0 * float(np.mean(wrong[name]))


MATCHED_LOSS = 1.1  # training losses within this factor of the BN head's count as matched


def verdicts(wrong: dict[str, np.ndarray], matched: dict[str, str] | None = None,
             losses: dict[str, float] | None = None) -> list[SummaryRow]:
    """Summary rows from per-sample errors ``wrong[head]`` of shape ``(seeds, N)`` (each
    sample's error averaged over the levels, as a fraction) at the main separation; ``matched``
    names the heads compared at matched training (``"GroupNorm"``, ``"no norm"``, ``"bn"``:
    keys of ``wrong``; default the heads themselves) and ``losses`` their training losses (same
    keys as ``matched``): when the GN / no-norm head's loss is above :data:`MATCHED_LOSS` times
    the BN head's, training is not matched and that verdict is inconclusive whatever the
    errors (an under-trained head says nothing about its statistics)."""
    matched = matched or {"GroupNorm": "GroupNorm", "no norm": "no norm",
                          "bn": "domain/domain/shared"}
    worst_c = max(CONSISTENT, key=lambda n: _err(wrong, n))
    best_i = min(INCONSISTENT, key=lambda n: _err(wrong, n))
    gap = paired_bootstrap(wrong[best_i], wrong[worst_c])
    sds = paired_bootstrap(wrong["shared/domain/shared"], wrong[CONSISTENT_ROW])
    collapse = collapse_threshold(_err(wrong, CONSISTENT_ROW))
    dss = paired_bootstrap(wrong["domain/shared/shared"], wrong["domain/domain/shared"])
    alt = min(("GroupNorm", "no norm"), key=lambda n: _err(wrong, matched[n]))
    close = paired_bootstrap(wrong[matched[alt]], wrong[matched["bn"]])
    return [
        SummaryRow(
            "Sec. 5: only consistent (train stats, population stats) paradigms work",
            f"worst consistent {_err(wrong, worst_c):.1f} vs best inconsistent "
            f"{_err(wrong, best_i):.1f} (err %)",
            "AP >= 39.1 (rows 1, 4, 6) vs <= 35.5 (rows 2, 3, 5)",
            exceeds(f"err(best inconsistent: {best_i}) - err(worst consistent: {worst_c}) > 0",
                    gap)),
        SummaryRow(
            COLLAPSE_CLAIM,
            f"err {_err(wrong, 'shared/domain/shared'):.1f} vs {_err(wrong, CONSISTENT_ROW):.1f} "
            f"(consistent row)", "AP 2.1 vs 39.1",
            exceeds(f"err - err(consistent {CONSISTENT_ROW}) > {100 * COLLAPSE_FRACTION:.0f}% "
                    f"of the way to chance ({CHANCE_PT:.0f}%): > {collapse:.1f} pt", sds,
                    collapse)),
        SummaryRow(
            "Sec. 5: the common default (domain-specific training, shared population stats, "
            "the paper's EMA over the levels) is worse than domain-specific population stats",
            f"err {_err(wrong, 'domain/shared/shared'):.1f} vs "
            f"{_err(wrong, 'domain/domain/shared'):.1f}", "AP 34.1 vs 39.1",
            exceeds("err(row 3) - err(row 4) > 0", dss)),
        SummaryRow(
            "Sec. 5: GroupNorm / no-norm heads are close to the best consistent BN head (each at "
            "its best learning rate on training loss)",
            f"err {_err(wrong, matched[alt]):.1f} ({alt}) vs {_err(wrong, matched['bn']):.1f}",
            "AP 39.5 / 38.7 vs 39.2",
            _if_matched(equivalent(f"|err({alt}) - err(BN domain/domain/shared)| <= "
                                   f"{EQUIV_PT} pt (equivalence margin), at matched training "
                                   f"(loss <= {MATCHED_LOSS} x BN's)", close, EQUIV_PT),
                        alt, losses)),
    ]


def _if_matched(v: Verdict, alt: str, losses: dict[str, float] | None) -> Verdict:
    """``v``, or ``v`` made inconclusive when ``alt``'s training loss is not matched."""
    if losses is None or losses[alt] <= MATCHED_LOSS * losses["bn"]:
        return v
    return replace(v, agrees=False, outcome=INCONCLUSIVE,
                   detail=f"training not matched: loss {losses[alt]:.2f} ({alt}) vs "
                          f"{losses['bn']:.2f} (BN); " + v.detail)


def collapse_separation(sweep: dict[float, dict[str, np.ndarray]]) -> float | None:
    """The smallest separation at which shared training + per-level population statistics
    collapse (the interval of the rise over the consistent row at that separation above
    :func:`collapse_threshold`); None if none in the sweep."""
    for s in sorted(sweep):
        w, ok = sweep[s]["shared/domain/shared"], sweep[s][CONSISTENT_ROW]
        if paired_bootstrap(w, ok).low > collapse_threshold(100 * float(ok.mean())):
            return s
    return None


def _plot(ctx: RunContext, per_seed: dict[str, list[dict[str, Any]]],
          sweep: dict[float, dict[str, float]]) -> list[str]:
    plt = pyplot()
    names = [n for n in HEADS if n in per_seed]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 3.8), width_ratios=(2, 1))
    for level in range(NUM_LEVELS):
        vals = [mean_std([r["levels"][level] for r in per_seed[n]])[0] for n in names]
        xs = [i + (level - 1) * 0.27 for i in range(len(names))]
        ax.bar(xs, vals, 0.27, label=f"level {level} (1/{2**level} resolution)")
    ticks = [f"train: {t}\npop: {p}\naffine: {a}" if p != "-" else t
             for t, p, a in (HEADS[n] for n in names)]
    ticks = [t.replace("group", "GroupNorm").replace("none", "no norm") for t in ticks]
    ax.set_xticks(range(len(names)), ticks, fontsize=6)
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"Head shared by 3 levels (separation {SEPARATION})", fontsize=9)
    ax.legend(fontsize=7)
    seps = sorted(sweep)
    for head in ("shared/shared/shared", "shared/domain/shared", "domain/shared/shared",
                 "domain/domain/shared"):
        style = "o-" if head in CONSISTENT else "x--"
        ax2.plot(seps, [sweep[s][head] for s in seps], style, label=head)
    ax2.set_xlabel("separation s (level gain 2^(s(l-1)), offset s(l-1))")
    ax2.set_ylabel("validation error (%)")
    ax2.set_title("dose-response: consistent (solid) vs inconsistent (dashed)", fontsize=9)
    ax2.legend(fontsize=6)
    return [save_plot(ctx, fig, "multi_domain.png")]


Key = tuple[str, float, float]  # (training, separation, lr)


@dataclass(frozen=True)
class DomainRuns:
    """Every training of the study: ``runs[(training, separation, lr)]``, per seed, the
    cached result of :func:`run_training` (per head it serves: its errors, per-sample 0/1
    errors, training loss; and the levels' measured separation)."""

    scale: MultiDomainScale
    runs: dict[Key, list[dict[str, Any]]]

    def heads(self, sep: float, lrs: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
        """Per head (in ``TRAININGS``' order), its results per seed at separation ``sep``, each
        training at its learning rate in ``lrs`` (default the scale's)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for training, heads in TRAININGS.items():
            key = (training, sep, lrs.get(training, self.scale.lr))
            if key in self.runs:
                for h in heads:
                    out[h] = [r[h] for r in self.runs[key]]
        return out

    def loss(self, training: str, lr: float) -> float:
        """The mean training loss over seeds of ``training``'s consistent head at ``lr``."""
        head = consistent_head(training)
        return mean_std([r[head]["train_loss"]
                         for r in self.runs[(training, SEPARATION, lr)]])[0]

    def error(self, training: str, lr: float) -> float:
        """The validation error (%) of ``training``'s consistent head at ``lr`` (main
        separation), over seeds and samples: the number the summary quotes for it."""
        rs = [r[consistent_head(training)] for r in self.runs[(training, SEPARATION, lr)]]
        return 100.0 * float(_stack(rs).mean())

    def best_lr(self) -> dict[str, float]:
        """Per training of ``LR_GRID_TRAININGS``: the learning rate of the lowest loss."""
        return {t: min(self.scale.lr_grid, key=functools.partial(self.loss, t))
                for t in LR_GRID_TRAININGS}

    def matched_losses(self) -> dict[str, float]:
        """The training losses of the matched comparison at the kept learning rates, keyed as
        :func:`verdicts`' ``losses``."""
        best = self.best_lr()
        return {"GroupNorm": self.loss("GroupNorm", best["GroupNorm"]),
                "no norm": self.loss("no norm", best["no norm"]),
                "bn": self.loss("domain/*/shared", best["domain/*/shared"])}


@dataclass(frozen=True)
class DomainErrors:
    """What the verdicts, tables and plots read: per head its results per seed (main
    separation, the scale's lr), the per-sample errors ``wrong`` (heads, and the matched
    heads at their best lr as ``"<head> (best lr)"``), per separation the same per-sample
    errors and mean errors (%), and the first separation that collapses."""

    per_seed: dict[str, list[dict[str, Any]]]
    wrong: dict[str, np.ndarray]
    sweep_wrong: dict[float, dict[str, np.ndarray]]
    sweep: dict[float, dict[str, float]]
    collapse: float | None


MATCHED = {"GroupNorm": "GroupNorm (best lr)", "no norm": "no norm (best lr)",
           "bn": "domain/domain/shared (best lr)"}


def measure(ctx: RunContext, scale: MultiDomainScale) -> DomainRuns:
    """The study's trainings (cached): every training at the main separation (those of
    ``LR_GRID_TRAININGS`` at each learning rate of the grid), the sweep's trainings at the
    other separations."""
    jobs = ([(t, SEPARATION, lr) for t in TRAININGS
             for lr in (scale.lr_grid if t in LR_GRID_TRAININGS else (scale.lr,))]
            + [(t, sep, scale.lr) for sep in scale.separations if sep != SEPARATION
               for t in SWEEP_TRAININGS])
    jobs = list(dict.fromkeys(jobs))
    todo = [(j, s) for j in jobs for s in ctx.seeds]
    results = ctx.run_all(
        [Task({"study": "multi-domain", "v": 2, "data": ctx.data_spec, "training": training,
               "separation": sep, "lr": lr, "seed": seed, "scale": scale.as_dict()},
              _training_task, (training, scale, seed, sep, lr))
         for (training, sep, lr), seed in todo], desc="multi-domain runs")
    runs: dict[Key, list[dict[str, Any]]] = {}
    for (job, _), result in zip(todo, results, strict=True):
        runs.setdefault(job, []).append(result)
    return DomainRuns(scale, runs)


def _stack(rs: list[dict[str, Any]]) -> np.ndarray:
    return _per_sample(np.stack([np.asarray(r["wrong"], dtype=bool) for r in rs]))


def errors_of(runs: DomainRuns) -> DomainErrors:
    """The per-sample and mean errors of ``runs`` (see :class:`DomainErrors`)."""
    per_seed = runs.heads(SEPARATION, {})
    tuned = runs.heads(SEPARATION, runs.best_lr())
    wrong = {n: _stack(rs) for n, rs in per_seed.items()}
    wrong.update({f"{n} (best lr)": _stack(tuned[n]) for n in
                  ("GroupNorm", "no norm", "domain/domain/shared")})
    sweep_wrong = {s: {n: _stack(rs) for n, rs in runs.heads(s, {}).items()}
                   for s in runs.scale.separations}
    sweep = {s: {n: 100.0 * float(w.mean()) for n, w in ws.items()}
             for s, ws in sweep_wrong.items()}
    return DomainErrors(per_seed, wrong, sweep_wrong, sweep, collapse_separation(sweep_wrong))


def sweep_summary(runs: DomainRuns,
                  errors: DomainErrors) -> tuple[dict[float, dict[str, Any]], list[list[Any]]]:
    """Per separation (sorted): the levels' measured mean shift and std ratio, Table 5's rows
    1-4 and their paired differences, as numbers and as the sweep table's rows."""
    numbers, rows = {}, []
    for s in sorted(runs.scale.separations):
        measured = [r["separation"] for r in runs.runs[("shared/*/shared", s, runs.scale.lr)]]
        shift = mean_std([m["mean_shift"] for m in measured])[0]
        ratio = mean_std([m["std_ratio"] for m in measured])[0]
        w, e = errors.sweep_wrong[s], errors.sweep[s]
        g2 = paired_bootstrap(w["shared/domain/shared"], w["shared/shared/shared"])
        g3 = paired_bootstrap(w["domain/shared/shared"], w["domain/domain/shared"])
        numbers[s] = {"mean_shift": shift, "std_ratio": ratio, "errors": e,
                      "row2_minus_row1": g2.effect, "row3_minus_row4": g3.effect}
        rows.append([s, f"{shift:.2f}", f"{ratio:.2f}", e["shared/shared/shared"],
                     e["shared/domain/shared"], g2.text(), e["domain/domain/shared"],
                     e["domain/shared/shared"], g3.text()])
    return numbers, rows


def tables(runs: DomainRuns, errors: DomainErrors, sweep_rows: list[list[Any]]) -> list[Table]:
    """Our tables: the heads at the main separation, the learning-rate grid, the sweep."""
    rows = []
    for name, (ts, ps, aff) in HEADS.items():
        rs = errors.per_seed[name]
        rows.append([ts, ps, aff, fmt([r["error"] for r in rs]),
                     " / ".join(fmt([r["levels"][i] for r in rs]) for i in range(NUM_LEVELS)),
                     fmt([r["train_loss"] for r in rs])])
    ours = Table(f"validation error (%) at separation {SEPARATION}, mean of the levels (and per "
                 "level 0 / 1 / 2); pop 'shared' after per-level training = mean of the levels' "
                 "statistics (the paper's EMA), 'pooled' = all levels pooled",
                 ["SGD training stats", "population stats", "affine", "error", "per level",
                  "training loss"], rows)
    best_lr = runs.best_lr()
    lr_rows = [[t, f"{lr:g}", f"{runs.loss(t, lr):.3f}", runs.error(t, lr),
                "yes" if lr == best_lr[t] else ""]
               for t in LR_GRID_TRAININGS for lr in runs.scale.lr_grid]
    lr_table = Table(f"matched training: training loss (eval mode, mean over seeds) and "
                     f"validation error (%) of the consistent head at separation {SEPARATION} "
                     f"per learning rate; the lowest loss is kept",
                     ["training", "lr", "training loss", "val error", "kept"], lr_rows)
    sweep_table = Table(
        "separation sweep: the levels' statistics at the head's first norm (mean shift in "
        "pooled stds, std ratio max/min) and the errors (%) of Table 5's rows 1-4; differences "
        "paired over samples and seeds",
        ["separation", "mean shift", "std ratio", "row 1 s/s/s", "row 2 s/d/s",
         "row 2 - row 1", "row 4 d/d/s", "row 3 d/s/s", "row 3 - row 4"], sweep_rows)
    return [ours, lr_table, sweep_table]


def setup_text(ctx: RunContext, name: str, scale: MultiDomainScale) -> str:
    """The report's setup paragraph (``name``: the data's)."""
    return (
        f"{name}: {scale.num_train} training / {scale.num_val} validation samples. A 1-D "
        f"stem (no norm, width {scale.width}) and {NUM_LEVELS} FPN-like levels (average-pooled by "
        f"1, 2, 4, own 1x1 lateral conv, a fixed gain 2^(s(l-1)) and offset s(l-1), upsampled "
        f"back); one head conv-norm-ReLU-conv-norm-ReLU-pool-fc shared by the levels, each "
        f"level predicting the class. {scale.epochs} epochs, batch {scale.batch_size} "
        f"(x{NUM_LEVELS} levels in the head), lr {scale.lr} (grid {list(scale.lr_grid)} for "
        f"GN, no norm and the BN reference), cosine. Norm: DomainBatchNorm with the domain = "
        f"the level; population statistics from PreciseBN over {scale.precise_samples} "
        f"training samples. Separations {list(scale.separations)} (main table: "
        f"{SEPARATION}). Seeds: {list(ctx.seeds)}."
    )


def notes_text(runs: DomainRuns, numbers: dict[str, Any]) -> str:
    """The notes after the verdicts: where the collapse starts, pooled vs mean-of-levels
    statistics, the kept learning rates and whether training is matched."""
    collapse, sweep_numbers, m = (numbers["collapse_separation"], numbers["sweep"],
                                  numbers["mean_error"])
    best_lr = runs.best_lr()
    return (
        "Error (lower is better) where the paper reports AP. "
        + (f"Shared training + per-level population statistics collapse (the rise over the "
           f"consistent row more than {100 * COLLAPSE_FRACTION:.0f}% of the way to chance) "
           f"from separation {collapse} on "
           f"(mean shift {sweep_numbers[collapse]['mean_shift']:.2f}, std ratio "
           f"{sweep_numbers[collapse]['std_ratio']:.2f})." if collapse is not None else
           f"No separation in the sweep makes shared training + per-level population "
           f"statistics collapse (the rise over the consistent row more than "
           f"{100 * COLLAPSE_FRACTION:.0f}% of the way to chance).")
        + f" Pooled vs mean-of-levels shared statistics after per-level training: "
        f"{m['domain/pooled/shared']:.1f} vs {m['domain/shared/shared']:.1f} (affine shared), "
        f"{m['domain/pooled/domain']:.1f} vs {m['domain/shared/domain']:.1f} (affine per level). "
        f"Learning rates kept on training loss (and the loss reached): "
        + ", ".join(f"{t} {lr:g} ({runs.loss(t, lr):.2f})" for t, lr in best_lr.items())
        + (f". At these, the GN / no-norm heads reach a training loss within {MATCHED_LOSS} x "
           "the BN head's, so their comparison is at matched training." if all(
               runs.loss(t, best_lr[t]) <= MATCHED_LOSS * runs.loss(
                   "domain/*/shared", best_lr["domain/*/shared"])
               for t in ("GroupNorm", "no norm")) else
           f". At these, the GN / no-norm heads do not reach the BN head's training loss "
           f"(more than {MATCHED_LOSS} x it): under-trained heads say nothing about their "
           f"statistics at test time, so their verdict is inconclusive.")
        + shift_order_note(sweep_numbers)
    )


def _rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (Pearson's of their ranks; NaN when one
    is constant)."""
    ra, rb = (np.argsort(np.argsort(v)).astype(float) for v in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def collapse_explanation(sweep_numbers: dict[float, dict[str, Any]],
                         collapse: float | None) -> str:
    """Which measured quantity the rise of shared training + per-level population statistics
    over the consistent row (row 2 - row 1) follows over the separation sweep, and why it stays
    below the collapse here, from the numbers: the rank correlation (:func:`_rank_correlation`)
    of the rise with the levels' measured mean shift and std ratio at the head's first norm (a
    quantity follows at :data:`FOLLOWS_RANK` or more), the rise as a fraction of the way to
    chance at the main separation and at the sweep's largest value of that quantity, and
    ``collapse`` (the first separation that collapses, :func:`collapse_separation`)."""
    seps = sorted(sweep_numbers)
    rise = [sweep_numbers[s]["row2_minus_row1"] for s in seps]
    names = {"mean_shift": "mean shift", "std_ratio": "std ratio"}
    rank = {k: _rank_correlation([sweep_numbers[s][k] for s in seps], rise) for k in names}
    key = max(names, key=lambda k: -2.0 if np.isnan(rank[k]) else rank[k])
    follows = rank[key] >= FOLLOWS_RANK

    def way(s: float) -> str:
        row1, up = sweep_numbers[s]["errors"][CONSISTENT_ROW], sweep_numbers[s]["row2_minus_row1"]
        return (f"{names[key]} {sweep_numbers[s][key]:.2f}, rise {up:+.2f} pt, "
                f"{100 * up / (CHANCE_PT - row1):.0f}% of the way to chance from the consistent "
                f"row's {row1:.1f} (collapse threshold {collapse_threshold(row1):.1f} pt)")

    top = max(seps, key=lambda s: sweep_numbers[s][key])
    corr = "; ".join(f"{names[k]} {rank[k]:+.2f}" for k in names)
    head = ("over the separation sweep the rise over the consistent row (row 2 - row 1) "
            + (f"follows the levels' measured {names[key]} at the head's first norm" if follows
               else "follows neither measured quantity at the head's first norm")
            + f" (rank correlation over the {len(seps)} separations: {corr})")
    main = f"at separation {SEPARATION:.1f}: {way(SEPARATION)}; " if SEPARATION in seps else ""
    at = (f"{main}at the sweep's largest {names[key]}, separation {top:.1f}: {way(top)}; a "
          f"collapse needs the rise's whole 95% interval above the threshold")
    if not follows:
        return f"not explained by the measured quantities: {head}; {at}."
    if collapse is None:
        top_row1 = sweep_numbers[top]["errors"][CONSISTENT_ROW]
        if sweep_numbers[top]["row2_minus_row1"] >= collapse_threshold(top_row1):
            return (f"{head}; {at}: no separation collapses by that rule, but at separation "
                    f"{top:.1f} the rise reaches the threshold within its noise: the levels' "
                    f"measured {names[key]} is too small to collapse the head at separation "
                    f"{SEPARATION:.1f} (the main table's) and nears a collapse only at the "
                    f"sweep's largest {names[key]}.")
        return (f"{head}; {at}: no separation collapses, so the levels' measured "
                f"{names[key]} is not large enough here to collapse the head.")
    return f"{head}; {at}; the sweep collapses from separation {collapse:.1f} on."


def shift_order_note(sweep_numbers: dict[float, dict[str, Any]]) -> str:
    """A sentence where the sweep's measured mean shift does not grow with the planted
    separation (else empty): which separations break the order, and what is measured (the
    levels' statistics at the head's first norm of each trained model, after the levels'
    lateral convs that training fits, not the planted gain and offset of the input)."""
    seps = sorted(sweep_numbers)
    shifts = [sweep_numbers[s]["mean_shift"] for s in seps]
    falls = [f"{a:g} -> {b:g}: {x:.2f} -> {y:.2f}"
             for a, b, x, y in zip(seps, seps[1:], shifts, shifts[1:], strict=False) if y < x]
    if not falls:
        return ""
    ratios = ", ".join(f"{sweep_numbers[s]['std_ratio']:.2f}" for s in seps)
    return (f" The measured mean shift does not grow with the planted separation "
            f"({'; '.join(falls)}): it is measured at the head's first norm of each trained "
            f"model, after the levels' lateral convs, which training fits per separation and "
            f"seed, so it is the shift the head sees, not the planted gain and offset; the std "
            f"ratio ({ratios}) and the "
            f"errors are the sweep's other measures of it.")


PAPER_TABLE = Table("Table 5 (RetinaNet R50-FPN, COCO; AP, higher is better)",
                    ["SGD training stats", "population stats", "affine", "AP"],
                    [list(r) for r in paper.TABLE5])


@register_study("multi-domain", "Sec. 5, Table 5: a head shared by feature levels; BN statistics "
                                "per level or shared, in training and at inference")
def run(ctx: RunContext) -> StudyResult:
    """Stages: the trainings (:func:`measure`), their errors (:func:`errors_of`), the sweep
    (:func:`sweep_summary`), the numbers, tables, verdicts (:func:`verdicts`) and plots."""
    data = ctx.dataset()
    runs = measure(ctx, scale_for(ctx, data))
    errors = errors_of(runs)
    sweep_numbers, sweep_rows = sweep_summary(runs, errors)
    numbers = {"per_seed": {n: [{k: v for k, v in r.items() if k != "wrong"} for r in rs]
                            for n, rs in errors.per_seed.items()},
               "mean_error": {n: 100.0 * float(w.mean()) for n, w in errors.wrong.items()},
               "best_lr": runs.best_lr(), "sweep": sweep_numbers,
               "collapse_separation": errors.collapse, "scale": runs.scale.as_dict()}
    return StudyResult(setup=setup_text(ctx, data.name, runs.scale),
                       tables=tables(runs, errors, sweep_rows), paper_tables=[PAPER_TABLE],
                       plots=_plot(ctx, errors.per_seed, errors.sweep),
                       summary=explain(verdicts(errors.wrong, MATCHED, runs.matched_losses()),
                                       {COLLAPSE_CLAIM: collapse_explanation(
                                           sweep_numbers, errors.collapse)}),
                       numbers=numbers, notes=notes_text(runs, numbers))
