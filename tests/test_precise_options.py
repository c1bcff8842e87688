"""One definition of the pass's options, shared by every entry point, checked before any work."""

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from rethinkbn.population import (
    FreezeBNHook,
    PreciseBNHook,
    PreciseBNOptions,
    batch_stats_inference,
    ema_report,
    freeze_with_precise_stats,
    precise_bn,
    recompute_stats,
)
from rethinkbn.population.options import OPTIONS_DOC

OPTION_NAMES = [f.name for f in dataclasses.fields(PreciseBNOptions)]
FUNCTIONS = [precise_bn, recompute_stats, ema_report, freeze_with_precise_stats]


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.BatchNorm1d(3)))
    return model, [torch.randn(4, 2) for _ in range(3)]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_every_entry_point_shows_the_same_options_and_docs(func):
    params = inspect.signature(func).parameters
    assert [n for n in params if n in OPTION_NAMES] == OPTION_NAMES
    for name in OPTION_NAMES:
        assert params[name].default == getattr(PreciseBNOptions(), name)
    assert OPTIONS_DOC in func.__doc__


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_every_entry_point_refuses_an_unknown_keyword(func):
    model, data = model_and_data()
    with pytest.raises(TypeError, match="num_sample"):
        func(model, data, num_sample=4)


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_num_samples_and_num_batches_together_are_refused(func):
    model, data = model_and_data()
    before = state(model)
    with pytest.raises(ValueError, match="not both"):
        func(model, data, num_samples=8, num_batches=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["num_samples", "num_batches", "pass_norm_batch_size"])
@pytest.mark.parametrize("value", [True, 2.0, "4"])
def test_a_non_int_count_is_a_type_error(name, value):
    model, data = model_and_data()
    with pytest.raises(TypeError, match=name):
        precise_bn(model, data, **{name: value})


@pytest.mark.parametrize("name", ["num_samples", "num_batches", "pass_norm_batch_size"])
def test_a_count_below_one_is_a_value_error(name):
    model, data = model_and_data()
    with pytest.raises(ValueError, match=name):
        precise_bn(model, data, **{name: 0})


@pytest.mark.parametrize("value", [0, -1.0])
def test_a_timeout_that_is_not_positive_is_refused(value):
    with pytest.raises(ValueError, match="timeout"):
        PreciseBNOptions(timeout=value)


def test_hooks_check_their_options_when_built():
    with pytest.raises(ValueError, match="not both"):
        PreciseBNHook(None, num_samples=8, num_batches=2)
    with pytest.raises(TypeError, match="num_samples"):
        FreezeBNHook(None, freeze_epoch=0, num_samples=True)
    assert PreciseBNHook(None, num_batches=2).options == PreciseBNOptions(num_batches=2)


def test_an_options_object_gives_the_same_result_as_keywords_and_keywords_override_it():
    model, data = model_and_data()
    by_keywords = recompute_stats(model, data, num_batches=2)
    options = PreciseBNOptions(num_batches=3)
    by_object = recompute_stats(model, data, options, num_batches=2)  # the keyword wins
    for layer in by_keywords:
        for key, value in by_keywords[layer].items():
            assert torch.equal(by_object[layer][key], value)
    with pytest.raises(TypeError, match="PreciseBNOptions"):
        precise_bn(model, data, options={"num_batches": 2})


def test_the_default_budget_is_ten_thousand_samples_and_a_keyword_budget_replaces_the_other():
    assert PreciseBNOptions().budget == ("samples", 10_000)
    model, data = model_and_data()
    report = precise_bn(model, data, PreciseBNOptions(num_batches=1), num_samples=8)
    assert (report.num_batches, report.num_samples) == (2, 8)


def test_pass_norm_batch_size_without_a_grouping_layer_is_refused():
    model, data = model_and_data()
    before = state(model)
    with pytest.raises(ValueError, match=r"pass_norm_batch_size=2 .*BatchNorm1d"):
        precise_bn(model, data, num_batches=2, pass_norm_batch_size=2)
    assert_unchanged(model, before)


def test_torch_batchnorm_with_one_value_per_channel_names_the_layer_in_precise_bn():
    model, _ = model_and_data()
    before = state(model)
    with pytest.raises(ValueError, match=r"'1.0' \(BatchNorm1d\).*more than 1 value"):
        precise_bn(model, [torch.randn(4, 2), torch.randn(1, 2)], num_batches=2)
    assert_unchanged(model, before)


def test_torch_batchnorm_with_one_value_per_channel_names_the_layer_in_batch_stats_inference():
    model, _ = model_and_data()
    with pytest.raises(ValueError, match=r"'1.0' \(BatchNorm1d\).*more than 1 value"):
        with batch_stats_inference(model):
            model(torch.randn(1, 2))
