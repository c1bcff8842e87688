"""diagnose takes ``options=`` (a PreciseBNOptions) like precise_bn and recompute_stats; its old
keywords override the object's fields; metrics are keyed by typed fields, the JSON by readable
strings (issue 19 item 1)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rethinkbn import PreciseBNOptions, diagnose
from rethinkbn.diagnosis import DEFAULT_NUM_SAMPLES, Behaviour, Data, MetricKey
from test_diagnose import TRAIN, VAL, accuracy, batches, conv_net, fit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fit(conv_net(), *TRAIN, batch=32, lr=0.1, epochs=2)


def test_options_object_and_keywords_give_the_same_diagnosis(model):
    by_object = diagnose(model, batches(*TRAIN, 32), batches(*VAL, 32), metric=accuracy,
                         options=PreciseBNOptions(num_samples=128, progress=False))
    by_keywords = diagnose(model, batches(*TRAIN, 32), batches(*VAL, 32), metric=accuracy,
                           num_samples=128, progress=False)
    assert by_object.to_dict() == by_keywords.to_dict()
    assert by_object.num_samples == 128


def test_keywords_override_the_options_fields(model):
    d = diagnose(model, batches(*TRAIN, 32), options=PreciseBNOptions(num_samples=256),
                 num_samples=64, progress=False)
    assert d.num_samples == 64


def test_a_batch_budget_counts_batches_in_both_passes(model):
    calls = []

    def forward(m, batch):
        calls.append(len(batch[0]))
        return m(batch[0])

    d = diagnose(model, batches(*TRAIN, 32), options=PreciseBNOptions(num_batches=4),
                 forward=forward, progress=False)
    assert d.num_samples == 4 * 32
    # 4 batches of statistics, then 2 batches x (population, training behaviour)
    assert len(calls) == 4 + 2 * 2


def test_the_default_budget_is_diagnose_s_own(model):
    d = diagnose(model, batches(*TRAIN, 32), progress=False)
    assert d.num_samples == min(DEFAULT_NUM_SAMPLES, len(TRAIN[0]))


def test_bad_options_are_clear_errors_before_anything_runs(model):
    with pytest.raises(TypeError, match="diagnose: options must be a PreciseBNOptions"):
        diagnose(model, batches(*TRAIN, 32), options={"num_samples": 64})
    with pytest.raises(TypeError, match="diagnose: unknown arguments \\['colour'\\]"):
        diagnose(model, batches(*TRAIN, 32), colour="blue")
    with pytest.raises(TypeError, match="thresholds"):
        diagnose(model, batches(*TRAIN, 32), thresholds={"shift": 0.2})


def test_the_signature_lists_every_option_for_help_and_the_cli():
    import inspect

    params = inspect.signature(diagnose).parameters
    assert {"options", "metric", "group_ids", "thresholds", "num_samples", "num_batches",
            "forward", "input_key", "device", "progress", "process_group"} <= set(params)


def test_metrics_are_keyed_by_data_and_behaviour_and_the_json_by_readable_keys(model):
    d = diagnose(model, batches(*TRAIN, 32), metric=accuracy, num_samples=128, progress=False)
    assert set(d.metrics) == {MetricKey(Data.TRAIN, b) for b in
                              (Behaviour.EMA, Behaviour.POPULATION, Behaviour.TRAINING)}
    key = MetricKey(Data.TRAIN, Behaviour.TRAINING)
    assert str(key) == "train_data, training behaviour"
    blob = json.loads(json.dumps(d.to_dict()))
    assert blob["metrics"][str(key)] == pytest.approx(d.metrics[key])
    assert f"- {key}: " in d.to_markdown()


def test_a_model_without_batchnorm_is_still_a_clear_error_with_options():
    with pytest.raises(ValueError, match="no BatchNorm"):
        diagnose(nn.Linear(2, 2), [torch.zeros(4, 2)], options=PreciseBNOptions(num_batches=1))
