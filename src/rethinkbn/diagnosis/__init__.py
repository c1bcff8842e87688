"""`diagnose`: the paper's lessons about the "batch" in BatchNorm, measured on the user's model.

Wu & Johnson (2021) show that several independent choices hide in the batch of BatchNorm, each of
which can silently cost accuracy. :func:`diagnose` measures each of them, per BatchNorm layer and
for the model, and turns every number into a verdict with a stated threshold
(:class:`Thresholds`); no sentence of its report is typed in, each is derived from a number.

1. **EMA vs population** (Sec. 3): the running (EMA) statistics against exact population
   statistics of the current weights (``precise_bn``'s distances), and the metric with each.
2. **Normalization batch** (Sec. 4): the normalization batch size (NBS) of every layer in
   training, the values per channel it normalizes with, and the train/test inconsistency: each
   layer's normalized output in training behaviour against the same input normalized with
   population statistics, and the model's outputs and metric in both. The mechanism: each
   layer's between-sample share of its input's variance and the expected variance ratio
   ``E[var_k] / var`` of a group of ``k`` = its NBS samples
   (:mod:`rethinkbn.population.mechanism`), which tell whether a small NBS is a train/test
   inconsistency or only noise (check ``nbs-mechanism``).
3. **Domain shift** (Sec. 5): the distance between the statistics of ``train_data`` and
   ``eval_data``, and the metric with training-domain vs recomputed statistics.
4. **Setup smells**: BatchNorm normalizing with batch statistics during evaluation, frozen
   statistics far from the data's, samples of one normalization batch that share a group id
   (Sec. 6), a layer called several times in one forward.

The package works in three stages: ``_measure`` (the statistics from ``precise_bn``, the pass
engine, and the comparison forwards of ``_compare``; one unwrap, one restore guard and one batch
convention, :mod:`rethinkbn._model`'s), ``_judge`` (pure functions from those numbers to
:class:`Finding` s) and ``_report`` (:class:`Diagnosis`: terminal table, markdown, JSON, plot).
It never changes the model.
"""

from ._diagnose import DEFAULT_NUM_SAMPLES, diagnose  # noqa: F401 - the default budget
from ._records import Behaviour, Data, Finding, LayerDiagnosis, MetricKey, Thresholds
from ._report import Diagnosis

__all__ = [
    "Behaviour",
    "Data",
    "Diagnosis",
    "Finding",
    "LayerDiagnosis",
    "MetricKey",
    "Thresholds",
    "diagnose",
]
