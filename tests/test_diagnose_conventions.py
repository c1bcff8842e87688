"""diagnose and precise_bn share one batch convention (issue 19): fed the same odd batches (empty
tuples, mappings, namedtuples, 0-d tensors), both raise the same error type, or both hand the
model the same inputs. Before the kernel, diagnose had its own copies (an empty tuple reached
the model, a 0-d first element was skipped for another tensor)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import Tensor, nn

from rethinkbn import diagnose, precise_bn

Pair = namedtuple("Pair", ["x", "y"])
X = torch.arange(8.0).view(4, 2) * torch.tensor([1.0, -0.5]) + 1


def describe(obj: object) -> object:
    """What the model received: containers by type, tensors by dtype and shape."""
    if isinstance(obj, Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), str(obj.device))
    if isinstance(obj, dict):
        return (type(obj).__name__, tuple((k, describe(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(describe(v) for v in obj))
    return type(obj).__name__


class Probe(nn.Module):
    """Records each input; normalizes it when it is an (N, 2) tensor, else a fixed batch of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.seen: set[object] = set()

    def forward(self, x: object) -> Tensor:
        self.seen.add(describe(x))
        usable = isinstance(x, Tensor) and x.dim() == 2 and x.size(1) == 2 and x.size(0) > 1
        return self.bn(x if usable else X)  # type: ignore[arg-type]


ODD_BATCHES = {
    "empty tuple": (),
    "empty list": [],
    "dict": {"x": X, "y": torch.zeros(4)},
    "namedtuple": Pair(X, torch.zeros(4)),
    "0-d tensor": torch.tensor(3.0),
    "0-d tensor first": (torch.tensor(3.0), X),
    "only 0-d tensors": (torch.tensor(1.0), torch.tensor(2.0)),
    "list": [X, torch.zeros(4)],
}


def outcome(fn, **kwargs) -> tuple[str, object]:
    model = Probe()
    try:
        fn(model, **kwargs)
    except Exception as error:  # noqa: BLE001 - the type is the behaviour compared
        return "raised", type(error)
    return "ran", frozenset(model.seen)


@pytest.mark.parametrize("forward", [None, "whole batch"])
@pytest.mark.parametrize("input_key", [None, "x"])
@pytest.mark.parametrize("kind", list(ODD_BATCHES))
def test_diagnose_and_precise_bn_treat_odd_batches_alike(kind, input_key, forward):
    data = [ODD_BATCHES[kind]] * 4
    options = {"input_key": input_key, "device": "cpu", "num_samples": 8, "progress": False}
    if forward is not None:
        options["forward"] = lambda model, batch: model(batch)
    got = outcome(lambda m, **kw: diagnose(m, data, **kw), **options)
    want = outcome(lambda m, **kw: precise_bn(m, data, **kw), **options)
    assert got == want


def test_the_odd_batches_do_reach_both_outcomes():
    """The comparison above is not vacuous: some odd batches raise, others run."""
    seen = {outcome(lambda m, b=batch: precise_bn(m, [b] * 4, num_samples=8))[0]
            for batch in ODD_BATCHES.values()}
    assert seen == {"raised", "ran"}
