"""Judge: pure functions from a diagnosis' numbers to its findings.

Stage 2 of :func:`~rethinkbn.diagnosis.diagnose`. Nothing here runs a model: every verdict is a
number (:class:`~._measure.Numbers`) against a threshold of :class:`~._records.Thresholds`,
whose docstring gives each threshold's reason, and every sentence is derived from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from ._measure import Numbers
from ._records import Finding, LayerDiagnosis, Thresholds

__all__ = ["judge"]

NONFINITE_ADVICE = ("find where the values became NaN or Inf (a diverged training step, a float16 "
                    "overflow, a bad input) and recompute the statistics "
                    "(rethinkbn.precise_bn(model, train_loader))")
QUANTITIES = {"ema": "EMA vs population distance", "train-test": "train/test gap",
              "domain": "train vs eval domain distance"}
NBS_ADVICE = ("train with a larger normalization batch (larger per-device batch, SyncBatchNorm, "
              "larger ghost groups), or FrozenBN for the last epochs "
              "(rethinkbn.freeze_with_precise_stats) so that training sees population statistics")
EMA_ADVICE = "run rethinkbn.precise_bn(model, train_loader) before evaluating"
DOMAIN_ADVICE = ("recompute the statistics on the target domain (rethinkbn.recompute_stats) and "
                 "keep one snapshot per domain in a rethinkbn.StatsBank")


STANDARD_ERRORS = 2.0
"""A metric difference must exceed this many standard errors (over the batches) to count:
about a 95% two-sided level for a roughly normal mean of batch differences, so that batch noise
alone rarely triggers a recommendation."""


def _past(shift: float, log_std: float, t_shift: float, t_log: float) -> float:
    """How far past its thresholds a pair of distances is (> 1: past)."""
    return max(abs(shift) / t_shift, abs(log_std) / t_log)


def _matters(pair: tuple[float, float], t: Thresholds) -> bool:
    """A metric difference matters when past the threshold and :data:`STANDARD_ERRORS` of its
    standard error."""
    delta, se = pair
    return abs(delta) > t.metric and abs(delta) > STANDARD_ERRORS * se


def _metric_text(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.4g} +- {pair[1]:.2g}"


# ---------------------------------------------------------------------------- non-finite values
def _nonfinite_layer(name: str, row: LayerDiagnosis, cause: str,
                     measured: Mapping[str, bool]) -> list[Finding]:
    """One problem per measured quantity of a layer that came out NaN or Inf; ``cause`` names
    the running buffers that hold non-finite values (for the EMA distances)."""
    values = {"ema": (row.ema_shift, row.ema_log_std), "train-test": (row.train_test_gap,),
              "domain": (row.domain_shift, row.domain_log_std)}
    return [Finding(f"non-finite:{check}", "problem", name, math.nan, 0,
                    f"{QUANTITIES[check]} is {', '.join(f'{v:.3g}' for v in numbers)}"
                    f"{cause if check == 'ema' else ''}: not a verdict", NONFINITE_ADVICE)
            for check, numbers in values.items()
            if measured[check] and not all(math.isfinite(v) for v in numbers)]


def _nonfinite(n: Numbers) -> tuple[list[Finding], dict[str, set[str]]]:
    """The non-finite findings, and per quantity the layers (or outputs) they concern."""
    out: list[Finding] = []
    bad: dict[str, set[str]] = {"ema": set(), "train-test": set(), "domain": set()}
    for name, row in n.layers.items():
        for f in _nonfinite_layer(name, row, n.buffers[name], n.measured[name]):
            out.append(f)
            bad[f.check.removeprefix("non-finite:")].add(name)
    for key, values in n.metric_rows.items():
        k = sum(not math.isfinite(v) for v in values)
        if k:
            out.append(Finding("non-finite:metric", "problem", None, k, 0,
                               f"the metric is NaN or Inf on {k} of {len(values)} batches of "
                               f"{key}: the comparisons that use it give no verdict",
                               "make the metric finite on every batch (an empty class, a "
                               "division by zero?), or check the model's outputs"))
    if n.outputs_compared and not math.isfinite(n.output_gap):
        bad["train-test"].add("the model's outputs")
        out.append(Finding("non-finite:train-test", "problem", None, math.nan, 0,
                           f"the output gap is {n.output_gap}: the model's outputs are NaN "
                           "or Inf in training behaviour or with population statistics",
                           NONFINITE_ADVICE))
    return out, bad


def _unless_nonfinite(finding: Finding, bad: set[str], what: str) -> Finding:
    """An "ok" model-level verdict is not ok when some layers' ``what`` are NaN or Inf."""
    if not bad or finding.severity != "ok":
        return finding
    return replace(finding, severity="problem",
                   message=f"{finding.message}; {what} NaN or Inf in {', '.join(sorted(bad))} "
                   "(see the non-finite findings)")


# ---------------------------------------------------------------------------- Sec. 3: EMA
def _ema_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                  t: Thresholds, untracked: set[str], bad: set[str]) -> list[Finding]:
    """EMA vs population. Layers in ``untracked`` keep no running statistics (not testable),
    those in ``bad`` have non-finite distances (a finding of their own): neither counts as
    within the thresholds."""
    tested = {n: r for n, r in rows.items() if n not in untracked}
    if not tested:
        return [Finding("ema", "skipped", None, math.nan, t.shift,
                        f"not testable: none of the {len(rows)} training BatchNorm layers keeps "
                        "running statistics (track_running_stats=False), so there is no EMA to "
                        "compare with the population")]
    finite = {n: r for n, r in tested.items() if n not in bad}
    stale = {n: r for n, r in finite.items() if _past(r.ema_shift, r.ema_log_std, t.shift,
                                                      t.log_std) > 1}
    out = [Finding("ema", "warning", n, max(abs(r.ema_shift), abs(r.ema_log_std)), t.shift,
                   f"EMA off the population by {r.ema_shift:.3g} sigma in mean, "
                   f"{r.ema_log_std:.3g} in log std (thresholds {t.shift}, {t.log_std})")
           for n, r in stale.items()]
    untested = (f"; {len(untracked)} of {len(rows)} layers keep no running statistics (not "
                "tested)" if untracked else "")
    if bad:
        out.append(Finding("ema", "problem", None, len(bad), 0,
                           f"{len(bad)} of {len(tested)} layers' EMA distances are NaN or Inf "
                           f"(see the non-finite findings){untested}", EMA_ADVICE))
    elif pair is not None:
        sev = "problem" if _matters(pair, t) and pair[0] > 0 else "ok"
        out.append(Finding("ema", sev, None, pair[0], t.metric,
                           f"metric with population minus with EMA statistics: "
                           f"{_metric_text(pair)}{untested}",
                           EMA_ADVICE if sev == "problem" else ""))
    elif stale:
        out.append(Finding("ema", "warning", None, len(stale), 0,
                           f"{len(stale)} of {len(tested)} layers have EMA statistics past the "
                           "thresholds (no metric given to tell whether it matters)" + untested,
                           EMA_ADVICE))
    else:
        worst = max((abs(r.ema_shift) for r in finite.values()), default=0.0)
        out.append(Finding("ema", "ok", None, worst, t.shift,
                           "EMA statistics within the thresholds in every layer" + (
                               " that keeps them" + untested if untracked else "")))
    return out


# ---------------------------------------------------------------------------- Sec. 4: NBS
def _small_nbs(rows: dict[str, LayerDiagnosis], t: Thresholds) -> list[Finding]:
    """A problem per layer normalizing fewer than ``t.min_values`` values per channel."""
    return [Finding("nbs", "problem", n, v, t.min_values,
                    f"normalizes {v} values per channel ({r.nbs_rule}): batch mean off by "
                    f"~{1 / math.sqrt(max(v, 1)):.2g} sigma, std by "
                    f"~{1 / math.sqrt(2 * max(v - 1, 1)):.0%}",
                    NBS_ADVICE)
            for n, r in rows.items()
            if (v := r.values_per_channel) is not None and v < t.min_values]


def _train_test_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                         output_gap: float, t: Thresholds, bad: set[str]) -> list[Finding]:
    gapped = {n: r for n, r in rows.items() if r.train_test_gap > t.train_test_gap}
    out = [Finding("train-test", "warning", n, r.train_test_gap, t.train_test_gap,
                   f"training-mode normalization (NBS {r.norm_batch_size}) differs from "
                   f"population statistics by {r.train_test_gap:.3g} sigma RMS")
           for n, r in gapped.items()]
    nbs = min((r.norm_batch_size for r in rows.values() if r.norm_batch_size is not None),
              default=None)
    if pair is not None:
        # Population statistics that cost accuracy are the paper's Sec. 4 problem; eval mode
        # doing better than training behaviour costs nothing at inference, and is worth a
        # warning only when the layers' own normalization gaps confirm the inconsistency.
        sev, advice = "ok", ""
        if _matters(pair, t) and pair[0] > 0:
            sev, advice = "problem", (
                "normalize test batches with their own statistics (rethinkbn."
                f"batch_stats_inference(model, norm_batch_size={nbs})) when test batches are "
                f"available, else {NBS_ADVICE}")
        elif _matters(pair, t) and gapped:
            sev, advice = "warning", NBS_ADVICE
        out.append(Finding("train-test", sev, None, pair[0], t.metric,
                           f"metric on train_data in training behaviour (NBS {nbs}) minus in "
                           f"eval mode: {_metric_text(pair)}; outputs differ by "
                           f"{output_gap:.3g} relative RMS; {len(gapped)} of {len(rows)} layers "
                           "past the gap threshold", advice))
    else:
        worst = max((r.train_test_gap for r in rows.values()
                     if math.isfinite(r.train_test_gap)), default=0.0)
        out.append(Finding("train-test", "warning" if gapped else "ok", None, worst,
                           t.train_test_gap,
                           f"{len(gapped)} of {len(rows)} layers normalize differently in "
                           f"training (NBS {nbs}) and eval mode past the threshold; outputs "
                           f"differ by {output_gap:.3g} relative RMS",
                           NBS_ADVICE if gapped else ""))
    out[-1] = _unless_nonfinite(out[-1], bad, "train/test gaps")
    return out


def _mechanism_findings(rows: dict[str, LayerDiagnosis], t: Thresholds) -> list[Finding]:
    """Whether a small NBS is a train/test inconsistency or only noise (issue 20's mechanism).

    A ``k``-sample group's variance falls short of the population's by
    ``|variance_ratio - 1| = rho / k + (1 - rho) / (k L) <= 1 / k``: only layers with
    ``1 / k > t.variance_bias`` (a small NBS) can be inconsistent, so the check is made only when
    some training layer has one. A layer past the threshold is a warning (its population
    statistics normalize differently from what training saw); else the small NBS only adds noise.
    """
    small = {n: r for n, r in rows.items()
             if r.norm_batch_size is not None and 1 / r.norm_batch_size > t.variance_bias}
    if not small:
        return []
    measured = {n: r for n, r in small.items() if math.isfinite(r.variance_ratio)}
    if not measured:
        return [Finding("nbs-mechanism", "skipped", None, math.nan, t.variance_bias,
                        f"not testable: the between-sample share of the {len(small)} layers "
                        "with a small NBS was not measured (no non-constant input seen)")]
    biased = {n: r for n, r in measured.items() if abs(r.variance_ratio - 1) > t.variance_bias}
    out = [Finding("nbs-mechanism", "warning", n, abs(r.variance_ratio - 1), t.variance_bias,
                   f"at NBS {r.norm_batch_size} the groups' variance is expected "
                   f"{1 - r.variance_ratio:.1%} below the population's (between-sample share "
                   f"{r.between_share:.2f}): a train/test inconsistency", NBS_ADVICE)
           for n, r in biased.items()]
    name, worst = max(measured.items(), key=lambda item: abs(item[1].variance_ratio - 1))
    bias, nbs = abs(worst.variance_ratio - 1), worst.norm_batch_size
    if biased:
        message = (f"{len(biased)} of {len(measured)} layers with a small NBS expect a group "
                   f"variance more than {t.variance_bias:.0%} below the population's (up to "
                   f"{bias:.1%}, '{name}' at NBS {nbs}): the small NBS causes a train/test "
                   "inconsistency, population statistics normalize differently from training")
    else:
        message = (f"the groups' variance is expected at most {bias:.1%} below the "
                   f"population's ('{name}' at NBS {nbs}, between-sample share "
                   f"{worst.between_share:.2f}; threshold {t.variance_bias:.0%}): the small NBS "
                   "gives noisy but nearly unbiased statistics, noise rather than a train/test "
                   "inconsistency")
    out.append(Finding("nbs-mechanism", "warning" if biased else "ok", None, bias,
                       t.variance_bias, message, NBS_ADVICE if biased else ""))
    return out


# ---------------------------------------------------------------------------- Sec. 5: domains
def _domain_findings(rows: dict[str, LayerDiagnosis], pair: tuple[float, float] | None,
                     t: Thresholds, bad: set[str]) -> list[Finding]:
    shifted = {n: r for n, r in rows.items()
               if _past(r.domain_shift, r.domain_log_std, t.domain_shift, t.domain_shift) > 1}
    out = [Finding("domain", "warning", n, max(abs(r.domain_shift), abs(r.domain_log_std)),
                   t.domain_shift,
                   f"eval_data's statistics differ from train_data's by {r.domain_shift:.3g} "
                   f"sigma in mean, {r.domain_log_std:.3g} in log std "
                   f"(threshold {t.domain_shift})") for n, r in shifted.items()]
    if pair is not None:
        sev = "problem" if _matters(pair, t) and pair[0] > 0 else (
            "warning" if shifted else "ok")
        out.append(Finding("domain", sev, None, pair[0], t.metric,
                           f"metric on eval_data with recomputed minus with training-domain "
                           f"statistics: {_metric_text(pair)}; {len(shifted)} of {len(rows)} "
                           "layers past the threshold", DOMAIN_ADVICE if sev != "ok" else ""))
    else:
        worst = max((max(abs(r.domain_shift), abs(r.domain_log_std)) for n, r in rows.items()
                     if n not in bad and math.isfinite(r.domain_shift)), default=0.0)
        out.append(Finding("domain", "warning" if shifted else "ok", None, worst,
                           t.domain_shift, f"{len(shifted)} of {len(rows)} layers' statistics "
                           "differ between train_data and eval_data past the threshold",
                           DOMAIN_ADVICE if shifted else ""))
    out[-1] = _unless_nonfinite(out[-1], bad, "domain distances")
    return out


# ---------------------------------------------------------------------------- setup smells
def _smells(n: Numbers, t: Thresholds) -> list[Finding]:
    out = [Finding("smell:batch-stats-in-eval", "problem", name, 1, 0,
                   "normalizes with batch statistics in eval mode (in training mode after "
                   "model.eval(), or without running statistics)",
                   "keep BatchNorm in eval mode for evaluation (check overrides of train()/eval() "
                   "and track_running_stats)") for name in sorted(n.batch_stats_in_eval)]
    for name in n.layers:
        if name in n.frozen:
            shift, log_std = n.frozen[name]
            finite = math.isfinite(shift) and math.isfinite(log_std)
            far = not finite or _past(shift, log_std, t.shift, t.log_std) > 1
            out.append(Finding(
                "smell:frozen-stats", "warning" if finite and far else "problem" if far else "ok",
                name, shift, t.shift,
                f"frozen statistics vs train_data's: {shift:.3g} sigma in mean, "
                f"{log_std:.3g} in log std" + (" (another dataset's?)" if finite and far else ""),
                "recompute them on this data (rethinkbn.precise_bn(model, loader, "
                "include_frozen=True)) or unfreeze" if far else ""))
        calls = n.calls.get(name, 0)
        if calls > 1:
            out.append(Finding("smell:reused-layer", "warning", name, calls, 1,
                               f"called {calls} times in one forward: its statistics pool "
                               f"{calls} different inputs",
                               "give each call site its own BatchNorm (or a DomainBatchNorm "
                               "when the calls are different domains)"))
    return out + _mixing(n, t)


def _mixing(n: Numbers, t: Thresholds) -> list[Finding]:
    """Correlated samples in a normalization batch (Sec. 6), from the group ids."""
    trainable = [name for name, r in n.layers.items() if r.norm_batch_size is not None]
    if n.has_group_ids and trainable and all(name in n.shuffled for name in trainable):
        return [Finding(
            "smell:correlated-batch", "skipped", None, math.nan, t.group_mixing,
            "not testable on the loader's batches: every training BatchNorm layer normalizes "
            f"after the shuffle of ShuffledModule {sorted(set(n.shuffled.values()))}, which "
            "already mixes the samples of a normalization batch")]
    if n.mixing is None:
        return []
    ratio, k = n.mixing
    sev = "problem" if ratio < t.group_mixing else "ok"
    return [Finding("smell:correlated-batch", sev, None, ratio, t.group_mixing,
                    f"normalization batches of {k} samples hold {ratio:.0%} of the "
                    "distinct group ids of a random shuffle of the same samples",
                    "shuffle samples across devices before BatchNorm "
                    "(rethinkbn.ShuffledModule / ShufflePlan), use SyncBatchNorm, or "
                    "sample batches across groups" if sev == "problem" else "")]


# ---------------------------------------------------------------------------- all verdicts
def judge(n: Numbers, t: Thresholds) -> list[Finding]:
    """Every finding of a diagnosis, most important first (see :attr:`Finding.rank`)."""
    findings, bad = _nonfinite(n)
    findings += _smells(n, t)
    rows = {name: r for name, r in n.layers.items() if r.norm_batch_size is not None}
    findings += _ema_findings(rows, n.pairs["ema"], t, n.untracked & set(rows),
                              bad["ema"] & set(rows))
    findings += _small_nbs(rows, t)
    findings += _train_test_findings(rows, n.pairs["train-test"], n.output_gap, t,
                                     bad["train-test"] & {*rows, "the model's outputs"})
    findings += _mechanism_findings(rows, t)
    if n.has_eval:
        findings += _domain_findings(rows, n.pairs["domain"], t, bad["domain"] & set(rows))
    if not n.has_metric:
        findings.append(Finding(
            "metric", "skipped", None, math.nan, t.metric,
            "no metric given: the model-level checks (the metric with EMA vs population "
            "statistics, in training behaviour vs eval mode, across domains) were skipped; the "
            "verdicts rest on the layers' statistics alone"))
    return sorted(findings, key=lambda f: f.rank)
