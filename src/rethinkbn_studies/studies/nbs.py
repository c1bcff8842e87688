"""Sec. 4, Fig. 5-6: the normalization batch size (NBS) in training and in testing.

At a fixed SGD batch, sweep the NBS (ghost BN) from 2 up to the SGD batch, with the models shared
with ``precise-batch`` (one training run per NBS and seed, cosine schedule). For every NBS:
training error with mini-batch statistics (groups of NBS), validation error with mini-batch
statistics, and validation error with population statistics from whole-batch PreciseBN (all
training samples in batches of the SGD batch, each batch normalized as a whole; the EMA of ghost
groups is biased at tiny NBS). FrozenBN late, at the smallest and the largest NBS: two more runs
per seed with the paper's schedule shape (step decay, ``x0.1`` at 50% and 90% of training), one
normal and one that, at the start of the last 20% of epochs (a learning rate of ``lr/10``),
computes whole-batch PreciseBN statistics and trains on with FrozenBN. Every run trains as long as
the shared models (``common.GHOST_EPOCHS``: long enough to fit the training set at NBS 2 and 4);
the report's training-fit table shows, per NBS, how far the training error with mini-batch
statistics lies below the validation error.

Full mode adds the large arm (:mod:`.nbs_large`): NBS 2, 32 and 128 on 16,384 training samples
with 3 blocks per stage, where the models cannot memorize their training set, evaluated like the
sweep and judged on the sweep's claims (:func:`sweep_verdicts`) with their preconditions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from rethinkbn.population import INCONSISTENCY_THRESHOLD, freeze_epoch_for, variance_decomposition

from ..contract import paper
from ..contract.base import (
    AGREES,
    DISAGREES,
    INCONCLUSIVE,
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
from ..contract.verdicts import Interval, exceeds, given, mcnemar, paired_bootstrap, stays_below
from ..toolkit import bn
from ..toolkit.common import (
    GHOST_FIT_MARGIN,
    GHOST_LR,
    GHOST_SGD_BATCH,
    Scale,
    data_key,
    data_name,
    fmt,
    ghost_model,
    ghost_model_task,
    ghost_scale,
    new_model,
    pyplot,
    save_plot,
    study_data,
)
from ..toolkit.train import Callback, TrainConfig, evaluate_wrong, train
from . import nbs_large

SGD_BATCH = GHOST_SGD_BATCH
LR = GHOST_LR
FROZEN_FRACTION = 0.2
# The FrozenBN runs' step decay: lr x0.1 at these fractions of training (the frozen phase,
# from 80%, trains at lr/10 until 90%).
STEP_MILESTONES = (0.5, 0.9)
# "FrozenBN does not help": its gain stays below this many points (the paper: -0.8, it hurts).
NO_HELP_MARGIN = 0.5
# "Val error with population stats rises at tiny NBS": by more than this many points, against
# the LARGEST NBS (a fixed reference: the minimum over the other NBS would be a winner's curse).
RISE_MARGIN = 1.0
# Fit check of that claim, fixed before the runs: the small-NBS models' training error with
# population statistics within this many points of the largest NBS's; otherwise a rise of the
# validation error shows under-fitting at small NBS (issue 20: 7-30% training error in such
# pilots, gone with 3x the steps), not the paper's train/test inconsistency: "not testable".
POP_FIT_MARGIN = 2.0
# "Small NBS regularizes" is judged only where training error with mini-batch statistics is
# above this floor (%) at both ends: at ~0 training error the generalization gap is the
# test-time noise of the statistics, not a regularization effect.
REGULARIZATION_FLOOR = 1.0
# Evaluation groups large enough that mini-batch statistics are nearly population statistics:
# mu_B over LARGE_GROUP samples beside mu_B at the training NBS says whether mu_B loses to
# population statistics through the noise of small groups.
LARGE_GROUP = 128
CURVES = {
    "train_mub": "train, mini-batch stats",
    "val_mub": "val, mini-batch stats",
    "val_pop": "val, population stats (PreciseBN)",
    "val_pop_frozen": "val, population stats, FrozenBN last 20% (step schedule)",
}


def nbs_values(quick: bool) -> list[int]:
    """The normalization batch sizes swept: fewer in quick mode, always 2 up to the SGD batch."""
    return [2, 4, 8, 32, SGD_BATCH] if quick else [2, 4, 8, 16, 32, 64, SGD_BATCH]


def eval_group(size: int, scale: Scale) -> int:
    """The mini-batch evaluation group for groups of ``size``: ``size``, clamped to the samples
    each mini-batch evaluation sees (``min(num_train, num_val)``), so that a small ``--data``
    (e.g. ``--tiny --data mnist1d:400``: 80 validation samples, NBS up to 128) still evaluates
    every NBS; the setup text names the clamped groups (:func:`clamp_note`)."""
    return min(size, scale.num_train, scale.num_val)


def clamp_note(scale: Scale, sizes: list[int]) -> str:
    """The setup's sentence on clamped evaluation groups (:func:`eval_group`); empty if none."""
    clamped = [s for s in [*sizes, LARGE_GROUP] if eval_group(s, scale) < s]
    if not clamped:
        return ""
    return (f" Mini-batch evaluation groups of {', '.join(map(str, sorted(set(clamped))))} "
            f"samples exceed the {eval_group(max(clamped), scale)} samples evaluated: they are "
            f"clamped to {eval_group(max(clamped), scale)} (at those NBS the evaluation groups are "
            f"smaller than the training NBS).")


def _precise(model: nn.Module, x: Any, seed: int) -> nn.Module:
    """Whole-batch PreciseBN in place: all of ``x`` in batches of the SGD batch."""
    bn.recompute_population(model, x, batch_size=SGD_BATCH, num_samples=len(x), seed=seed)
    return model


def _evaluate(ctx: RunContext, scale: Scale, nbs: int, seed: int, trained: dict[str, Any],
              blocks: int = 1) -> dict[str, Any]:
    """Per-sample errors of the shared NBS model (``blocks`` BasicBlocks per stage): train and
    val with mini-batch statistics (groups of NBS), val with whole-batch PreciseBN statistics,
    and the EMA's val error; per BN layer the between-sample share and the variance bias."""
    data = study_data(ctx).subset(scale.num_train, scale.num_val)
    model = ghost_model(ctx, scale, nbs, seed, trained, blocks)
    n = min(len(data.train_x), len(data.val_x))
    ema = evaluate_wrong(model, data.val_x, data.val_y)
    # groups of at most the evaluated samples (see :func:`eval_group`; the setup text says so)
    group = eval_group(nbs, scale)
    out = {
        "train_mub": bn.wrong_minibatch(model, data.train_x[:n], data.train_y[:n], group),
        "val_mub": bn.wrong_minibatch(model, data.val_x, data.val_y, group),
        "val_mub_large": bn.wrong_minibatch(model, data.val_x, data.val_y,
                                            eval_group(LARGE_GROUP, scale)),
        "val_pop": evaluate_wrong(_precise(model, data.train_x, seed), data.val_x, data.val_y),
        "train_pop": evaluate_wrong(model, data.train_x[:n], data.train_y[:n]),
        "val_ema": 100.0 * float(ema.float().mean()),
    }
    layers = variance_decomposition(model, data.train_x.split(SGD_BATCH), norm_batch_size=nbs)
    out["share"] = {r.name: r.mean_share for r in layers}
    out["variance_bias"] = {r.name: r.variance_bias for r in layers}
    return out


class FreezeAt(Callback):
    """At the start of epoch ``epoch``: whole-batch PreciseBN statistics, then FrozenBN."""

    def __init__(self, epoch: int, x: Any, seed: int) -> None:
        self.epoch, self.x, self.seed = epoch, x, seed

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if epoch == self.epoch:
            bn.freeze_with_population_stats(model, self.x, batch_size=SGD_BATCH,
                                            num_samples=len(self.x), seed=self.seed,
                                            pass_norm_batch_size=None)


def _step_run(ctx: RunContext, scale: Scale, nbs: int, frozen: bool, seed: int) -> Any:
    """A step-schedule run (normal, or FrozenBN for the last 20%): which validation samples it
    gets wrong with whole-batch PreciseBN statistics (FrozenBN: the frozen ones)."""
    data = study_data(ctx).subset(scale.num_train, scale.num_val)
    model = bn.set_norm_batch_size(new_model(ctx, data, scale, seed), nbs)
    config = TrainConfig(epochs=scale.epochs, batch_size=SGD_BATCH, lr=LR,
                         milestones=STEP_MILESTONES)
    callbacks: list[Callback] = []
    if frozen:
        callbacks.append(FreezeAt(freeze_epoch_for(FROZEN_FRACTION, scale.epochs),
                                  data.train_x, seed))
    model = train(model, data.train_x, data.train_y, config, seed=seed, callbacks=callbacks,
                  progress=ctx.progress, desc=f"NBS {nbs}{' frozen' if frozen else ''} step "
                  f"seed {seed}")
    if not frozen:
        _precise(model, data.train_x, seed)
    return evaluate_wrong(model, data.val_x, data.val_y)


def _stack(vectors: list[Any], n: int | None = None) -> np.ndarray:
    """Per-seed 0/1 vectors as a float ``(seeds, samples)`` array, cut to the first ``n``."""
    return np.stack([np.asarray(v, dtype=np.float64)[:n] for v in vectors])


def _difference(wrong: dict[str, dict[str, list[Any]]], a: tuple[str, str],
                b: tuple[str, str]) -> np.ndarray:
    """Per seed and sample, err(a) - err(b) (``(curve, nbs)`` each), on the samples both have."""
    n = min(len(wrong[a[0]][a[1]][0]), len(wrong[b[0]][b[1]][0]))
    return _stack(wrong[a[0]][a[1]], n) - _stack(wrong[b[0]][b[1]], n)


def _bootstrap(d: np.ndarray) -> Interval:
    """Paired bootstrap of the mean of per-sample differences ``d`` over samples and seeds."""
    return paired_bootstrap(d, np.zeros_like(d))


def independent_sets_bootstrap(parts: list[np.ndarray], *, resamples: int = 2000,
                               confidence: float = 0.95, seed: int = 0) -> Interval:
    """``sum_j mean(parts[j])`` in points (x100 for 0/1 errors) with a percentile bootstrap
    interval, for parts measured on independent sample sets (the training and the validation
    set): each draw takes every part's samples again with replacement, separately, and the seeds
    (rows, the same in every part) once for all. Unlike a pairing of sample ``i`` of one set
    with sample ``i`` of the other, every sample of both sets counts, so the effect is exactly
    the difference of the displayed means.

    ``parts``: ``(seeds, samples_j)`` arrays, a part's sign already applied (``[val, -train]``
    is ``mean(val) - mean(train)``).
    """
    rng = np.random.default_rng(seed)
    n_seeds = parts[0].shape[0]
    w_seeds = (rng.multinomial(n_seeds, [1.0 / n_seeds] * n_seeds, size=resamples)
               if n_seeds > 1 else np.ones((resamples, 1)))
    draws = np.zeros(resamples)
    for part in parts:
        n = part.shape[1]
        w = rng.multinomial(n, [1.0 / n] * n, size=resamples)
        draws += ((w_seeds @ part) * w).sum(axis=1) / (n_seeds * n) * 100.0
    effect = float(sum(part.mean() for part in parts) * 100.0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    sizes = " and ".join(str(p.shape[1]) for p in parts)
    return Interval(effect, min(float(low), effect), max(float(high), effect), confidence,
                    f"bootstrap over {sizes} samples (independent sets) and {n_seeds} seeds "
                    f"({resamples} draws)")


def _frozen_pair(wrong: dict[str, dict[str, Any]], nbs: str) -> tuple[np.ndarray, np.ndarray]:
    """At ``nbs``, per seed and validation sample, whether the normal and the FrozenBN
    step-schedule runs are wrong (bool ``(seeds, samples)`` arrays)."""
    return (_stack(wrong["val_pop_step"][nbs]).astype(bool),
            _stack(wrong["val_pop_frozen"][nbs]).astype(bool))


def frozen_verdict(claim_helps: bool, nbs: str, wrong: dict[str, dict[str, Any]]) -> Verdict:
    """FrozenBN's effect at ``nbs``: ``err(normal) - err(FrozenBN last 20%)`` in points, both
    with the step schedule, with a paired bootstrap over the validation samples and seeds (both
    runs of a seed start from the same initialization and are evaluated on the same samples)
    and McNemar's test beside it.

    ``wrong[curve][nbs]``: per seed, the bool vector of validation samples a run got wrong
    (``curve`` in ``val_pop_step``, ``val_pop_frozen``). ``claim_helps``: the claim is
    "FrozenBN lowers the error" (effect > 0); else "it does not help": effect <
    :data:`NO_HELP_MARGIN`.
    """
    normal, frozen = _frozen_pair(wrong, nbs)
    interval = paired_bootstrap(normal, frozen)
    detail = f"{mcnemar(normal, frozen).text()} (seeds pooled)"
    whole = f"whole {100 * interval.confidence:.0f}% interval"
    if claim_helps:
        return exceeds(f"err(normal) - err(FrozenBN) > 0 at NBS={nbs}, {whole}", interval, 0.0,
                       detail)
    return stays_below(f"err(normal) - err(FrozenBN) < {NO_HELP_MARGIN} pt at NBS={nbs} (a gain "
                       f"below the margin is no help), {whole}", interval, NO_HELP_MARGIN, detail)


def sweep_verdicts(numbers: dict[str, Any], wrong: dict[str, dict[str, list[Any]]],
                   network: str = "") -> list[SummaryRow]:
    """The claims of Sec. 4 that need only the NBS sweep (no FrozenBN runs), judged from
    per-sample errors ``wrong[curve][nbs]`` (per seed, a 0/1 vector per sample; curves
    ``train_mub``, ``val_mub``, ``val_pop`` at every NBS; ``numbers["mean"]["train_pop"]`` for the
    fit check) with a paired bootstrap over samples and seeds, each claim with its precondition
    fixed before the runs; the displayed numbers are the means ``numbers["mean"]``.
    ``network``: its name, put before every claim (empty for the main sweep; the large arm's
    rows, :mod:`.nbs_large`, name it)."""
    m = numbers["mean"]
    sizes = sorted(int(k) for k in m["val_pop"])
    lo, hi = str(sizes[0]), str(sizes[-1])
    rows = []
    fit_gap = m["train_pop"][lo] - m["train_pop"][hi]
    rows.append(SummaryRow(
        f"{network}Val error with population stats rises at tiny NBS ({lo})",
        f"{m['val_pop'][lo]:.1f} vs {m['val_pop'][hi]:.1f} (NBS={hi})",
        "32.5 vs 23.7 (NBS=1024)",
        given(fit_gap <= POP_FIT_MARGIN,
              f"training error with population stats {m['train_pop'][lo]:.1f}% at NBS={lo} vs "
              f"{m['train_pop'][hi]:.1f}% at NBS={hi}: more than {POP_FIT_MARGIN:g} pt apart "
              f"(the small-NBS models under-fit)",
              exceeds(f"val_pop(NBS={lo}) - val_pop(NBS={hi}) > {RISE_MARGIN} pt, whole 95% "
                      f"interval",
                      _bootstrap(_difference(wrong, ("val_pop", lo), ("val_pop", hi))),
                      RISE_MARGIN))))
    gap_lo = m["val_pop"][lo] - m["val_mub"][lo]
    gap_hi = m["val_pop"][hi] - m["val_mub"][hi]
    a = _difference(wrong, ("val_pop", lo), ("val_mub", lo))
    b = _difference(wrong, ("val_pop", hi), ("val_mub", hi))
    n = min(a.shape[1], b.shape[1])
    d = a[:, :n] - b[:, :n]
    rows.append(SummaryRow(
        f"{network}Train/test inconsistency (val pop - val mu_B) grows as NBS shrinks",
        f"{gap_lo:+.1f} at NBS={lo} vs {gap_hi:+.1f} at NBS={hi}", "+6.5 at 2 vs -1.1 at 1024",
        exceeds(f"gap(NBS={lo}) - gap(NBS={hi}) > 0, whole 95% interval", _bootstrap(d), 0.0)))
    rows.append(SummaryRow(
        f"{network}Sec. 4.3: mini-batch statistics at test time beat population statistics at "
        f"tiny NBS ({lo})",
        f"val mu_B {m['val_mub'][lo]:.1f} vs pop {m['val_pop'][lo]:.1f}", "26.0 vs 32.5",
        exceeds(f"val_pop(NBS={lo}) - val_mub(NBS={lo}) > 0, whole 95% interval",
                _bootstrap(_difference(wrong, ("val_pop", lo), ("val_mub", lo))), 0.0)))
    gen_lo = m["val_mub"][lo] - m["train_mub"][lo]
    gen_hi = m["val_mub"][hi] - m["train_mub"][hi]
    # Train and val samples are independent sets, each resampled on its own (all samples of
    # both count, so the effect is the difference of the displayed gaps).
    parts = [_difference(wrong, ("val_mub", hi), ("val_mub", lo)),
             _difference(wrong, ("train_mub", lo), ("train_mub", hi))]
    rows.append(SummaryRow(
        f"{network}Small NBS regularizes: the generalization gap (val mu_B - train mu_B) shrinks "
        f"as NBS shrinks",
        f"{gen_lo:+.1f} at NBS={lo} vs {gen_hi:+.1f} at NBS={hi}", "+9.5 at 2 vs +16.3 at 1024",
        given(min(m["train_mub"][lo], m["train_mub"][hi]) > REGULARIZATION_FLOOR,
              f"training error with mini-batch stats {m['train_mub'][lo]:.1f}% (NBS={lo}) / "
              f"{m['train_mub'][hi]:.1f}% (NBS={hi}), not above the {REGULARIZATION_FLOOR:g}% "
              f"floor: the gap measures test-time noise, not regularization",
              exceeds(f"gen gap(NBS={hi}) - gen gap(NBS={lo}) > 0, whole 95% interval",
                      independent_sets_bootstrap(parts), 0.0))))
    return explain(rows, _sweep_explanations(numbers, [r.claim for r in rows], lo, hi))


def _sweep_explanations(numbers: dict[str, Any], claims: list[str], lo: str,
                        hi: str) -> dict[str, str]:
    """Per claim of :func:`sweep_verdicts` (``claims``, in its order), the sentence that
    explains it where it disagrees (:func:`rise_explanation`, :func:`noise_explanation`);
    none without the measured shares in ``numbers``."""
    if "between_sample_share" not in numbers:
        return {}
    noise = noise_explanation(numbers, lo)
    return {claims[0]: rise_explanation(numbers, lo, hi), claims[1]: noise, claims[2]: noise}


def verdicts(numbers: dict[str, Any], wrong: dict[str, dict[str, list[Any]]]) -> list[SummaryRow]:
    """Claims of Sec. 4 judged from per-sample errors ``wrong[curve][nbs]``: the sweep's
    (:func:`sweep_verdicts`), then FrozenBN's from the step-schedule pairs (curves
    ``val_pop_step`` and ``val_pop_frozen`` at the smallest and largest NBS), each with a paired
    bootstrap over samples and seeds; the displayed numbers are the means ``numbers["mean"]``."""
    m = numbers["mean"]
    sizes = sorted(int(k) for k in m["val_pop"])
    lo, hi = str(sizes[0]), str(sizes[-1])
    rows = sweep_verdicts(numbers, wrong)
    rows.append(SummaryRow(
        f"FrozenBN for the last 20% helps at tiny NBS ({lo})",
        f"{m['val_pop_frozen'][lo]:.1f} vs {m['val_pop_step'][lo]:.1f}", "25.2 vs 32.5",
        given(m["val_pop_step"][lo] - m["val_pop_step"][hi] > RISE_MARGIN,
              f"no population-statistics penalty to remove: val_pop (step schedule) "
              f"{m['val_pop_step'][lo]:.1f} at NBS={lo} vs {m['val_pop_step'][hi]:.1f} at "
              f"NBS={hi}, not more than {RISE_MARGIN:g} pt higher",
              frozen_verdict(True, lo, wrong))))
    rows = explain(rows, {rows[-1].claim: frozen_explanation(wrong, lo, hi)})
    rows.append(SummaryRow(
        f"FrozenBN does not help at the largest NBS ({hi})",
        f"{m['val_pop_frozen'][hi]:.1f} vs {m['val_pop_step'][hi]:.1f}", "24.5 vs 23.7 (hurts)",
        frozen_verdict(False, hi, wrong)))
    return rows


def training_fit(wrong: dict[str, dict[str, list[Any]]]) -> dict[str, Verdict]:
    """Per NBS, whether the models have fit their training set at that NBS: the validation
    minus the training error, both with mini-batch statistics (groups of NBS), must exceed
    :data:`~rethinkbn_studies.toolkit.common.GHOST_FIT_MARGIN` points (the criterion the training
    length was chosen by, see ``common.GHOST_EPOCHS``), with a bootstrap over the samples and
    seeds (the two sets resampled independently, :func:`independent_sets_bootstrap`: the
    effect is the mean validation minus the mean training error, every sample counted).
    Keys: the NBS as a string, in ascending order. The length was chosen on the seeds' mean
    gap; here each NBS is judged with its noise (agrees: fit, disagrees: not fit)."""
    fits = {}
    for k in sorted(wrong["train_mub"], key=int):
        parts = [_stack(wrong["val_mub"][k]), -_stack(wrong["train_mub"][k])]
        fits[k] = exceeds(f"val mu_B - train mu_B > {GHOST_FIT_MARGIN:g} pt at NBS={k}, whole "
                          f"95% interval", independent_sets_bootstrap(parts), GHOST_FIT_MARGIN)
    return fits


# How the training-fit table and sentence say each outcome of :func:`training_fit`.
FIT_WORDS = {AGREES: ("yes", "holds"), DISAGREES: ("no", "fails"),
             INCONCLUSIVE: ("within the noise", "is within the noise of the margin")}


def _gap(v: Verdict) -> str:
    low, high = v.interval or (float("nan"), float("nan"))
    return f"{v.effect:+.1f} pt, 95% CI [{low:+.1f}, {high:+.1f}]"


def training_fit_table(numbers: dict[str, Any], fits: dict[str, Verdict]) -> Table:
    """Training vs validation error with mini-batch statistics per NBS (largest first, as the
    main table), their gap with its interval, and whether the training-fit criterion holds."""
    m = numbers["mean"]
    rows = [[k, m["train_mub"][k], m["val_mub"][k], _gap(v), FIT_WORDS[v.label][0]]
            for k, v in sorted(fits.items(), key=lambda kv: -int(kv[0]))]
    return Table(f"training fit: error (%) with mini-batch statistics, mean over seeds; the "
                 f"models have fit their training set at an NBS when val - train > "
                 f"{GHOST_FIT_MARGIN:g} pt (95% interval)",
                 ["NBS", "train mu_B", "val mu_B", "val - train", "fit"], rows)


def training_fit_note(fits: dict[str, Verdict], epochs: int) -> str:
    """The sentence that says at which NBS the models have fit their training set (computed
    from ``fits``, :func:`training_fit`), and what that means for the verdicts at the smallest
    NBS, which the train/test inconsistency claims are judged at."""
    groups: dict[str, list[str]] = {}
    for k, v in fits.items():
        groups.setdefault(v.label, []).append(k)
    said = "; ".join(f"{FIT_WORDS[label][1]} at NBS {', '.join(groups[label])}"
                     for label in FIT_WORDS if label in groups)
    lo = min(fits, key=int)
    v = fits[lo]
    gap = _gap(v)
    if v.label == AGREES:
        then = (f"The train/test verdicts at NBS {lo} are judged on models that have fit their "
                f"training set at that NBS ({gap}).")
    elif v.label == DISAGREES:
        then = (f"At NBS {lo} the models have not fit their training set ({gap}): the "
                f"train/test verdicts at NBS {lo} judge models that trained too short for the "
                f"paper's inconsistency.")
    else:
        then = (f"At NBS {lo} the gap is within the noise of the margin ({gap}): whether the "
                f"models have fit their training set there is not decided.")
    return (f"**Training fit** after {epochs} epochs (the criterion the training length was "
            f"chosen by, fixed before the runs: training error with mini-batch statistics more "
            f"than {GHOST_FIT_MARGIN:g} pt below the validation error with mini-batch "
            f"statistics, whole 95% interval): the criterion {said}. {then}")


def share_table(numbers: dict[str, Any], sizes: list[int], network: str = "") -> Table:
    """Per BN layer (rows) and NBS (columns), the between-sample share of the layer's input
    variance (:func:`rethinkbn.population.variance_decomposition`, mean over channels and
    seeds); ``network``: its name before the title (empty for the main sweep)."""
    share = numbers["between_sample_share"]
    layers = list(share[str(sizes[0])])
    return Table(f"{network + ': ' if network else ''}between-sample share of each BN input's "
                 f"variance (mean over channels and seeds), per NBS the models trained at",
                 ["layer", *[str(s) for s in sizes]],
                 [[name, *[f"{share[str(s)][name]:.3f}" for s in sizes]] for name in layers])


def largest_bias(numbers: dict[str, Any], nbs: str) -> tuple[float, float]:
    """At ``nbs``: the largest between-sample share over the BN layers and the largest
    magnitude of the expected variance bias of an ``nbs``-sample group (positive: the variance
    is that fraction too small), from ``numbers`` (:func:`summarize`)."""
    return (max(numbers["between_sample_share"][nbs].values()),
            max(-b for b in numbers["variance_bias"][nbs].values()))


def _large_group(numbers: dict[str, Any]) -> int:
    """The large evaluation group the run used (:data:`LARGE_GROUP`, clamped by the scale)."""
    scale = numbers["scale"]
    return min(LARGE_GROUP, scale["num_train"], scale["num_val"])


def _bias_words(numbers: dict[str, Any], lo: str) -> tuple[bool, str]:
    """Whether the measured variance bias at NBS ``lo`` is within
    :data:`~rethinkbn.population.INCONSISTENCY_THRESHOLD`, and the clause that says so."""
    top, bias = largest_bias(numbers, lo)
    below = bias <= INCONSISTENCY_THRESHOLD
    return below, (f"the measured variance bias of a {lo}-sample group, at most "
                   f"-{100 * bias:.1f}% (largest between-sample share {top:.3f}), is "
                   f"{'below' if below else 'above'} the "
                   f"{100 * INCONSISTENCY_THRESHOLD:.0f}% threshold")


def rise_explanation(numbers: dict[str, Any], lo: str, hi: str) -> str:
    """Why validation error with population statistics does not rise at NBS ``lo`` (vs ``hi``),
    from the numbers: the measured variance bias of ``lo``-sample groups (nearly unbiased below
    the threshold: no train/test inconsistency for population statistics to pay) and, at about
    the same training fit (training error with population statistics within
    :data:`POP_FIT_MARGIN`), whether the ``lo``-sample models generalize better (noise acting
    as a regularizer). Above the threshold the measured quantities do not explain it."""
    m = numbers["mean"]
    below, bias = _bias_words(numbers, lo)
    pop, fit = (m["val_pop"][lo], m["val_pop"][hi]), (m["train_pop"][lo], m["train_pop"][hi])
    fits = (f"training error with population statistics {fit[0]:.1f}% vs {fit[1]:.1f}% at "
            f"NBS={hi}")
    if not below:
        return (f"not explained by the measured quantities: {bias}, so an inconsistency is "
                f"expected, yet val_pop is {pop[0]:.1f} vs {pop[1]:.1f} at NBS={hi} ({fits}).")
    text = (f"{bias} (an ImageNet ResNet's share: not known, no source measures it): "
            f"{lo}-sample statistics are nearly unbiased, so training at NBS {lo} leaves no "
            f"train/test inconsistency for population statistics to pay")
    if pop[0] < pop[1] and fit[0] - fit[1] <= POP_FIT_MARGIN:
        return (f"{text}; at about the same training fit ({fits}) the NBS-{lo} models "
                f"generalize better (val_pop {pop[0]:.1f} vs {pop[1]:.1f}), as the {lo}-sample "
                f"noise acting as a regularizer would make them.")
    return (f"{text} (val_pop {pop[0]:.1f} vs {pop[1]:.1f} at NBS={hi}; no regularizing gain "
            f"of the {lo}-sample noise shows: {fits}).")


def noise_explanation(numbers: dict[str, Any], lo: str) -> str:
    """Why mu_B at NBS ``lo`` loses to population statistics (the Sec. 4.3 and the
    inconsistency claims), from the numbers: the noise of ``lo``-sample groups when mu_B over
    large groups comes closer to population statistics and the measured variance bias is below
    the threshold; else the measured quantities do not explain it."""
    m = numbers["mean"]
    small, big, pop = m["val_mub"][lo], m["val_mub_large"][lo], m["val_pop"][lo]
    below, bias = _bias_words(numbers, lo)
    groups = (f"mu_B over {_large_group(numbers)}-sample groups is {big:.1f} (vs {small:.1f} "
              f"over {lo}-sample groups, {pop:.1f} with population statistics)")
    if below and small > pop and abs(big - pop) < abs(small - pop):
        return (f"the noise of {lo}-sample groups, not an inconsistency: {groups}, and {bias} "
                f"(see **Mechanism**).")
    return f"not explained by the measured quantities: {bias}, and {groups}."


def frozen_explanation(wrong: dict[str, dict[str, list[Any]]], lo: str, hi: str) -> str:
    """Why FrozenBN for the last 20% does not help at NBS ``lo``, from the step-schedule runs:
    the population-statistics penalty it should remove (val_pop, step schedule, NBS ``lo`` -
    NBS ``hi``, paired bootstrap) against what freezing costs where there is no penalty to
    remove (FrozenBN's gain at NBS ``hi``). Explained when that cost's interval reaches the
    penalty (the cost is as large as the penalty within the noise); else not explained."""
    penalty = _bootstrap(_difference(wrong, ("val_pop_step", lo), ("val_pop_step", hi)))
    cost, gain = (paired_bootstrap(*_frozen_pair(wrong, k)) for k in (hi, lo))
    where = (f"at NBS={hi}, where there is no penalty to remove, FrozenBN's gain is "
             f"{cost.text()}; the penalty it should remove at NBS={lo} (val_pop, step schedule, "
             f"NBS={lo} - NBS={hi}) is {penalty.text()}"
             + (" (not established: its interval reaches 0)" if penalty.low <= 0 else ""))
    if penalty.effect <= -cost.low:
        return (f"the penalty is no larger than what freezing itself costs, within the noise of "
                f"that cost: {where}; at NBS={lo} FrozenBN's gain is {gain.effect:+.2f} pt.")
    return (f"not explained by the measured quantities: {where}, larger than what freezing "
            f"costs, yet at NBS={lo} FrozenBN's gain is {gain.effect:+.2f} pt.")


def mechanism_note(numbers: dict[str, Any], sizes: list[int], network: str = "") -> str:
    """Why mu_B wins or loses against population statistics here, from the numbers: the
    largest between-sample share at the smallest NBS (an ImageNet ResNet's: not known, no
    source measures it), the expected variance bias of a group of that NBS
    (``LayerVariance.variance_bias``: ``rho/k + (1-rho)/(kL)``, the largest over layers), and
    mu_B over large groups vs population statistics; the closing sentence names the quantity
    that explains the outcome (the bias when it passes the threshold, else the groups' noise
    when large groups close the gap). ``network``: its name (empty for the main sweep)."""
    lo = str(sizes[0])
    m = numbers["mean"]
    large = _large_group(numbers)
    top, bias = largest_bias(numbers, lo)
    small, big, pop = m["val_mub"][lo], m["val_mub_large"][lo], m["val_pop"][lo]
    if bias > INCONSISTENCY_THRESHOLD:
        why = (f"the variance bias passes the threshold: a train/test inconsistency is expected "
               f"at NBS {lo}")
    elif small > pop and abs(big - pop) < abs(small - pop):
        why = (f"mu_B loses to population statistics ({small:.1f} vs {pop:.1f}) through the "
               f"noise of {lo}-sample groups, not an inconsistency: over {large}-sample groups "
               f"mu_B is {big:.1f}, {abs(small - pop) - abs(big - pop):.1f} pt closer to "
               f"population statistics, and the bias is below the threshold")
    else:
        why = (f"the bias is below the threshold and {large}-sample groups do not bring mu_B "
               f"closer to population statistics: neither quantity explains the outcome")
    return (f"**Mechanism{', ' + network if network else ''}**: at NBS {lo} the largest "
            f"between-sample share of a BN input is {top:.3f} (an ImageNet ResNet's: not known, "
            f"no source measures it), so a {lo}-sample group's variance is biased by up to "
            f"-{100 * bias:.1f}% (threshold {100 * INCONSISTENCY_THRESHOLD:.0f}%). Validation "
            f"error with mu_B over {large}-sample groups {big:.1f} vs {small:.1f} over "
            f"{lo}-sample groups and {pop:.1f} with population statistics: {why}.")


def _plot(ctx: RunContext, numbers: dict[str, Any]) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in CURVES.items():
        sizes = sorted(int(k) for k in numbers["mean"][key])
        axes[0].errorbar(sizes, [numbers["mean"][key][str(s)] for s in sizes],
                         yerr=[numbers["std"][key][str(s)] for s in sizes], marker="o",
                         capsize=3, label=label)
        ps = sorted(paper.FIG5_NBS[key])
        axes[1].plot(ps, [paper.FIG5_NBS[key][s] for s in ps], marker="o", label=label)
    for ax, title in zip(axes, (f"ours (SGD batch {SGD_BATCH})",
                                "paper, Fig. 5-6 (ResNet-50, SGD batch 1024)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normalization batch size (NBS)")
        ax.set_ylabel("error (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return [save_plot(ctx, fig, "nbs.png")]


def _rate(w: Any) -> float:
    return 100.0 * float(np.asarray(w, dtype=np.float64).mean())


@dataclass(frozen=True)
class NbsRuns:
    """Everything the study measured, per curve (``"val_pop"``, ``"train_mub"``, ...,
    ``"val_pop_step"``, ``"val_pop_frozen"``) and NBS: ``wrong`` (per seed, the 0/1 errors the
    verdicts judge), ``per_seed`` (per seed, the error in %; the EMA curve has no per-sample
    errors) and ``mech`` (per seed, the mechanism's per-layer numbers: ``"share"``,
    ``"variance_bias"``)."""

    scale: Scale
    sizes: list[int]
    wrong: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    per_seed: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    mech: dict[str, dict[str, list[dict[str, float]]]] = field(default_factory=dict)

    @property
    def ends(self) -> tuple[int, int]:
        """The smallest and the largest NBS: the FrozenBN pairs'."""
        return self.sizes[0], self.sizes[-1]

    def add(self, curve: str, nbs: int, value: Any) -> None:
        """Record one seed's ``value`` of ``curve`` at ``nbs``: per-sample 0/1 errors (and
        their rate), the EMA's error, or a mechanism number."""
        if curve in ("share", "variance_bias"):
            self.mech.setdefault(curve, {}).setdefault(str(nbs), []).append(value)
            return
        if curve != "val_ema":
            self.wrong.setdefault(curve, {}).setdefault(str(nbs), []).append(value)
            value = _rate(value)
        self.per_seed.setdefault(curve, {}).setdefault(str(nbs), []).append(value)


def measure(ctx: RunContext, scale: Scale) -> NbsRuns:
    """The study's runs (cached): the shared ghost models at every NBS and the step-schedule
    pairs (normal, FrozenBN late) at the smallest and largest NBS, trained in one ``run_all``;
    then the shared models' evaluations (:func:`_evaluate`)."""
    runs = NbsRuns(scale, nbs_values(ctx.quick))
    jobs = [(n, s) for n in runs.sizes for s in ctx.seeds]
    step_jobs = [(n, f, s) for n in runs.ends for f in (False, True) for s in ctx.seeds]
    step_tasks = [Task({"study": "nbs", "run": "step", "v": 4, "data": data_key(ctx), "nbs": n,
                        "frozen": f, "seed": s, "sgd_batch": SGD_BATCH, "lr": LR,
                        "milestones": list(STEP_MILESTONES), "scale": scale.as_dict()},
                       _step_run, (scale, n, f, s)) for n, f, s in step_jobs]
    trained = ctx.run_all([ghost_model_task(ctx, scale, n, s) for n, s in jobs] + step_tasks,
                          desc="nbs: training")
    models, step_wrong = trained[: len(jobs)], trained[len(jobs):]
    evals = ctx.run_all(
        [Task({"study": "nbs", "run": "eval", "v": 5,
               "model": ghost_model_task(ctx, scale, n, s).config}, _evaluate, (scale, n, s, t))
         for (n, s), t in zip(jobs, models, strict=True)], desc="nbs: evaluation")
    for (nbs, _), result in zip(jobs, evals, strict=True):
        for curve, value in result.items():
            runs.add(curve, nbs, value)
    for (nbs, frozen, _), w in zip(step_jobs, step_wrong, strict=True):
        runs.add("val_pop_frozen" if frozen else "val_pop_step", nbs, w)
    return runs


def measure_large(ctx: RunContext, shared: Scale) -> NbsRuns | None:
    """The large arm's runs (:mod:`.nbs_large`; None where it does not run, quick mode
    included: no task is asked for): its models trained in one ``run_all``, then evaluated as
    the sweep's (:func:`_evaluate`) under the same kind of key. ``shared``: the sweep's scale."""
    if not nbs_large.runs_in(ctx):
        return None
    arm = nbs_large.large_context(ctx)
    scale = nbs_large.large_scale(ctx, shared)
    study_data(arm)  # generated here once, before worker processes read it
    jobs = nbs_large.training_tasks(arm, scale)
    trained = arm.run_all([t for *_, t in jobs], desc="nbs: large arm, training")
    evals = arm.run_all(
        [Task({"study": "nbs", "run": "eval", "v": 5, "model": task.config}, _evaluate,
              (scale, n, s, t, nbs_large.LARGE_BLOCKS))
         for (n, s, task), t in zip(jobs, trained, strict=True)], desc="nbs: large arm, evaluation")
    runs = NbsRuns(scale, list(nbs_large.LARGE_NBS))
    for (nbs, *_), result in zip(jobs, evals, strict=True):
        for curve, value in result.items():
            runs.add(curve, nbs, value)
    return runs


def summarize(runs: NbsRuns, fits: dict[str, Verdict]) -> dict[str, Any]:
    """The study's numbers for results.json: per curve and NBS the errors per seed, mean and
    std; the mechanism's per-layer means; the training fit (``fits``, :func:`training_fit`)."""
    stats = {k: {n: mean_std(v) for n, v in d.items()} for k, d in runs.per_seed.items()}
    mean = {k: {n: m for n, (m, _) in d.items()} for k, d in stats.items()}
    std = {k: {n: s for n, (_, s) in d.items()} for k, d in stats.items()}
    numbers = {"per_seed": runs.per_seed, "mean": mean, "std": std,
               "scale": runs.scale.as_dict(), "sgd_batch": SGD_BATCH,
               "step_milestones": list(STEP_MILESTONES)}
    for key, name in (("share", "between_sample_share"), ("variance_bias", "variance_bias")):
        numbers[name] = {k: {layer: float(np.mean([d[layer] for d in v])) for layer in v[0]}
                         for k, v in runs.mech.get(key, {}).items()}
    numbers["training_fit"] = {k: {"effect": v.effect, "interval": v.interval, "label": v.label}
                               for k, v in fits.items()}
    return numbers


def curves_table(runs: NbsRuns, network: str = "") -> Table:
    """Our table: every measured curve's error against NBS, the largest NBS first, and the
    train/test inconsistency per NBS. ``network``: its name (the large arm's,
    :mod:`.nbs_large`; empty for the main sweep), which adds the generalization gap its verdict
    judges (the main sweep's is in its training-fit table)."""
    shown = runs.sizes[::-1]
    labels = {**CURVES, "val_pop_step": "val, population stats (PreciseBN), step schedule",
              "val_ema": "val, EMA statistics",
              "val_mub_large": f"val, mini-batch stats over "
                               f"{eval_group(LARGE_GROUP, runs.scale)}-sample groups",
              "train_pop": "train, population stats (PreciseBN)"}
    per_seed = dict(runs.per_seed)
    # the train/test inconsistency the verdicts judge, per seed: val pop - val mu_B
    per_seed["inconsistency"] = {
        k: [p - b for p, b in zip(v, per_seed["val_mub"][k], strict=True)]
        for k, v in per_seed["val_pop"].items()}
    labels["inconsistency"] = "train/test inconsistency: val pop - val mu_B (pt)"
    if network:
        per_seed["generalization"] = {
            k: [v - t for v, t in zip(vs, per_seed["train_mub"][k], strict=True)]
            for k, vs in per_seed["val_mub"].items()}
        labels["generalization"] = "generalization gap: val mu_B - train mu_B (pt)"
    return Table(f"{network + ': ' if network else ''}error (%) against NBS (- : not measured)",
                 ["", *[str(s) for s in shown]],
                 [[label, *[fmt(per_seed[key][str(s)]) if str(s) in per_seed[key] else "-"
                            for s in shown]]
                  for key, label in labels.items() if key in per_seed])


def _paper_table() -> Table:
    psizes = sorted(paper.FIG5_NBS["val_pop"], reverse=True)
    return Table("Fig. 5-6 (ResNet-50, ImageNet, SGD batch 1024; read off the plots)",
                 ["", *[str(s) for s in psizes]],
                 [[label, *[paper.FIG5_NBS[key][s] for s in psizes]]
                  for key, label in CURVES.items()])


def setup_text(ctx: RunContext, runs: NbsRuns) -> str:
    """The report's setup paragraph."""
    scale, sizes, ends = runs.scale, runs.sizes, runs.ends
    return (
        f"{data_name(ctx)}, {scale.num_train} training / {scale.num_val} validation samples; "
        f"1-D ResNet (widths {list(scale.widths)}), {scale.epochs} epochs "
        f"({scale.epochs * (scale.num_train // SGD_BATCH)} steps), SGD batch {SGD_BATCH} "
        f"(lr {LR}), ghost BN with NBS in {sizes}. The sweep's models train with a cosine "
        f"schedule (the same runs as `precise-batch`'s), as long as it takes them to fit their "
        f"training set at NBS 2 and 4 (see the training-fit table). Population statistics: "
        f"whole-batch PreciseBN over all {scale.num_train} training samples in batches of "
        f"{SGD_BATCH}. Mini-batch statistics: every group of NBS samples normalized by its own "
        f"statistics. FrozenBN, at NBS {ends[0]} and {ends[1]}: a pair of runs with step decay "
        f"(lr x0.1 at {', '.join(f'{int(100 * f)}%' for f in STEP_MILESTONES)} of training), "
        f"one normal, one that at the start of the last {int(100 * FROZEN_FRACTION)}% of epochs "
        f"computes whole-batch PreciseBN statistics and trains on with FrozenBN (lr "
        f"{LR * 0.1:g} until 90%). Seeds: {list(ctx.seeds)}.{clamp_note(scale, sizes)}"
    )


def large_arm(ctx: RunContext, runs: NbsRuns) -> StudyResult:
    """The large arm's part of the section (:mod:`.nbs_large`), from its runs ``runs``
    (:func:`measure_large`): its setup sentence, its curves and share tables, the sweep's claims
    judged on it (:func:`sweep_verdicts`, the same preconditions), its numbers and its
    mechanism sentence (:func:`mechanism_note`)."""
    name = nbs_large.NAME
    numbers = summarize(runs, {})
    numbers.update(blocks=nbs_large.LARGE_BLOCKS, seeds=list(ctx.seeds))
    del numbers["step_milestones"], numbers["training_fit"]  # no step runs, no fit table
    bn_layers = len(numbers["between_sample_share"][str(runs.sizes[0])])
    return StudyResult(setup=nbs_large.setup_sentence(ctx, runs.scale, bn_layers),
                       tables=[curves_table(runs, name), share_table(numbers, runs.sizes, name)],
                       paper_tables=[], plots=[],
                       summary=sweep_verdicts(numbers, runs.wrong, f"{name}: "),
                       numbers=numbers, notes=mechanism_note(numbers, runs.sizes, name))


@register_study("nbs", "Sec. 4, Fig. 5-6: NBS sweep: train/val error with mini-batch and "
                "population statistics, and FrozenBN for the last 20% of epochs")
def run(ctx: RunContext) -> StudyResult:
    """Stages: the runs (:func:`measure`, and in full mode the large arm's,
    :func:`measure_large`), the training fit (:func:`training_fit`), the numbers
    (:func:`summarize`), tables, verdicts (:func:`verdicts`), notes and plots; the large arm's
    part (:func:`large_arm`) after the sweep's, its numbers under ``"large_arm"``."""
    study_data(ctx)  # generated here once, before worker processes read it
    # The step-schedule runs train as long as the shared models.
    runs = measure(ctx, ghost_scale(ctx))
    large = measure_large(ctx, runs.scale)
    fits = training_fit(runs.wrong)
    numbers = summarize(runs, fits)
    result = StudyResult(setup=setup_text(ctx, runs),
                         tables=[curves_table(runs), training_fit_table(numbers, fits),
                                 share_table(numbers, runs.sizes)],
                         paper_tables=[_paper_table()], plots=_plot(ctx, numbers),
                         summary=verdicts(numbers, runs.wrong), numbers=numbers,
                         notes=training_fit_note(fits, runs.scale.epochs) + " "
                         + mechanism_note(numbers, runs.sizes))
    if large is None:
        return result
    arm = large_arm(ctx, large)
    numbers["large_arm"] = arm.numbers
    return dataclasses.replace(result, setup=f"{result.setup}\n\n{arm.setup}",
                               tables=result.tables + arm.tables,
                               summary=result.summary + arm.summary,
                               notes=f"{result.notes}\n\n{arm.notes}")
