"""Table 2: population statistics from PreciseBN with batch B, for models trained with NBS 32/2.

Per seed, two models are trained with SGD batch ``SGD_BATCH`` and normalization batch size 32
and 2 (ghost BN). Each is evaluated with its EMA statistics and with PreciseBN statistics from
all training samples (N) run in batches of B in {2, 10, 100, 1000, N}.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from torch import nn

from . import bn, paper
from .base import RunContext, StudyResult, SummaryRow, Table, Task, Verdict, register_study
from .common import (
    CALIBRATION_CORR_NOISE,
    GHOST_LR,
    GHOST_SGD_BATCH,
    MNIST1D_CORR_NOISE,
    Scale,
    data_key,
    data_name,
    fmt,
    ghost_model,
    ghost_model_task,
    ghost_scale,
    over_seeds,
    study_data,
)
from .train import evaluate_error, evaluate_wrong
from .verdicts import equivalent, exceeds, mcnemar, paired_bootstrap

SGD_BATCH = GHOST_SGD_BATCH
NBS_VALUES = (32, 2)
LR = GHOST_LR
# "B=2 is much worse" / "a tiny NBS hurts": the effect must exceed this many points.
WORSE_MARGIN = 0.5
# "B >= 100 is as good as B=N": the equivalence margin (points), judged on a 90% interval.
EQUAL_MARGIN = 0.5


def _batches(n: int) -> list[int]:
    return [b for b in (2, 10, 100, 1000) if b < n] + [n]


def _evaluate(ctx: RunContext, scale: Scale, nbs: int, seed: int,
              trained: dict[str, Any]) -> dict[str, Any]:
    """Validation errors of the shared NBS model with its EMA and with PreciseBN statistics
    from all N training samples in batches of B; per column the error (%) and which validation
    samples it gets wrong (for the paired tests)."""
    data = study_data(ctx).subset(scale.num_train, scale.num_val)
    model = ghost_model(ctx, scale, nbs, seed, trained)
    n = len(data.train_x)
    wrong = {"EMA": evaluate_wrong(model, data.val_x, data.val_y)}
    exact: nn.Module = copy.deepcopy(model)
    bn.population_stats(exact, data.train_x, batch_size=n, num_samples=n, seed=seed)
    layers: dict[str, list[float]] = {}
    for b in _batches(n)[:-1]:
        # Start from the B=N statistics: PreciseBN's report then gives, per layer, how far
        # the batch-B estimate lies from them.
        m: nn.Module = copy.deepcopy(exact)
        report = bn.population_stats(m, data.train_x, batch_size=b, num_samples=n, seed=seed)
        wrong[f"B={b}"] = evaluate_wrong(m, data.val_x, data.val_y)
        if b == 2:
            layers = {k: [r.mean_shift, r.std_log_ratio] for k, r in report.layers.items()}
    wrong["B=N"] = evaluate_wrong(exact, data.val_x, data.val_y)
    return {"errors": {k: 100.0 * float(w.float().mean()) for k, w in wrong.items()},
            "wrong": wrong, "layers_b2": layers}


def _calibration_errors(ctx: RunContext, scale: Scale, corr_noise: float | None,
                        trained: dict[str, Any]) -> dict[str, float]:
    """Training and validation error (EMA statistics) of the NBS=32 model, seed 0, on the data
    with correlated noise ``corr_noise``: one row of the difficulty calibration."""
    data = study_data(ctx, corr_noise).subset(scale.num_train, scale.num_val)
    model = ghost_model(ctx, scale, 32, ctx.seeds[0], trained)
    return {"train": evaluate_error(model, data.train_x, data.train_y),
            "val": evaluate_error(model, data.val_x, data.val_y)}


def calibration(ctx: RunContext, scale: Scale) -> Table | None:
    """The task-difficulty calibration (MNIST-1D only): the baseline's error at a few
    correlated-noise scales of the generator, the chosen one marked (cached runs)."""
    if data_key(ctx) == ctx.data_spec:
        return None
    seed = ctx.seeds[0]
    for c in CALIBRATION_CORR_NOISE:
        study_data(ctx, c)  # generated here once, before worker processes read it
    tasks = [ghost_model_task(ctx, scale, 32, seed, c) for c in CALIBRATION_CORR_NOISE]
    models = ctx.run_all(tasks, desc="precise-batch: calibration")
    errors = ctx.run_all([Task({"study": "precise-batch", "run": "calibration", "v": 1,
                                "model": t.config}, _calibration_errors, (scale, c, m))
                          for t, c, m in zip(tasks, CALIBRATION_CORR_NOISE, models, strict=True)],
                         desc="precise-batch: calibration")
    rows = [[f"{c:g}" + (" (chosen)" if c == MNIST1D_CORR_NOISE else
                         " (generator default)" if c == 0.25 else ""), e["train"], e["val"]]
            for c, e in zip(CALIBRATION_CORR_NOISE, errors, strict=True)]
    return Table(f"task difficulty: the NBS=32 baseline (seed {seed}, {scale.epochs} epochs) "
                 f"against MNIST-1D's correlated-noise scale; error (%) with EMA statistics",
                 ["corr_noise_scale", "train error", "val error"], rows)


def _paired(wrong: dict[str, dict[str, list[Any]]], a: tuple[str, str],
            b: tuple[str, str]) -> tuple[Any, str]:
    """Paired bootstrap of err(a) - err(b) (``(nbs, column)`` each) over the validation samples
    and seeds, and McNemar's test beside it."""
    wa = np.stack([np.asarray(w, dtype=bool) for w in wrong[a[0]][a[1]]])
    wb = np.stack([np.asarray(w, dtype=bool) for w in wrong[b[0]][b[1]]])
    return paired_bootstrap(wa, wb), f"{mcnemar(wa, wb).text()} (seeds pooled)"


def _equal_within(criterion: str, wrong: dict[str, dict[str, list[Any]]], a: tuple[str, str],
                  b: tuple[str, str], margin: float) -> Verdict:
    wa = np.stack([np.asarray(w, dtype=bool) for w in wrong[a[0]][a[1]]])
    wb = np.stack([np.asarray(w, dtype=bool) for w in wrong[b[0]][b[1]]])
    return equivalent(criterion, paired_bootstrap(wa, wb, confidence=0.90), margin,
                      mcnemar(wa, wb).text() + " (seeds pooled)")


def verdicts(numbers: dict[str, Any], wrong: dict[str, dict[str, list[Any]]]) -> list[SummaryRow]:
    """Claims of Table 2 judged from per-sample errors ``wrong[nbs][column]`` (per seed, the
    bool vector of validation samples the model gets wrong), paired over samples and seeds; the
    displayed numbers are the means ``numbers["mean"]``."""
    m = numbers["mean"]
    big, small = m["32"], m["2"]
    rows = []
    interval, detail = _paired(wrong, ("32", "B=2"), ("32", "B=N"))
    rows.append(SummaryRow(
        "NBS=32 model: PreciseBN with B=2 is much worse than with B=N",
        f"{big['B=2']:.1f} vs {big['B=N']:.1f}", "28.8 vs 23.5",
        exceeds(f"err(B=2) - err(B=N) > {WORSE_MARGIN} pt, whole 95% interval", interval,
                WORSE_MARGIN, detail)))
    rows.append(SummaryRow(
        "NBS=32 model: B >= 100 is as good as B=N",
        f"{big.get('B=100', float('nan')):.1f} vs {big['B=N']:.1f}", "23.5 vs 23.5",
        _equal_within(f"|err(B=100) - err(B=N)| <= {EQUAL_MARGIN} pt (equivalence margin), "
                      f"whole 90% interval", wrong, ("32", "B=100"), ("32", "B=N"),
                      EQUAL_MARGIN)))
    interval, detail = _paired(wrong, ("2", "EMA"), ("2", "B=N"))
    rows.append(SummaryRow(
        "NBS=2 model: PreciseBN (B=N) beats EMA",
        f"{small['B=N']:.1f} vs EMA {small['EMA']:.1f}", "32.0 vs 35.5",
        exceeds("err(EMA) - err(B=N) > 0, whole 95% interval", interval, 0.0, detail)))
    interval, detail = _paired(wrong, ("2", "B=N"), ("32", "B=N"))
    rows.append(SummaryRow(
        "A tiny NBS (2) hurts even with precise population statistics",
        f"{small['B=N']:.1f} vs {big['B=N']:.1f}", "32.0 vs 23.5",
        exceeds(f"err(NBS=2, B=N) - err(NBS=32, B=N) > {WORSE_MARGIN} pt, whole 95% interval",
                interval, WORSE_MARGIN, detail)))
    return rows


def mechanism_note(numbers: dict[str, Any]) -> str:
    """Which mechanism the per-layer distances of the B=2 statistics from B=N's point to
    (computed): PreciseBN pools exact moments, so the first BN layer's B=2 estimate differs from
    B=N's by sampling noise only; a distance that grows with depth comes from the earlier layers
    normalizing each 2-sample batch with its own statistics (the inputs of later layers change),
    not from the estimator."""
    m = numbers["mean"]["32"]
    d = m["B=2"] - m["B=N"]
    layers = numbers.get("layers_b2", {}).get("32", {})
    text = (f"For the NBS=32 model, PreciseBN with B=2 changes the error by {d:+.2f} pt against "
            f"B=N (mean over seeds; the verdict above says whether that is beyond the noise).")
    if len(layers) < 2:
        return text
    shifts = [v[0] for v in layers.values()]
    first, deepest = shifts[0], max(shifts[1:])
    # Every layer pools the same N samples exactly, so the first BN layer (whose inputs do not
    # depend on any normalization) measures the estimator's own error; later layers add the
    # effect of earlier layers normalizing each 2-sample batch with its own statistics.
    return (text + f" Per layer, the B=2 means lie {first:.3f} sigma (rms) from B=N's in the "
            f"first BN layer (the estimator's own error) and up to {deepest:.3f} sigma in a "
            f"later one (the earlier layers' 2-sample normalization), so "
            + ("the earlier layers' normalization, not the estimator, moves the statistics."
               if deepest > first + 0.01 else
               "neither moves the statistics by more than 0.01 sigma at our scale."))


@register_study("precise-batch",
                "Table 2: PreciseBN batch size B vs EMA for models trained with NBS 32 and 2")
def run(ctx: RunContext) -> StudyResult:
    study_data(ctx)  # generated here once, before worker processes read it
    scale = ghost_scale(ctx)
    jobs = [(n, s) for n in NBS_VALUES for s in ctx.seeds]
    models = ctx.run_all([ghost_model_task(ctx, scale, n, s) for n, s in jobs],
                         desc="precise-batch: training")
    evals = ctx.run_all(
        [Task({"study": "precise-batch", "v": 3,
               "model": ghost_model_task(ctx, scale, n, s).config},
              _evaluate, (scale, n, s, trained))
         for (n, s), trained in zip(jobs, models, strict=True)],
        desc="precise-batch: PreciseBN")
    per_seed: dict[str, list[dict[str, float]]] = {}
    wrong: dict[str, dict[str, list[Any]]] = {}
    layers: dict[str, list[dict[str, list[float]]]] = {}
    for (nbs, _), result in zip(jobs, evals, strict=True):
        per_seed.setdefault(str(nbs), []).append(result["errors"])
        layers.setdefault(str(nbs), []).append(result["layers_b2"])
        for col, w in result["wrong"].items():
            wrong.setdefault(str(nbs), {}).setdefault(col, []).append(w)
    columns = list(per_seed["32"][0])
    mean, std = over_seeds(per_seed, columns)
    layers_b2 = {k: {name: [float(np.mean([r[name][i] for r in rs])) for i in (0, 1)]
                     for name in rs[0]} for k, rs in layers.items()}
    numbers = {"per_seed": per_seed, "mean": mean, "std": std, "columns": columns,
               "scale": scale.as_dict(), "sgd_batch": SGD_BATCH, "layers_b2": layers_b2}
    distances = Table("per BN layer: distance of the B=2 statistics from B=N's (PreciseBNReport, "
                      "mean over seeds; rms mean shift in sigmas / rms log std ratio)",
                      ["layer", *[f"NBS={k}" for k in layers_b2]],
                      [[name, *[f"{v[name][0]:.3f} / {v[name][1]:.3f}"
                                for v in layers_b2.values()]]
                       for name in next(iter(layers_b2.values()))])
    ours = Table(f"validation error (%), population statistics from N = {scale.num_train}",
                 ["model", *columns],
                 [[f"NBS={k}", *[fmt([r[c] for r in rs]) for c in columns]]
                  for k, rs in per_seed.items()])
    theirs = Table("Table 2 (ResNet-50, ImageNet, N = 10^4, SGD batch 256)",
                   ["model", *paper.TABLE2_COLUMNS],
                   [[f"NBS={k}", *v] for k, v in paper.TABLE2.items()])
    setup = (
        f"{data_name(ctx)}, {scale.num_train} training / {scale.num_val} validation samples; "
        f"1-D ResNet (widths {list(scale.widths)}) trained {scale.epochs} epochs with SGD batch "
        f"{SGD_BATCH} (lr {LR}, cosine) and ghost BN with NBS 32 or 2 (the same trained models "
        f"as the `nbs` study's). Population statistics: the EMA, or PreciseBN over all "
        f"N = {scale.num_train} training samples in batches of B (normalizing over the whole "
        f"batch B). Seeds: {list(ctx.seeds)}."
    )
    calibrated = calibration(ctx, scale)
    if calibrated is not None:
        numbers["calibration"] = calibrated.to_json()
    return StudyResult(setup=setup,
                       tables=[ours, distances, *([calibrated] if calibrated else [])],
                       paper_tables=[theirs], plots=[],
                       summary=verdicts(numbers, wrong), numbers=numbers,
                       notes=mechanism_note(numbers))
