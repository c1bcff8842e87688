"""precise_bn across 2 real gloo ranks when they disagree, fail, stall or see empty batches.

Every rank must end with an error that names precise_bn and what went wrong (the failing rank,
the layer that differs), within the pass's ``timeout``, and with its model unchanged.
"""

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gloo_world import GlooWorld
from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.layers import GhostBatchNorm
from rethinkbn.population import batch_stats_inference, precise_bn

NORMS = {"torch": nn.BatchNorm1d, "ghost": GhostBatchNorm, "torch-sync": nn.SyncBatchNorm,
         "rethinkbn-sync": SyncBatchNorm}


def make_model(channels=3, extra=False, kind="torch"):
    torch.manual_seed(0)
    bn = NORMS[kind](channels)
    layers = [nn.Linear(2, channels), bn]
    if extra:
        layers.append(nn.BatchNorm1d(channels))
    return nn.Sequential(*layers)


def shard(rank):
    g = torch.Generator().manual_seed(10 + rank)
    sizes = {0: [4, 0, 5], 1: [0, 3]}[rank]
    return [torch.randn(n, 2, generator=g) * 2 + 1 for n in sizes]


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def attempt(model, data, **kwargs):
    """(error type, message, model unchanged) of one precise_bn call on this rank."""
    before = buffers(model)
    try:
        precise_bn(model, data, **kwargs)
        error = (None, "")
    except Exception as err:  # noqa: BLE001 - the test inspects it
        error = (type(err).__name__, str(err))
    unchanged = all(torch.equal(v, buffers(model)[k]) for k, v in before.items())
    return (*error, unchanged)


def empty_batches(kind):
    model = make_model(kind=kind)
    data = shard(dist.get_rank())
    precise_bn(model, data, num_batches=len(data), timeout=30)
    return buffers(model)


def empty_batch_inference(kind):
    model = make_model(kind=kind).train()
    before = buffers(model)
    with torch.no_grad(), batch_stats_inference(model):
        empty = model(torch.randn(0, 2))
        full = model(shard(0)[0])
    return empty.shape, full, all(torch.equal(v, buffers(model)[k]) for k, v in before.items())


def channels_differ():
    rank = dist.get_rank()
    return attempt(make_model(channels=3 + rank), shard(rank), num_batches=2, timeout=30)


def layer_counts_differ():
    rank = dist.get_rank()
    return attempt(make_model(extra=rank == 1), shard(rank), num_batches=2, timeout=30)


def one_rank_raises():
    rank = dist.get_rank()

    def forward(model, batch):
        if rank == 1:
            raise RuntimeError("boom on rank 1")
        return model(batch)

    return attempt(make_model(), shard(rank), num_batches=2, forward=forward, timeout=30)


def one_rank_never_arrives():
    if dist.get_rank() == 1:
        time.sleep(4)  # stuck (or busy elsewhere) past the others' timeout
        return None
    return attempt(make_model(), shard(0), num_batches=2, timeout=1)


@pytest.fixture(scope="module")
def world():
    with GlooWorld(2, timeout_s=60) as w:
        yield w


@pytest.mark.parametrize("kind", list(NORMS))
def test_empty_batches_on_the_ranks_contribute_nothing(world, kind):
    results = world.run(empty_batches, kind)
    model = make_model(kind=kind)
    union = [b for b in shard(0) + shard(1) if len(b)]
    with torch.no_grad():
        x = torch.cat([model[0](b) for b in union]).double()
    for rank_buffers in results:
        torch.testing.assert_close(rank_buffers["1.running_mean"].double(), x.mean(0))
        torch.testing.assert_close(rank_buffers["1.running_var"].double(), x.var(0))
    assert torch.equal(results[0]["1.running_var"], results[1]["1.running_var"])


@pytest.mark.parametrize("kind", ["torch-sync", "rethinkbn-sync"])
def test_batch_stats_inference_with_sync_layers_takes_an_empty_batch_on_each_rank(world, kind):
    model = make_model(kind="torch")
    with torch.no_grad(), batch_stats_inference(model):
        expected = model(shard(0)[0])
    for shape, full, unchanged in world.run(empty_batch_inference, kind):
        assert shape == (0, 3) and unchanged
        torch.testing.assert_close(full, expected)


def test_ranks_whose_layers_differ_in_channels_all_raise_naming_the_layer(world):
    for kind, message, unchanged in world.run(channels_differ):
        assert kind == "ValueError" and unchanged
        assert "precise_bn" in message
        assert "'1' with statistics of shape (3,) on rank 0" in message
        assert "'1' with statistics of shape (4,) on rank 1" in message


def test_ranks_whose_layer_counts_differ_all_raise_naming_the_missing_layer(world):
    for kind, message, unchanged in world.run(layer_counts_differ):
        assert kind == "ValueError" and unchanged
        assert "layer #1 is missing on rank 0" in message and "'2'" in message


def test_a_rank_that_raises_makes_the_others_raise_at_once_naming_it(world):
    failing, other = world.run(one_rank_raises)[::-1]
    assert failing == ("RuntimeError", "boom on rank 1", True)
    kind, message, unchanged = other
    assert kind == "RuntimeError" and unchanged
    assert "precise_bn: rank 1 raised during the pass" in message and "boom on rank 1" in message


def test_a_rank_that_never_arrives_bounds_the_wait_by_the_timeout():
    with GlooWorld(2, timeout_s=60) as world:
        kind, message, unchanged = world.run(one_rank_never_arrives)[0]
    assert kind == "TimeoutError" and unchanged
    assert "precise_bn: rank 0 waited up to 1 s" in message and "timeout=" in message
