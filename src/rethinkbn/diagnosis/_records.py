"""What a diagnosis is made of: the thresholds, the keys of the metrics, a layer's numbers and a
finding. Plain frozen dataclasses and enums, shared by the measure, judge and report stages."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..population.mechanism import INCONSISTENCY_THRESHOLD

__all__ = ["SEVERITIES", "Behaviour", "Data", "Finding", "LayerDiagnosis", "MetricKey",
           "Thresholds"]

SEVERITIES = ("problem", "warning", "ok", "skipped")


@dataclass(frozen=True)
class Thresholds:
    """The thresholds the verdicts are computed with, and why.

    - ``shift`` / ``log_std``: a layer's statistics differ from a reference when the RMS over
      channels of ``(mu - mu_ref) / sigma_ref`` exceeds ``shift`` or that of
      ``log(sigma / sigma_ref)`` exceeds ``log_std``: 0.1 moves every normalized activation by a
      tenth of its spread, as much noise as the mean of 100 values per channel adds. Used for EMA
      vs population (1) and frozen statistics vs the data (4).
    - ``domain_shift``: the same two distances between the training and evaluation domains (3);
      larger, because a model's activations on held-out data of the same domain already differ
      a little from those on its training data.
    - ``min_values``: fewer values per channel in one normalization batch than this is a trap
      (2): with ``n`` values the batch mean is off by ``1/sqrt(n)`` sigma and the batch std by a
      relative ``1/sqrt(2(n-1))``: 0.18 sigma and 13% below 32 values.
    - ``train_test_gap``: a layer's normalized output in training behaviour differs from the same
      input normalized with population statistics by more than this RMS (in sigma) (2).
    - ``variance_bias``: a ``k``-sample group's variance is expected to fall short of the
      population's by ``s / k`` (``s`` the layer's between-sample share; in the terms of
      :mod:`rethinkbn.population.mechanism`, ``rho / k + (1 - rho) / (k L)``). Past this relative
      bias a small NBS is a train/test inconsistency, below it only noise (2). The default is
      :data:`~rethinkbn.population.INCONSISTENCY_THRESHOLD` (0.10): a variance 10% short scales
      the normalized output by 1/sqrt(0.9), a 5% gain change in every channel.
    - ``metric``: a change of the metric larger than this (absolute, in the metric's units)
      matters; a recommendation that would change the metric less is not made.
    - ``group_mixing``: samples of a normalization batch are correlated when its distinct group
      ids are fewer than this fraction of those of a random shuffle of the same samples (4).
    """

    shift: float = 0.1
    log_std: float = 0.1
    domain_shift: float = 0.25
    min_values: int = 32
    train_test_gap: float = 0.1
    metric: float = 0.01
    group_mixing: float = 0.75
    variance_bias: float = INCONSISTENCY_THRESHOLD


class Data(Enum):
    """Which data a comparison ran on."""

    TRAIN = "train_data"
    EVAL = "eval_data"


class Behaviour(Enum):
    """How the model normalized in a comparison: eval mode with one of three sets of statistics,
    or its training behaviour (batch statistics at the training NBS)."""

    EMA = "EMA statistics"
    POPULATION = "population statistics"
    DOMAIN = "eval-domain statistics"
    TRAINING = "training behaviour"


@dataclass(frozen=True)
class MetricKey:
    """The key of a metric: the data and the behaviour it was measured with.

    ``str()`` is the readable key of the report and the JSON, e.g.
    ``"train_data, training behaviour"``.
    """

    data: Data
    behaviour: Behaviour

    def __str__(self) -> str:
        return f"{self.data.value}, {self.behaviour.value}"


@dataclass(frozen=True)
class Finding:
    """One verdict: ``check`` (what was measured), its ``severity`` (problem / warning / ok, or
    skipped: not testable, the message says why), the ``layer`` (qualified name; None for the
    model), the measured ``value`` against ``threshold``, a ``message`` derived from them and a
    ``recommendation``. A NaN or Inf measurement is a ``non-finite:<check>`` problem of its
    own, never an "ok"."""

    check: str
    severity: str
    layer: str | None
    value: float
    threshold: float
    message: str
    recommendation: str = ""

    @property
    def rank(self) -> tuple[int, float]:
        """Sort key: severity first, then how far past its threshold the value is."""
        excess = abs(self.value) / self.threshold if self.threshold else 0.0
        return SEVERITIES.index(self.severity), -(excess if math.isfinite(excess) else 0.0)


@dataclass(frozen=True)
class LayerDiagnosis:
    """One BatchNorm layer's numbers (NaN where not measured).

    ``norm_batch_size`` is the normalization batch size it normalizes with in training (None:
    fixed statistics) and ``nbs_rule`` how it follows from the per-device batch;
    ``values_per_channel`` = ``norm_batch_size`` x spatial positions. ``ema_shift`` /
    ``ema_log_std``: running vs population statistics of ``train_data``; ``train_test_gap``: RMS
    of ``z_train - z_pop`` over the values of the comparison pass (``z`` the normalized input,
    with the statistics the layer uses in training, resp. population statistics);
    ``domain_shift`` / ``domain_log_std``: statistics of ``train_data`` vs ``eval_data``:
    ``(mu_train - mu_eval) / sigma_eval`` and ``log(sigma_train / sigma_eval)`` (RMS over
    channels, as the EMA distances).

    ``between_share``: ``s``, the share of the layer's input variance that lies between
    samples, the variance of the per-sample means over the total variance (law of total
    variance), averaged over channels, measured on ``train_data`` in eval mode with population
    statistics; ``variance_ratio``: the expected ``E[var_k] / var = 1 - s / k`` of a group of
    ``k = norm_batch_size`` samples (:func:`rethinkbn.population.expected_variance_ratio` at the
    offsets' share ``rho = (s L - 1) / (L - 1)``, ``L`` the values per sample and channel).
    """

    kind: str
    mode: str
    calls_per_forward: int
    norm_batch_size: int | None
    nbs_rule: str
    values_per_channel: int | None
    ema_shift: float
    ema_log_std: float
    train_test_gap: float
    domain_shift: float = math.nan
    domain_log_std: float = math.nan
    between_share: float = math.nan
    variance_ratio: float = math.nan
