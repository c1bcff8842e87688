"""Study ``multi-domain`` (Sec. 5, Table 5): a head shared by feature levels, BN per domain or not.

An FPN-like classifier for 1-D signals: a stem (no normalization) computes features ``f`` of the
input; level ``l`` (``l = 0, 1, 2``) is ``lateral_l(avgpool(f, 2^l))`` upsampled back to the
input length, so the levels see the same input at three resolutions through their own lateral
convolution, and their statistics differ. One head ``conv-norm-ReLU-conv-norm-ReLU-pool-fc`` is
shared by all levels (the levels are concatenated along the batch with their level as domain id)
and every level predicts the class. The loss is the mean of the levels' cross-entropies; the
metric is the mean of the levels' errors (each level is a detector for its scale, as an FPN level
is for its object sizes).

The norms in the head are :class:`~rethinkbn.layers.DomainBatchNorm` with the six combinations of
(SGD training statistics, population statistics, affine) of the paper's Table 5, plus GroupNorm
and no normalization. Population statistics come from :func:`~rethinkbn.population.precise_bn`
(per domain or shared, as the layer says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rethinkbn.layers import DomainBatchNorm
from rethinkbn.population import precise_bn
from rethinkbn.stats import Moments

from . import paper
from .base import (
    ProgressFactory,
    RunContext,
    StudyResult,
    SummaryRow,
    Table,
    mean_std,
    register_study,
    verdict,
)
from .common import fmt, pyplot, save_plot
from .data import DataSplit
from .train import TrainConfig, sgd, shuffled_batches

__all__ = ["HEADS", "LevelNet", "MultiDomainScale", "run", "run_head", "verdicts"]

NUM_LEVELS = 3

# name -> (SGD training stats, population stats, affine) as DomainBatchNorm flags, or a norm kind.
HEADS: dict[str, tuple[str, str, str]] = {
    "shared/shared/shared": ("shared", "shared", "shared"),
    "shared/domain/shared": ("shared", "domain", "shared"),
    "domain/shared/shared": ("domain", "shared", "shared"),
    "domain/domain/shared": ("domain", "domain", "shared"),
    "domain/shared/domain": ("domain", "shared", "domain"),
    "domain/domain/domain": ("domain", "domain", "domain"),
    "GroupNorm": ("group", "-", "-"),
    "no norm": ("none", "-", "-"),
}
CONSISTENT = ("shared/shared/shared", "domain/domain/shared", "domain/domain/domain")
INCONSISTENT = ("shared/domain/shared", "domain/shared/shared", "domain/shared/domain")


@dataclass(frozen=True)
class MultiDomainScale:
    num_train: int
    num_val: int
    epochs: int
    width: int = 32
    batch_size: int = 64
    lr: float = 0.05
    precise_samples: int = 2000

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def scale_for(ctx: RunContext, data: DataSplit) -> MultiDomainScale:
    """Tiny (tests): 256 samples, 1 epoch; quick: 2000 samples x 10 epochs; full: all x 20."""
    if ctx.tiny:
        return MultiDomainScale(256, 128, 1, width=8, precise_samples=256)
    if ctx.quick:
        return MultiDomainScale(min(2000, len(data.train_x)), min(1000, len(data.val_x)), 10)
    return MultiDomainScale(len(data.train_x), len(data.val_x), 20)


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
    """Stem, three FPN-like levels, one head shared by the levels.

    ``forward(x (N, C, L))`` returns logits of shape ``(levels, N, classes)``.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.laterals = nn.ModuleList(nn.Conv1d(width, width, 1) for _ in range(NUM_LEVELS))
        self.head = _Head(width, num_classes, norm)

    def forward(self, x: Tensor) -> Tensor:
        f = self.stem(x)
        length = x.size(-1)
        levels = [
            F.interpolate(lat(F.avg_pool1d(f, 2**i)) if i else lat(f), size=length,
                          mode="nearest")
            for i, lat in enumerate(self.laterals)
        ]
        domain = torch.arange(NUM_LEVELS, device=x.device).repeat_interleave(x.size(0))
        logits = self.head(torch.cat(levels), domain)
        return logits.view(NUM_LEVELS, x.size(0), -1)


def build_model(name: str, data: DataSplit, width: int, seed: int) -> LevelNet:
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
                               population_stats=pop_stats, affine=affine)

    torch.manual_seed(seed)
    return LevelNet(data.in_channels, data.num_classes, width, norm)


def train_levels(model: LevelNet, data: DataSplit, scale: MultiDomainScale, seed: int,
                 progress: ProgressFactory | None = None) -> float:
    """SGD (momentum 0.9, cosine lr) on the mean of the levels' cross-entropies; returns the
    last step's loss. ``progress`` (optional) draws a bar over the epochs."""
    x, y = data.train_x[: scale.num_train], data.train_y[: scale.num_train]
    config = TrainConfig(epochs=scale.epochs, batch_size=scale.batch_size, lr=scale.lr)
    return sgd(model, config, shuffled_batches(len(x), scale.batch_size, seed),
               lambda m, idx: F.cross_entropy(m(x[idx]).flatten(0, 1),
                                              y[idx].repeat(NUM_LEVELS)),
               steps_per_epoch=len(x) // scale.batch_size, progress=progress, desc="epochs")


@torch.no_grad()
def level_errors(model: LevelNet, x: Tensor, y: Tensor) -> list[float]:
    """Error (%) of each level's prediction, with population statistics (eval mode)."""
    model.eval()
    pred = model(x).argmax(-1)
    return [100.0 * float((pred[i] != y).float().mean()) for i in range(NUM_LEVELS)]


def level_shift(model: LevelNet) -> float | None:
    """How far apart the levels' population statistics are: the mean over layers, levels and
    channels of ``|mu_l - mu| / sigma``, where ``mu, sigma^2`` pool the levels (equal weights).

    None when no layer keeps per-level population statistics.
    """
    shifts = []
    for layer in model.modules():
        if isinstance(layer, DomainBatchNorm) and layer.population_stats == "domain":
            mean = layer.running_mean.detach().double()  # type: ignore[union-attr]
            var = layer.running_var.detach().double()  # type: ignore[union-attr]
            pooled = Moments.from_var_mean(torch.ones_like(mean), mean, var).total()
            shifts.append(((mean - pooled.mean).abs() / pooled.var().sqrt()).mean())
    return float(torch.stack(shifts).mean()) if shifts else None


def run_head(name: str, data: DataSplit, scale: MultiDomainScale, seed: int,
             progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Train one head variant, estimate population statistics, and measure the level errors."""
    model = build_model(name, data, scale.width, seed)
    loss = train_levels(model, data, scale, seed, progress)
    if any(isinstance(m, DomainBatchNorm) for m in model.modules()):
        x = data.train_x[: scale.num_train]
        batches = [x[i:i + scale.batch_size] for i in range(0, len(x), scale.batch_size)]
        precise_bn(model, batches, num_samples=min(scale.precise_samples, len(x)),
                   progress=False)
    errors = level_errors(model, data.val_x[: scale.num_val], data.val_y[: scale.num_val])
    return {"error": sum(errors) / len(errors), "levels": errors, "train_loss": loss,
            "level_shift": level_shift(model)}


COLLAPSE_PT = 50.0  # % error: half of the 90% of chance level on 10 classes


def verdicts(mean: dict[str, float]) -> list[SummaryRow]:
    """Summary rows from the mean error of each head (``mean[name]``)."""
    worst_consistent = max(mean[n] for n in CONSISTENT)
    best_inconsistent = min(mean[n] for n in INCONSISTENT)
    sds = mean["shared/domain/shared"]
    dss, dds = mean["domain/shared/shared"], mean["domain/domain/shared"]
    best_bn = min(mean[n] for n in CONSISTENT)
    alt = min(mean["GroupNorm"], mean["no norm"])
    return [
        SummaryRow(
            "Sec. 5: only consistent (train stats, population stats) paradigms work",
            f"worst consistent {worst_consistent:.1f} vs best inconsistent "
            f"{best_inconsistent:.1f} (err %)",
            "AP >= 39.1 (rows 1, 4, 6) vs <= 35.5 (rows 2, 3, 5)",
            verdict("max err(consistent) < min err(inconsistent)",
                    worst_consistent < best_inconsistent,
                    f"{worst_consistent:.1f} < {best_inconsistent:.1f}")),
        SummaryRow(
            "Sec. 5: shared training stats + domain-specific population stats collapses",
            f"err {sds:.1f}", "AP 2.1",
            verdict(f"err >= {COLLAPSE_PT:.0f}%", sds >= COLLAPSE_PT, f"{sds:.1f}%")),
        SummaryRow(
            "Sec. 5: the common default (domain-specific training, shared population stats) "
            "is worse than domain-specific population stats",
            f"err {dss:.1f} vs {dds:.1f}", "AP 34.1 vs 39.1",
            verdict("err(row 3) - err(row 4) >= 2 pt", dss - dds >= 2.0,
                    f"{dss - dds:+.1f} pt")),
        SummaryRow(
            "Sec. 5: GroupNorm / no-norm heads are close to the best consistent BN head",
            f"err {alt:.1f} (best of GN, no norm) vs {best_bn:.1f}", "AP 39.5 / 38.7 vs 39.2",
            verdict("err(best of GN, no norm) - err(best consistent BN) <= 2 pt",
                    alt - best_bn <= 2.0, f"{alt - best_bn:+.1f} pt")),
    ]


def _plot(ctx: RunContext, per_seed: dict[str, list[dict[str, Any]]]) -> list[str]:
    plt = pyplot()
    names = list(HEADS)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for level in range(NUM_LEVELS):
        vals = [mean_std([r["levels"][level] for r in per_seed[n]])[0] for n in names]
        xs = [i + (level - 1) * 0.27 for i in range(len(names))]
        ax.bar(xs, vals, 0.27, label=f"level {level} (1/{2**level} resolution)")
    ticks = [f"train: {t}\npop: {p}\naffine: {a}" if p != "-" else t
             for t, p, a in (HEADS[n] for n in names)]
    ticks = [t.replace("group", "GroupNorm").replace("none", "no norm") for t in ticks]
    ax.set_xticks(range(len(names)), ticks, fontsize=7)
    ax.set_ylabel("validation error (%)")
    ax.set_title("Head shared by 3 levels: BN statistics shared or per level (domain)")
    ax.legend(fontsize=8)
    return [save_plot(ctx, fig, "multi_domain.png")]


@register_study("multi-domain", "Sec. 5, Table 5: a head shared by feature levels; BN statistics "
                                "per level or shared, in training and at inference")
def run(ctx: RunContext) -> StudyResult:
    data = ctx.dataset()
    scale = scale_for(ctx, data)
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in HEADS}
    jobs = [(n, s) for n in HEADS for s in ctx.seeds]
    for name, seed in ctx.progress(jobs, desc="multi-domain runs", total=len(jobs), leave=True):
        key = {"study": "multi-domain", "v": 1, "data": ctx.data_spec, "head": name,
               "seed": seed, "scale": scale.as_dict()}
        per_seed[name].append(ctx.cache.get_or_run(
            key, lambda n=name, s=seed: run_head(n, data, scale, s, ctx.progress)))
    mean = {n: mean_std([r["error"] for r in rs])[0] for n, rs in per_seed.items()}
    numbers = {"per_seed": per_seed, "mean_error": mean, "scale": scale.as_dict()}
    rows = []
    for name, (ts, ps, aff) in HEADS.items():
        rs = per_seed[name]
        rows.append([ts, ps, aff, fmt([r["error"] for r in rs]),
                     " / ".join(fmt([r["levels"][i] for r in rs]) for i in range(NUM_LEVELS))])
    ours = Table("validation error (%), mean of the levels (and per level 0 / 1 / 2)",
                 ["SGD training stats", "population stats", "affine", "error", "per level"],
                 rows)
    theirs = Table("Table 5 (RetinaNet R50-FPN, COCO; AP, higher is better)",
                   ["SGD training stats", "population stats", "affine", "AP"],
                   [list(r) for r in paper.TABLE5])
    setup = (
        f"{data.name}: {scale.num_train} training / {scale.num_val} validation samples. A 1-D "
        f"stem (no norm, width {scale.width}) and {NUM_LEVELS} FPN-like levels (average-pooled by "
        f"1, 2, 4, own 1x1 lateral conv, upsampled back); one head conv-norm-ReLU-conv-norm-ReLU-"
        f"pool-fc shared by the levels, each level predicting the class. {scale.epochs} epochs, "
        f"batch {scale.batch_size} (x{NUM_LEVELS} levels in the head), lr {scale.lr}, cosine. "
        f"Norm: DomainBatchNorm with the domain = the level; population statistics from "
        f"PreciseBN over {scale.precise_samples} training samples. Seeds: {list(ctx.seeds)}."
    )
    shift = mean_std([r["level_shift"] for r in per_seed["shared/domain/shared"]])[0]
    loss = {n: mean_std([r["train_loss"] for r in rs])[0] for n, rs in per_seed.items()}
    notes = (
        "Error (lower is better) where the paper reports AP. Whether shared training statistics "
        "with per-level population statistics collapse depends on how far apart the levels' "
        "statistics are: here, with shared training statistics, the levels' population means "
        f"differ from the pooled mean by {shift:.2f} pooled standard deviations on average "
        "(head layers, channels); a model trained longer moves them closer still, so per-level "
        "statistics at inference are a milder shift than RetinaNet's FPN levels, whose object "
        "scales and top-down pathway keep their statistics apart. "
        "The GroupNorm and no-norm heads are far behind BN here, unlike in the paper; their "
        "training loss shows why: they are under-trained in our short schedule (final "
        f"training loss {loss['GroupNorm']:.2f} (GN) and {loss['no norm']:.2f} (no norm) vs "
        f"{loss['domain/domain/shared']:.2f} for the domain/domain/shared BN head), i.e. an "
        "optimization gap of an un-normalized network (our stem has no norm either), not an "
        "effect of the statistics at test time. The paper's detectors train far longer, with "
        "(frozen) BN in the backbone."
    )
    return StudyResult(setup=setup, tables=[ours], paper_tables=[theirs],
                       plots=_plot(ctx, per_seed), summary=verdicts(mean), numbers=numbers,
                       notes=notes)
