"""Errors name the public function once, where it was entered; the user's own errors pass as they
are; a rank that never arrives raises TimeoutError from the pass's own deadline (issue 19, item 3).
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gloo_world import GlooWorld
from rethinkbn._checks import in_context
from rethinkbn.population import (
    FreezeBNHook,
    StatsBank,
    capture_stats,
    ema_report,
    freeze_with_precise_stats,
    install_stats,
    precise_bn,
    recompute_stats,
)
from rethinkbn.population.options import options_from, with_options

ENTRIES = [precise_bn, recompute_stats, ema_report, freeze_with_precise_stats]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__)
def test_an_error_of_the_pass_names_the_function_called_once(entry):
    with pytest.raises(ValueError) as info:
        entry(make_model(), [])
    message = str(info.value)
    assert message.startswith(f"{entry.__name__}: data yielded no batches"), message
    assert message.count(":") == 1  # one name: not the internal function it went through


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__)
def test_an_error_of_the_users_forward_passes_unchanged(entry):
    mine = ValueError("my forward's own error")

    def forward(model, batch):
        raise mine

    with pytest.raises(ValueError) as info:
        entry(make_model(), [torch.randn(4, 2)], forward=forward)
    assert info.value is mine and str(info.value) == "my forward's own error"


def test_an_error_of_the_model_itself_passes_unchanged():
    with pytest.raises(RuntimeError) as info:
        precise_bn(make_model(), [torch.randn(4, 5)])  # Linear(2, 3) gets 5 features
    assert not str(info.value).startswith("precise_bn")


def test_warnings_point_at_the_line_that_called_the_function():
    for entry in ENTRIES:
        with pytest.warns(RuntimeWarning, match="data ended after 1 batches") as record:
            entry(make_model(), [torch.randn(4, 2)], num_batches=3)
        assert {w.filename for w in record} == {__file__}, entry.__name__


def test_a_hook_and_a_bank_name_themselves():
    with pytest.raises(TypeError, match=r"^FreezeBNHook: unknown arguments \['num_sample'\]"):
        FreezeBNHook([], freeze_epoch=1, num_sample=3)
    model = make_model()
    bad = {"1": {"running_mean": torch.zeros(4), "running_var": torch.ones(4)}}
    with pytest.raises(ValueError, match=r"^install_stats: layer '1' \(BatchNorm1d\) expects"):
        install_stats(model, bad)
    bank = StatsBank({"bad": bad, "ok": capture_stats(model)})
    with pytest.raises(ValueError, match=r"^StatsBank.use\('bad'\): layer '1'"):
        with bank.use(model, "bad"):
            pass


def test_in_context_relabels_only_the_packages_own_errors_of_the_plain_types():
    class MyError(ValueError):
        pass

    with pytest.raises(TypeError, match=r"^f: options must be a PreciseBNOptions"):
        with in_context("f"):
            options_from(3, {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^f: precise_bn: options"):  # an entry inside another
        with in_context("f"):
            precise_bn(make_model(), [], options=3)
    for error in (ValueError("user"), MyError("sub"), KeyError("key")):
        with pytest.raises(type(error)) as info, in_context("f"):
            raise error
        assert info.value is error


def test_with_options_keeps_kwargs_when_told_not_by_the_functions_name():
    def freeze_with_precise_stats(model, data, options=None, **kwargs):
        """A function that happens to share the name."""

    shown = with_options()(freeze_with_precise_stats)
    kinds = [p.kind for p in inspect.signature(shown).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    real = inspect.signature(freeze_with_precise_stats_real := ENTRIES[3]).parameters
    assert inspect.Parameter.VAR_KEYWORD in [p.kind for p in real.values()]
    assert "num_samples" in real and freeze_with_precise_stats_real.__name__.startswith("freeze")
    assert inspect.Parameter.VAR_KEYWORD not in [
        p.kind for p in inspect.signature(precise_bn).parameters.values()]


# ---------------------------------------------------------------------------- a missing rank
def _attempt(timeout):
    if dist.get_rank() == 1:
        time.sleep(4)  # never joins: past the others' deadline
        return None
    model = make_model()
    before = model[1].running_mean.clone()
    try:
        precise_bn(model, [torch.randn(4, 2)], num_batches=1, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - the test inspects it
        return type(err).__name__, str(err), torch.equal(before, model[1].running_mean)
    return None


def test_a_backend_that_fails_the_exchange_first_raises_runtime_error():
    # the process group's own timeout (1 s) is shorter than the pass's (30 s): gloo fails the
    # collective first, and the error says so rather than claiming our deadline passed
    with GlooWorld(2, timeout_s=1) as world:
        kind, message, unchanged = world.run(_attempt, 30)[0]
    assert kind == "RuntimeError" and unchanged, message
    assert message.startswith("precise_bn: rank 0: the exchange with the other ranks") and (
        "failed" in message)
