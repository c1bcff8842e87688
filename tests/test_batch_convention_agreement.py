"""``diagnose`` and ``precise_bn`` follow the one batch convention of ``rethinkbn._model``
(issue 19): fed the same odd batches they count the same samples or raise the same error type."""

from __future__ import annotations

from collections import defaultdict, namedtuple

import pytest
import torch
from torch import nn

from rethinkbn.diagnosis import diagnose
from rethinkbn.population import precise_bn

Pair = namedtuple("Pair", ["x", "y"])
N = 16


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model(torch.randn(N, 3))
    return model


def x(i: int) -> torch.Tensor:
    return torch.randn(N, 3, generator=torch.Generator().manual_seed(i)) * 2 + 1


def batches(kind: str) -> tuple[list, dict]:
    """(batches, keywords both functions take) for one odd kind of batch."""
    if kind == "dict":
        return [{"label": torch.zeros(N), "x": x(i)} for i in range(4)], {"input_key": "x"}
    if kind == "defaultdict":
        return ([defaultdict(list, {"x": x(i), "step": torch.tensor(i)}) for i in range(4)],
                {"input_key": "x", "device": "cpu"})
    if kind == "namedtuple":
        return [Pair(x(i), torch.zeros(N)) for i in range(4)], {}
    if kind == "0-d first":
        return ([(torch.tensor(float(i)), x(i)) for i in range(4)],
                {"forward": lambda m, b: m(b[1])})
    if kind == "empty tuple":
        return [() for _ in range(4)], {}
    raise AssertionError(kind)


def behaviour(fn, kind: str) -> object:
    data, kwargs = batches(kind)
    try:
        if fn is precise_bn:
            return precise_bn(make_model(), data, num_batches=2, **kwargs).num_samples // 2
        return diagnose(make_model(), data, num_samples=2 * N, **kwargs).batch_size
    except Exception as err:  # noqa: BLE001 - the behaviour is the error's type
        return type(err)


@pytest.mark.parametrize("kind", ["dict", "defaultdict", "namedtuple", "0-d first", "empty tuple"])
def test_diagnose_and_precise_bn_treat_odd_batches_alike(kind):
    got = behaviour(diagnose, kind), behaviour(precise_bn, kind)
    assert got[0] == got[1], got
    if kind != "empty tuple":
        assert got[1] == N
    else:
        assert got[1] is ValueError
