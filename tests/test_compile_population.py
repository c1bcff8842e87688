"""A user's torch.compile'd training loop with the population tools around it, against eager.

One small model (torch BatchNorm1d and a GhostBatchNorm converted by rethinkbn) is trained twice
from the same weights on the same batches, once eagerly and once through ``torch.compile``, with
``precise_bn``, ``StatsBank.use``, ``batch_stats_inference`` and a ``FreezeBNHook`` around the
steps. Outputs, gradients and buffers must agree (float32 round-off: compiled kernels may sum in
another order). The tools are given the compiled wrapper, as a user would; they work on the
module inside it (same layer names as the eager model) and return the wrapper.
"""

import copy

import pytest
import torch
from torch import nn

from rethinkbn.convert import convert_batchnorm
from rethinkbn.layers import FrozenBatchNorm
from rethinkbn.population import (
    FreezeBNHook,
    StatsBank,
    batch_stats_inference,
    capture_stats,
    precise_bn,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4),
        nn.Linear(4, 1),
    )
    return convert_batchnorm(model, "ghost", norm_batch_size=4, include="4")


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, generator=g) * 2 + 1 for _ in range(4)]


def train_step(model, optimizer, x):
    model.train()
    optimizer.zero_grad()
    y = model(x)
    y.square().mean().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return y.detach(), grads


def loop(model):
    """Train, PreciseBN, bank switch, batch-stats inference, FrozenBN, train again: a record."""
    data = batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = {"train": [train_step(model, optimizer, x) for x in data[:2]]}
    precise_bn(model, data, num_batches=4)
    record["precise"] = capture_stats(model)
    bank = StatsBank()
    bank["precise"] = record["precise"]
    precise_bn(model, data[:1], num_batches=1)
    model.eval()
    with torch.no_grad(), bank.use(model, "precise"):
        record["bank_eval"] = model(data[3])
    with torch.no_grad(), batch_stats_inference(model, norm_batch_size=4):
        record["batch_stats"] = model(data[3])
    frozen = FreezeBNHook(data, freeze_epoch=1, num_batches=4)(model, 1)
    record["same_object"] = frozen is model
    record["frozen_train"] = [train_step(frozen, optimizer, x) for x in data[2:]]
    record["state"] = {k.removeprefix("_orig_mod."): v.clone()
                       for k, v in frozen.state_dict().items()}
    record["layers"] = frozen
    return record


@pytest.fixture(scope="module")
def runs():
    eager_model = make_model()
    compiled_model = copy.deepcopy(eager_model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)
    return loop(eager_model), loop(compiled), compiled_model


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        torch.testing.assert_close(a, b, **TOL)


def test_compiled_training_steps_match_eager_outputs_and_gradients(runs):
    eager, compiled, _ = runs
    assert_same(eager["train"], compiled["train"])


def test_precise_bn_and_the_bank_on_a_compiled_model_match_eager(runs):
    eager, compiled, _ = runs
    assert_same(eager["precise"], compiled["precise"])  # same layer names, no _orig_mod. prefix
    assert_same(eager["bank_eval"], compiled["bank_eval"])


def test_batch_stats_inference_on_a_compiled_model_matches_eager(runs):
    eager, compiled, _ = runs
    assert_same(eager["batch_stats"], compiled["batch_stats"])


def test_freeze_bn_hook_keeps_the_compiled_wrapper_and_frozen_training_matches_eager(runs):
    eager, compiled, inner = runs
    assert compiled["same_object"] and eager["same_object"]
    assert isinstance(inner[1], FrozenBatchNorm) and isinstance(inner[4], FrozenBatchNorm)
    assert_same(eager["frozen_train"], compiled["frozen_train"])
    assert_same(eager["state"], compiled["state"])
