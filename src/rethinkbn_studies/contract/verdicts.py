"""Verdicts that know their noise: an effect, its uncertainty, the test, and one of three outcomes.

A claim of the paper becomes a statement about an *effect* (a difference of error rates, in
points): "FrozenBN lowers the error" is ``effect = err(normal) - err(frozen) > 0``. We estimate the
effect with an interval that says how much it could move with other validation samples and other
seeds, then decide:

- **agrees**: the whole interval lies on the paper's side of the threshold;
- **disagrees**: the whole interval lies on the other side;
- **inconclusive**: the interval straddles the threshold (the noise is larger than the margin);
- **not testable**: a precondition of the claim, checked by a rule fixed before the runs, is
  absent in our runs (:func:`given`, :func:`not_testable`); the report states the unmet
  precondition instead of calling the claim refuted.

Intervals (:class:`Interval`):

- :func:`paired_bootstrap`: two models' per-sample errors on the *same* validation samples, for
  one or more seeds; the percentile interval of the mean difference when both the samples and
  (with two or more) the seeds are drawn again with replacement. Pairing on the samples removes
  the variance of "which samples are hard" that two independent error rates would carry.
- :func:`seed_interval`: per-seed differences (>= 3 seeds), Student's t interval of their mean:
  the spread between trainings, whatever the validation set.

Tests of a difference (:func:`mcnemar`): exact McNemar test for two models' errors on the same
samples (the discordant pairs only), a p-value to state beside the interval.

Decisions: :func:`exceeds` (effect above a threshold, the paper's direction), :func:`stays_below`
(effect below a threshold: "does not help by more than m") and :func:`equivalent` ("about equal":
two one-sided tests, i.e. the interval inside ``[-margin, +margin]``; use a 90% interval for
5% tests). Every function is pure: numbers in, numbers out, so tests feed each one numbers that
make it agree, disagree and be inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from .base import AGREES, DISAGREES, INCONCLUSIVE, NOT_TESTABLE, Verdict

__all__ = [
    "Interval",
    "McNemar",
    "all_hold",
    "equivalent",
    "exceeds",
    "given",
    "majority_hold",
    "mcnemar",
    "not_testable",
    "paired_bootstrap",
    "seed_interval",
    "stays_below",
]


@dataclass(frozen=True)
class Interval:
    """An estimated ``effect`` with its ``confidence`` interval ``[low, high]`` and how it was
    obtained (``test``, one line for the report)."""

    effect: float
    low: float
    high: float
    confidence: float
    test: str

    def __post_init__(self) -> None:
        if not (self.low <= self.effect <= self.high) and all(
                math.isfinite(v) for v in (self.low, self.effect, self.high)):
            raise ValueError(f"Interval: expected low <= effect <= high, got {self.low}, "
                             f"{self.effect}, {self.high}")

    def text(self, unit: str = " pt") -> str:
        """``"+1.23 pt, 95% CI [+0.40, +2.10]"``."""
        return (f"{self.effect:+.2f}{unit}, {100 * self.confidence:.0f}% CI "
                f"[{self.low:+.2f}, {self.high:+.2f}]")


def _as_errors(name: str, values: Any) -> np.ndarray:
    """``values`` as a float64 ``(seeds, samples)`` array of per-sample errors (0/1 or losses)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected per-sample errors of shape (samples,) or "
                         f"(seeds, samples), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: per-sample errors must be finite")
    return arr


def _counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """``(resamples, n)``: how often each of ``n`` items is taken when drawing ``n`` of them
    with replacement, once per resample (a multinomial draw, by counting drawn indices)."""
    idx = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(idx.ravel(), minlength=resamples * n).reshape(resamples, n).astype(float)


def paired_bootstrap(
    errors_a: Any, errors_b: Any, *, resamples: int = 2000, confidence: float = 0.95,
    seed: int = 0, scale: float = 100.0, units: str = "validation samples",
) -> Interval:
    """``mean(errors_a) - mean(errors_b)`` (times ``scale``: points for 0/1 errors) with a
    percentile bootstrap interval, pairing the two models on the same validation samples.

    ``errors_a`` / ``errors_b``: ``(samples,)`` or ``(seeds, samples)``, row ``s`` of both from
    seed ``s``, column ``n`` from validation sample ``n``. Each bootstrap draw takes the samples
    again with replacement (the same draw for both models and every seed) and, with two or more
    seeds, the seeds as well, so the interval holds the noise of both.
    """
    a, b = _as_errors("paired_bootstrap: errors_a", errors_a), _as_errors(
        "paired_bootstrap: errors_b", errors_b)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: both models need errors on the same seeds and "
                         f"samples, got shapes {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or resamples < 100:
        raise ValueError(f"paired_bootstrap: expected 0 < confidence < 1 and resamples >= 100, "
                         f"got {confidence} and {resamples}")
    diff = a - b
    n_seeds, n_samples = diff.shape
    rng = np.random.default_rng(seed)
    # A draw's weights: how many times each sample (and seed) was taken.
    w_samples = _counts(rng, resamples, n_samples)
    w_seeds = _counts(rng, resamples, n_seeds) if n_seeds > 1 else np.ones((resamples, 1))
    draws = ((w_seeds @ diff) * w_samples).sum(axis=1) / (n_seeds * n_samples) * scale
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    effect = float(diff.mean() * scale)
    over = f"{n_samples} {units}" + (f" and {n_seeds} seeds" if n_seeds > 1 else "")
    return Interval(effect, min(float(low), effect), max(float(high), effect), confidence,
                    f"paired bootstrap over {over} ({resamples} draws)")


def seed_interval(differences: Any, *, confidence: float = 0.95) -> Interval:
    """Mean of per-seed ``differences`` (already in points) with Student's t interval; needs
    at least 3 seeds (with 2 the interval is too wide to say anything)."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size < 3 or not np.isfinite(d).all():
        raise ValueError(f"seed_interval: expected >= 3 finite per-seed differences, got "
                         f"{d.tolist()}")
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    mean = float(d.mean())
    return Interval(mean, mean - half, mean + half, confidence,
                    f"Student's t over {d.size} seeds (std {d.std(ddof=1):.2f})")


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``only_a`` samples wrong only for model A, ``only_b`` only for B;
    ``p`` the two-sided p-value of "both models err equally often"."""

    only_a: int
    only_b: int
    p: float

    def text(self) -> str:
        return f"McNemar: {self.only_a} vs {self.only_b} discordant samples, p = {self.p:.3g}"


def mcnemar(wrong_a: Any, wrong_b: Any) -> McNemar:
    """Exact (binomial) McNemar test of two models' 0/1 errors on the same samples (all seeds'
    rows pooled: pass one seed for independent pairs)."""
    a = _as_errors("mcnemar: wrong_a", wrong_a).astype(bool).ravel()
    b = _as_errors("mcnemar: wrong_b", wrong_b).astype(bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"mcnemar: expected errors on the same samples, got {a.size} and "
                         f"{b.size} values")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return McNemar(only_a, only_b, float(min(Fraction(1), Fraction(2 * tail, 2 ** n))))


def _decide(criterion: str, interval: Interval, agrees: bool, disagrees: bool,
            detail: str, rule: str, threshold: float) -> Verdict:
    outcome = AGREES if agrees else DISAGREES if disagrees else INCONCLUSIVE
    return Verdict(agrees=outcome == AGREES, criterion=criterion,
                   detail=interval.text() + (f"; {detail}" if detail else ""),
                   outcome=outcome, effect=interval.effect,
                   interval=(interval.low, interval.high), confidence=interval.confidence,
                   test=interval.test, threshold=threshold, rule=rule)


def not_testable(criterion: str, precondition: str, detail: str = "") -> Verdict:
    """The verdict for a claim whose precondition is absent; ``precondition`` says which one,
    with the numbers that show it is unmet."""
    if not precondition:
        raise ValueError("not_testable: state the unmet precondition")
    return Verdict(agrees=False, criterion=criterion, detail=detail, outcome=NOT_TESTABLE,
                   precondition=precondition)


def given(holds: bool, precondition: str, verdict: Verdict) -> Verdict:
    """``verdict`` where the precondition ``holds``, else :func:`not_testable` with the same
    criterion and the measured effect kept in its detail (the claim is not judged on it)."""
    if holds:
        return verdict
    return not_testable(verdict.criterion, precondition,
                        detail=f"measured, not judged: {verdict.detail}" if verdict.detail else "")


def _testable(parts: list[Verdict], caller: str) -> list[Verdict]:
    if not parts:
        raise ValueError(f"{caller}: expected at least one verdict")
    return [p for p in parts if p.label != NOT_TESTABLE]


def _untestable_all(criterion: str, parts: list[Verdict]) -> Verdict:
    return not_testable(criterion, "; ".join(f"{p.criterion}: {p.precondition}" for p in parts))


def exceeds(criterion: str, interval: Interval, threshold: float = 0.0,
            detail: str = "") -> Verdict:
    """The claim "effect > ``threshold``": agrees when the whole interval is above it,
    disagrees when the whole interval is below it, inconclusive otherwise."""
    return _decide(criterion, interval, interval.low > threshold, interval.high < threshold,
                   detail, "exceeds", threshold)


def stays_below(criterion: str, interval: Interval, threshold: float,
                detail: str = "") -> Verdict:
    """The claim "effect < ``threshold``" (e.g. "does not help by more than ``threshold``"):
    agrees when the whole interval is below it, disagrees when the whole interval is above."""
    return _decide(criterion, interval, interval.high < threshold, interval.low > threshold,
                   detail, "stays_below", threshold)


def equivalent(criterion: str, interval: Interval, margin: float, detail: str = "") -> Verdict:
    """The claim "about equal": ``|effect| <= margin`` (the equivalence margin, stated in
    ``criterion``). Agrees when the whole interval lies in ``[-margin, margin]`` (two one-sided
    tests at level ``(1 - confidence) / 2`` each), disagrees when it lies entirely outside."""
    if not margin > 0:
        raise ValueError(f"equivalent: the margin must be > 0, got {margin}")
    inside = -margin <= interval.low and interval.high <= margin
    outside = interval.low > margin or interval.high < -margin
    return _decide(criterion, interval, inside, outside, detail, "equivalent", margin)


def all_hold(criterion: str, parts: list[Verdict]) -> Verdict:
    """One verdict for "every part holds": disagrees when a part disagrees, agrees when all
    agree, inconclusive otherwise; the effect, interval and test are the decisive part's (the
    first that disagrees, else the first inconclusive one, else the widest interval), and
    ``detail`` lists every part. Not-testable parts are left out of the decision; when every part
    is not testable, so is the whole."""
    testable = _testable(parts, "all_hold")
    if not testable:
        return _untestable_all(criterion, parts)
    order = [p for p in testable if p.label == DISAGREES] or [
        p for p in testable if p.label == INCONCLUSIVE] or sorted(
        testable, key=lambda p: -(p.interval[1] - p.interval[0]) if p.interval else 0.0)
    key = order[0]
    return Verdict(agrees=key.label == AGREES, criterion=criterion,
                   detail="; ".join(f"{p.criterion}: {p.detail}" for p in parts),
                   outcome=key.label, effect=key.effect, interval=key.interval,
                   confidence=key.confidence, test=key.test)


def majority_hold(criterion: str, parts: list[Verdict]) -> Verdict:
    """One verdict for "most parts hold" (more than half): agrees when more than half agree,
    disagrees when even counting every inconclusive part as agreeing would not make a majority,
    inconclusive otherwise. The effect is the number of parts that agree, the interval
    ``[agree, agree + inconclusive]`` (what the undecided parts could make of it). Not-testable
    parts are left out of the count; when every part is not testable, so is the whole."""
    all_parts = parts
    parts = _testable(parts, "majority_hold")
    if not parts:
        return _untestable_all(criterion, all_parts)
    agree = sum(p.label == AGREES for p in parts)
    open_ = sum(p.label == INCONCLUSIVE for p in parts)
    outcome = (AGREES if 2 * agree > len(parts) else
               DISAGREES if 2 * (agree + open_) <= len(parts) else INCONCLUSIVE)
    return Verdict(agrees=outcome == AGREES, criterion=criterion,
                   detail=f"{agree} agree, {open_} inconclusive of {len(parts)} testable: "
                   + "; ".join(f"{p.criterion}: {p.label}" for p in all_parts),
                   outcome=outcome, effect=float(agree), interval=(float(agree),
                                                                   float(agree + open_)),
                   confidence=None, test="count of the parts' own verdicts (each: "
                   + (parts[0].test or "its own test") + ")")
