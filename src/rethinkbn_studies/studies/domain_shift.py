"""Study ``domain-shift`` (Sec. 5, Table 4): population statistics from the test domain.

A ResNet trained on clean, augmented data is evaluated on corrupted versions of the validation
set (:mod:`.corruptions`, all five families at every severity 1-5), with two sets of
population statistics each:

- the training domain's: PreciseBN over the (augmented) training data;
- the target domain's: :func:`~rethinkbn.population.recompute_stats` over held-out samples of
  that domain (the first half of the corrupted validation set), kept in a
  :class:`~rethinkbn.population.StatsBank` and switched in with ``bank.use(model, domain)``;
  every error is measured on the other half.

Sweeps beside the paper's table (at severity :data:`SEVERITY`): the number of target samples
the statistics are recomputed from (:data:`TARGET_COUNTS`), and the test-time alternatives users
compare against: an AdaBN-style EMA of the statistics updated in place on the test stream
(momentum :data:`EMA_MOMENTUM`, batches of :data:`STATS_BATCH`, starting from the training
statistics; each batch is predicted right after its update) and mini-batch statistics of each
test batch. Which corruptions are per-sample affine maps (and so undone by new statistics almost
by construction) is declared in :data:`~.corruptions.PER_SAMPLE_AFFINE` and measured per run.

The clean-domain rows of the paper: the clean evaluation half with the training statistics
(train-augmented), with statistics of un-augmented clean held-out samples, and with the
statistics of the contrast domain.

Training augmentation (drawn once per sample): a random circular shift of up to
:data:`MAX_SHIFT` positions along the last axis and an amplitude scale in [0.8, 1.2]; it shifts
the training statistics a little away from clean data, as ImageNet's crops and flips do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rethinkbn.layers import is_batchnorm
from rethinkbn.population import Snapshot, StatsBank, batch_stats_inference, recompute_stats

from ..contract import paper
from ..contract.base import RunContext, StudyResult, SummaryRow, Table, Task, register_study
from ..contract.verdicts import (
    Interval,
    all_hold,
    equivalent,
    exceeds,
    majority_hold,
    mcnemar,
    paired_bootstrap,
)
from ..toolkit.common import Scale, fmt, new_model, pyplot, save_plot, scale_for
from ..toolkit.corruptions import (
    CORRUPTIONS,
    PER_SAMPLE_AFFINE,
    SEVERITIES,
    affine_residual,
    corrupt,
)
from ..toolkit.data import DataSplit
from ..toolkit.train import TrainConfig, evaluate_wrong, predict_logits, train

__all__ = ["SEVERITY", "augment", "ema_on_stream", "run", "run_seed", "verdicts"]

SEVERITY = 3
TARGET_COUNTS = (4, 16, 64, 256, 1024)  # target samples for the statistics (capped at the half)
EMA_MOMENTUM = 0.1
EQUIV_PT = 1.0  # equivalence margin (error points)
COUNT_MARGIN_PT = 2.0  # "n target samples suffice": within this many points of all of them
MAX_SHIFT = 3
SGD_BATCH = 128
LR = 0.2
STATS_BATCH = 100
TRAIN_STATS = "train-augmented"
CLEAN_STATS = "clean, un-augmented"


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each sample circularly shifted by ``U{-MAX_SHIFT..MAX_SHIFT}`` along the last axis and
    scaled by ``U(0.8, 1.2)``; a new tensor, deterministic given ``generator``."""
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (x.size(0),), generator=generator)
    gains = 0.8 + 0.4 * torch.rand(x.size(0), generator=generator, dtype=torch.float64)
    out = torch.stack([row.roll(int(s), dims=-1) for row, s in zip(x, shifts, strict=True)])
    return out * gains.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _batches(x: Tensor) -> list[Tensor]:
    return [x[i:i + STATS_BATCH] for i in range(0, len(x), STATS_BATCH)]


@torch.no_grad()
def ema_on_stream(model: nn.Module, x: Tensor, y: Tensor, momentum: float = EMA_MOMENTUM,
                  batch_size: int = STATS_BATCH) -> Tensor:
    """AdaBN-style test-time adaptation in place: the test stream ``x`` arrives in batches; each
    batch first updates every BatchNorm layer's running statistics by an EMA (``momentum``),
    then is predicted with them (eval mode). Returns which samples were wrong. Works on a copy:
    ``model`` is unchanged."""
    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if is_batchnorm(m)]
    for m in norms:
        setattr(m, "momentum", momentum)  # noqa: B010 - a Module's attribute, typed as a Tensor
    device = next(adapted.parameters()).device
    wrong = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        adapted.eval()
        for m in norms:
            m.train()
        adapted(xb)
        adapted.eval()
        wrong.append(adapted(xb).argmax(1).cpu() != y[i:i + batch_size])
    return torch.cat(wrong)


def _mini_batch_wrong(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each test batch of STATS_BATCH normalized with its own statistics."""
    with batch_stats_inference(model), torch.no_grad():
        return predict_logits(model, x, STATS_BATCH).argmax(1) != y


def _counts(available: int) -> list[int]:
    return sorted({min(n, available) for n in TARGET_COUNTS})


def run_seed(ctx: RunContext, data: DataSplit, scale: Scale, seed: int) -> dict[str, Any]:
    """Train on augmented clean data once; then, for every corruption and severity, recompute
    the statistics on the first half of the corrupted validation set and measure which samples
    of the second half are wrong (bool vectors, for the paired tests)."""
    device = ctx.device
    g = torch.Generator().manual_seed(seed)
    train_x = augment(data.train_x[: scale.num_train], g)
    train_y = data.train_y[: scale.num_train]
    val_x, val_y = data.val_x[: scale.num_val], data.val_y[: scale.num_val]
    half = len(val_x) // 2
    stats_x, eval_x, eval_y = val_x[:half], val_x[half:], val_y[half:]
    model = new_model(ctx, data, scale, seed)
    config = TrainConfig(epochs=scale.epochs, batch_size=SGD_BATCH, lr=LR, warmup_epochs=1)
    train(model, train_x, train_y, config, seed=seed, progress=ctx.progress, desc=f"seed {seed}")

    def population(x: Tensor) -> Snapshot:
        """PreciseBN statistics over all of ``x``, in batches of STATS_BATCH."""
        return recompute_stats(model, _batches(x), num_samples=len(x), device=device,
                               progress=False)

    bank = StatsBank()
    bank[TRAIN_STATS] = population(train_x)
    bank[CLEAN_STATS] = population(stats_x)

    def wrong(stats_name: str, x: Tensor) -> Tensor:
        with bank.use(model, stats_name):
            return evaluate_wrong(model, x, eval_y)

    shifted: dict[str, dict[int, dict[str, Tensor]]] = {}
    counts: dict[str, dict[int, Tensor]] = {}
    test_time: dict[str, dict[str, Tensor]] = {}
    affine: dict[str, float] = {}
    for name in CORRUPTIONS:
        shifted[name] = {}
        for severity in SEVERITIES:
            held_out = corrupt(stats_x, name, severity, generator=g)
            test_x = corrupt(eval_x, name, severity, generator=g)
            key = f"{name}@{severity}"
            bank[key] = population(held_out)
            shifted[name][severity] = {"source": wrong(TRAIN_STATS, test_x),
                                       "target": wrong(key, test_x)}
            if severity != SEVERITY:
                continue
            affine[name] = affine_residual(eval_x, test_x)
            counts[name] = {}
            for n in _counts(len(held_out)):
                bank[f"{key}/{n}"] = population(held_out[:n])
                counts[name][n] = wrong(f"{key}/{n}", test_x)
            with bank.use(model, TRAIN_STATS):
                test_time[name] = {"ema": ema_on_stream(model, test_x, eval_y),
                                   "mini-batch": _mini_batch_wrong(model, test_x, eval_y)}
            test_time[name]["exact"] = shifted[name][severity]["target"]
            test_time[name]["source"] = shifted[name][severity]["source"]
    clean = {
        TRAIN_STATS: wrong(TRAIN_STATS, eval_x),
        CLEAN_STATS: wrong(CLEAN_STATS, eval_x),
        "contrast": wrong(f"contrast@{SEVERITY}", eval_x),
    }
    return {"shifted": shifted, "clean": clean, "counts": counts, "test_time": test_time,
            "affine_residual": affine}


def _seed_task(ctx: RunContext, scale: Scale, seed: int) -> dict[str, Any]:
    """:func:`run_seed` as a task of ``ctx.run_all`` (a worker process loads the data itself)."""
    return run_seed(ctx, ctx.dataset(), scale, seed)


def _stack(runs: list[dict[str, Any]], *path: Any) -> np.ndarray:
    """``(seeds, samples)`` 0/1 errors at ``run[path[0]][path[1]]...`` of every seed's run."""
    rows = []
    for r in runs:
        v = r
        for p in path:
            v = v[p]
        rows.append(np.asarray(v, dtype=bool))
    return np.stack(rows)


def _pct(w: np.ndarray) -> float:
    return 100.0 * float(np.mean(w))


def gain(source: np.ndarray, target: np.ndarray) -> Interval:
    """err(training-domain stats) - err(target-domain stats), paired over samples and seeds."""
    return paired_bootstrap(source, target)


def _gain_verdict(name: str, shifted: dict[str, dict[str, np.ndarray]]) -> Any:
    s, t = shifted[name]["source"], shifted[name]["target"]
    return exceeds(f"{name.replace('_', ' ')}: err(train stats) - err(target stats) > 0",
                   gain(s, t), 0.0, mcnemar(s, t).text())


def verdicts(shifted: dict[str, dict[str, np.ndarray]], clean: dict[str, np.ndarray]
             ) -> list[SummaryRow]:
    """Summary rows from per-sample errors ``(seeds, samples)`` at severity :data:`SEVERITY`:
    ``shifted[domain][source | target]`` and ``clean[stats]``."""
    paper_domains = ("contrast", "gaussian_noise")
    rows = [
        SummaryRow(
            "Sec. 5: target-domain population stats beat training-domain stats on shifted "
            "domains (contrast, noise)",
            ", ".join(f"{n.replace('_', ' ')} {_pct(shifted[n]['source']):.1f} -> "
                      f"{_pct(shifted[n]['target']):.1f}" for n in paper_domains),
            "contrast 40.8 -> 33.1, noise 64.4 -> 52.5",
            all_hold("both gains err(train stats) - err(target stats) > 0",
                     [_gain_verdict(n, shifted) for n in paper_domains])),
    ]
    non_affine = [n for n in shifted if n not in PER_SAMPLE_AFFINE]
    parts = [_gain_verdict(n, shifted) for n in non_affine]
    rows.append(SummaryRow(
        f"Sec. 5: recomputed statistics help on most corruptions that are not per-sample "
        f"affine maps ({', '.join(non_affine)}; severity {SEVERITY})",
        f"{sum(p.label == 'agrees' for p in parts)} of {len(parts)} improve beyond the noise",
        "3 of 3 (contrast, noise, jpeg)",
        majority_hold("more than half of the non-affine families: gain > 0 beyond the noise",
                      parts)))
    aug, unaug, con = clean[TRAIN_STATS], clean[CLEAN_STATS], clean["contrast"]
    rows.append(SummaryRow(
        "Sec. 5: on clean data, un-augmented stats ~ train-augmented stats",
        f"{_pct(aug):.1f} / {_pct(unaug):.1f}", "23.4 / 23.8",
        equivalent(f"|err(un-aug stats) - err(train-aug stats)| <= {EQUIV_PT} pt (equivalence "
                   "margin)", paired_bootstrap(unaug, aug), EQUIV_PT,
                   mcnemar(unaug, aug).text())))
    rows.append(SummaryRow(
        "Sec. 5: on clean data, contrast-domain stats are worse than train-augmented stats",
        f"{_pct(con):.1f} vs {_pct(aug):.1f}", "39.7 vs 23.4",
        exceeds("err(contrast stats) - err(train-aug stats) > 0", paired_bootstrap(con, aug),
                0.0, mcnemar(con, aug).text())))
    return rows


def sweep_tables(runs: list[dict[str, Any]]) -> tuple[list[Table], dict[str, Any]]:
    """The severity, sample-count and test-time tables, and their numbers."""
    names = list(runs[0]["shifted"])
    sev_rows: list[list[Any]] = []
    sev_numbers: dict[str, dict[int, dict[str, float]]] = {}
    for n in names:
        sev_numbers[n] = {}
        for k in SEVERITIES:
            s, t = _stack(runs, "shifted", n, k, "source"), _stack(runs, "shifted", n, k, "target")
            i = gain(s, t)
            sev_numbers[n][k] = {"source": _pct(s), "target": _pct(t), "gain": i.effect,
                                 "low": i.low, "high": i.high}
            sev_rows.append([n.replace("_", " "), k, _pct(s), _pct(t), i.text()])
    severity = Table("error (%) vs severity: training-domain vs target-domain statistics; gain "
                     "= difference, paired bootstrap over samples and seeds",
                     ["corruption", "severity", "train stats", "target stats", "gain"],
                     sev_rows)
    count_rows: list[list[Any]] = []
    count_numbers: dict[str, Any] = {}
    for n in names:
        exact = _stack(runs, "shifted", n, SEVERITY, "target")
        count_numbers[n] = {}
        enough = None
        for c in runs[0]["counts"][n]:
            w = _stack(runs, "counts", n, c)
            v = equivalent("", paired_bootstrap(w, exact), COUNT_MARGIN_PT)
            count_numbers[n][c] = {"error": _pct(w), "vs_all": v.effect, "verdict": v.label}
            if enough is None and v.label == "agrees":
                enough = c
            count_rows.append([n.replace("_", " "), c, _pct(w), v.detail, v.label])
        count_numbers[n]["fewest_within_margin"] = enough
    counts = Table(f"error (%) at severity {SEVERITY} with target statistics from n samples; "
                   f"vs all {max(runs[0]['counts'][names[0]])}: equivalent within "
                   f"{COUNT_MARGIN_PT} pt?", ["corruption", "n", "error", "difference to all",
                                        "within margin"], count_rows)
    tt_rows, tt_numbers = [], {}
    for n in names:
        tw = {k: _stack(runs, "test_time", n, k) for k in ("source", "exact", "ema", "mini-batch")}
        ema = paired_bootstrap(tw["ema"], tw["exact"])
        mb = paired_bootstrap(tw["mini-batch"], tw["exact"])
        tt_numbers[n] = {**{k: _pct(v) for k, v in tw.items()}, "ema_minus_exact": ema.effect,
                         "mini_batch_minus_exact": mb.effect}
        tt_rows.append([n.replace("_", " "), _pct(tw["source"]), _pct(tw["exact"]),
                        _pct(tw["ema"]), _pct(tw["mini-batch"]), ema.text(), mb.text()])
    test_time = Table(
        f"test-time alternatives at severity {SEVERITY}, error (%): exact recompute on held-out "
        f"target samples vs an EMA adapted in place on the test stream (AdaBN-style, momentum "
        f"{EMA_MOMENTUM}, batches of {STATS_BATCH}) vs mini-batch statistics of each test batch",
        ["corruption", "train stats", "exact", "EMA on stream", "mini-batch",
         "EMA - exact", "mini-batch - exact"], tt_rows)
    return [severity, counts, test_time], {"severity": sev_numbers, "counts": count_numbers,
                                           "test_time": tt_numbers}


def _plot(ctx: RunContext, sev: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    plt = pyplot()
    names = list(sev)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.2), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), names, strict=True):
        ks = list(SEVERITIES)
        ax.plot(ks, [sev[n][k]["source"] for k in ks], "o-", label="training-domain stats")
        ax.plot(ks, [sev[n][k]["target"] for k in ks], "s-", label="target-domain stats")
        affine = " (affine)" if n in PER_SAMPLE_AFFINE else ""
        ax.set_title(n.replace("_", " ") + affine, fontsize=9)
        ax.set_xlabel("severity")
        ax.set_xticks(ks)
    np.atleast_1d(axes)[0].set_ylabel("validation error (%)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    return [save_plot(ctx, fig, "domain_shift.png")]


@dataclass(frozen=True)
class ShiftRuns:
    """Everything the study measured: per seed the cached result of :func:`run_seed`, and from
    them the per-sample 0/1 errors the verdicts judge: ``at[corruption]["source"|"target"]``
    (at ``SEVERITY``, statistics from the training domain or the target) and
    ``clean[statistics]``, and per corruption its largest measured affine residual."""

    runs: list[dict[str, Any]]
    at: dict[str, dict[str, np.ndarray]]
    clean: dict[str, np.ndarray]
    residual: dict[str, float]

    @classmethod
    def of(cls, runs: list[dict[str, Any]]) -> ShiftRuns:
        names = list(CORRUPTIONS)
        return cls(runs,
                   {n: {k: _stack(runs, "shifted", n, SEVERITY, k) for k in ("source", "target")}
                    for n in names},
                   {k: _stack(runs, "clean", k) for k in runs[0]["clean"]},
                   {n: max(float(r["affine_residual"][n]) for r in runs) for n in names})


def measure(ctx: RunContext, scale: Scale) -> ShiftRuns:
    """One training run per seed (cached), evaluated on every corruption and severity."""
    return ShiftRuns.of(ctx.run_all(
        [Task({"study": "domain-shift", "v": 2, "data": ctx.data_spec, "seed": seed,
               "severities": list(SEVERITIES), "counts": list(TARGET_COUNTS),
               "ema_momentum": EMA_MOMENTUM, "sgd_batch": SGD_BATCH, "lr": LR,
               "scale": scale.as_dict()}, _seed_task, (scale, seed)) for seed in ctx.seeds],
        desc="domain-shift runs"))


def own_tables(shift: ShiftRuns) -> list[Table]:
    """Our clean-validation and affine-residual tables."""
    ours_clean = Table("clean validation error (%) with statistics from ...",
                       ["statistics from", "error"],
                       [[k, fmt([_pct(w) for w in v])] for k, v in shift.clean.items()])
    affine_table = Table(
        "which corruptions are per-sample affine maps x -> a x + b (declared; measured: the "
        "largest relative least-squares residual over the evaluation samples)",
        ["corruption", "declared affine", "measured residual"],
        [[n.replace("_", " "), "yes" if n in PER_SAMPLE_AFFINE else "no",
          f"{shift.residual[n]:.2g}"] for n in CORRUPTIONS])
    return [ours_clean, affine_table]


PAPER_TABLES = [
    Table("Table 4 (ResNet-50, ImageNet-C; error %)",
          ["test domain", "stats from ImageNet", "stats from the test domain"],
          [[n, a, b] for n, (a, b) in paper.TABLE4.items()]),
    Table("Clean ImageNet val (error %) with statistics from ...", ["statistics from", "error"],
          [[k, v] for k, v in paper.TABLE4_CLEAN.items()]),
]


def setup_text(ctx: RunContext, name: str, scale: Scale) -> str:
    """The report's setup paragraph (``name``: the data's)."""
    return (
        f"{name}: {scale.num_train} training samples (augmented: shift <= {MAX_SHIFT}, "
        f"gain 0.8-1.2), ResNet widths {list(scale.widths)}, {scale.epochs} epochs, SGD batch "
        f"{SGD_BATCH} ({scale.epochs * (scale.num_train // SGD_BATCH)} steps: one training run "
        f"per seed), lr {LR}. The {scale.num_val} validation samples are split in two halves: "
        f"statistics of a domain are recomputed (PreciseBN, batches of {STATS_BATCH}) on the "
        f"first half, errors are measured on the second. Corruptions: {', '.join(CORRUPTIONS)} "
        f"at severities {SEVERITIES[0]}-{SEVERITIES[-1]} (the summary at severity {SEVERITY}). "
        f"Seeds: {list(ctx.seeds)}. Every difference is a paired bootstrap over the evaluation "
        f"samples and seeds."
    )


def notes_text(shift: ShiftRuns, sweep_numbers: dict[str, Any]) -> str:
    """The notes after the verdicts: which corruptions are affine, the gain from severity 1 to
    5, the fewest target samples that suffice."""
    names = list(CORRUPTIONS)
    fewest = {n: sweep_numbers["counts"][n]["fewest_within_margin"] for n in names}
    sev = sweep_numbers["severity"]
    affine = [n for n in names if shift.residual[n] < 1e-6]
    return (
        "Our 'jpeg' analog is uniform quantization. Per-sample affine corruptions (measured "
        f"residual < 1e-6: {', '.join(affine) or 'none'}) are "
        "shifts that BatchNorm statistics can undo; the others change the shape of the signal. "
        "Gain of target statistics at severity 1 -> 5: "
        + "; ".join(f"{n.replace('_', ' ')} {sev[n][1]['gain']:+.1f} -> {sev[n][5]['gain']:+.1f}"
                    for n in names)
        + " pt. Fewest target samples whose statistics are within the "
        f"{COUNT_MARGIN_PT} pt margin of all of them (severity {SEVERITY}): "
        + "; ".join(f"{n.replace('_', ' ')} {fewest[n] if fewest[n] is not None else 'none'}"
                    for n in names) + "."
    )


@register_study("domain-shift", "Sec. 5, Table 4: population statistics re-estimated on each "
                                "corrupted test domain vs the training domain's")
def run(ctx: RunContext) -> StudyResult:
    """Stages: the runs (:func:`measure`), the sweep's tables and numbers
    (:func:`sweep_tables`), our other tables, the verdicts (:func:`verdicts`), notes, plots."""
    data = ctx.dataset()
    scale = scale_for(ctx, quick_epochs=8, full_epochs=30)
    shift = measure(ctx, scale)
    sweeps, sweep_numbers = sweep_tables(shift.runs)
    numbers = {"severity": SEVERITY, "scale": scale.as_dict(), **sweep_numbers,
               "clean": {k: _pct(v) for k, v in shift.clean.items()},
               "affine_residual": shift.residual}
    return StudyResult(setup=setup_text(ctx, data.name, scale),
                       tables=[*sweeps, *own_tables(shift)], paper_tables=list(PAPER_TABLES),
                       plots=_plot(ctx, sweep_numbers["severity"]),
                       summary=verdicts(shift.at, shift.clean), numbers=numbers,
                       notes=notes_text(shift, sweep_numbers))
