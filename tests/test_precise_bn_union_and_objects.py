"""precise_bn (issue 18 items 4, 5 and 22.6): the union of the ranks' data even when one rank's
shard is empty, batches that are objects, and the model-first argument order.

References: torch's statistics (``x.mean(0)``, ``x.var(0)``) of the concatenated non-empty
batches, and precise_bn on the same values given as tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gloo_world import GlooWorld
from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.layers import GhostBatchNorm
from rethinkbn.population import ema_report, freeze_with_precise_stats, precise_bn, recompute_stats

NORMS = {"torch": nn.BatchNorm1d, "ghost": GhostBatchNorm, "torch-sync": nn.SyncBatchNorm,
         "rethinkbn-sync": SyncBatchNorm}


def make_model(kind="torch"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), NORMS[kind](3))


def shard(rank, empty_rank=1):
    g = torch.Generator().manual_seed(10 + rank)
    sizes = [0, 0] if rank == empty_rank else [4, 5]
    return [torch.randn(n, 2, generator=g) * 2 + 1 for n in sizes]


def on_rank(kind, empty_rank):
    model = make_model(kind)
    data = shard(dist.get_rank(), empty_rank)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            precise_bn(model, data, num_batches=2, timeout=30)
    except ValueError as err:
        unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        return {"error": str(err), "unchanged": unchanged}
    return {"mean": model[1].running_mean.clone(), "var": model[1].running_var.clone(),
            "warnings": [str(w.message) for w in caught]}


@pytest.fixture(scope="module")
def world():
    with GlooWorld(2, timeout_s=60) as w:
        yield w


@pytest.mark.parametrize("kind", list(NORMS))
def test_a_rank_with_only_empty_batches_gets_the_union_s_statistics(world, kind):
    results = world.run(on_rank, kind, 1)
    model = make_model(kind)
    with torch.no_grad():
        x = torch.cat([model[0](b) for b in shard(0, 1) if len(b)]).double()
    for result in results:
        assert "error" not in result, result
        torch.testing.assert_close(result["mean"].double(), x.mean(0))
        torch.testing.assert_close(result["var"].double(), x.var(0))
        assert not any("never called" in w for w in result["warnings"])
    assert torch.equal(results[0]["var"], results[1]["var"])


def test_every_rank_raises_when_the_union_is_empty(world):
    results = world.run(both_empty)
    for result in results:
        assert "held no samples" in result["error"] and result["unchanged"]


def both_empty():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        precise_bn(model, [torch.randn(0, 2)], num_batches=1, timeout=30)
    except ValueError as err:
        return {"error": str(err), "unchanged": all(
            torch.equal(v, model.state_dict()[k]) for k, v in before.items())}
    return {"error": "", "unchanged": False}


# ------------------------------------------------------------------------------ object batches
@dataclass
class GraphBatch:
    nodes: torch.Tensor
    label: str = "graph"


def forward(model, batch):
    return model(batch.nodes)


@pytest.mark.parametrize("kind", ["torch", "ghost"])
def test_a_batch_that_is_an_object_is_counted_where_the_layers_see_it(kind):
    data = [torch.randn(n, 2, generator=torch.Generator().manual_seed(n)) for n in (4, 6, 5)]
    model, ref = make_model(kind), make_model(kind)
    report = precise_bn(model, [GraphBatch(x) for x in data], num_samples=10, forward=forward)
    ref_report = precise_bn(ref, data, num_samples=10)
    assert (report.num_samples, report.num_batches) == (ref_report.num_samples, 2)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    snapshot = recompute_stats(make_model(kind), [GraphBatch(x) for x in data], forward=forward,
                               num_batches=3)
    expected = recompute_stats(make_model(kind), data, num_batches=3)
    torch.testing.assert_close(snapshot["1"]["running_var"], expected["1"]["running_var"])


def test_an_object_batch_no_layer_sees_still_raises_a_clear_error():
    model = make_model()
    before = model[1].running_mean.clone()
    with pytest.raises(TypeError, match="cannot tell the batch size.*no BatchNorm layer"):
        precise_bn(model, [GraphBatch(torch.randn(4, 2))], forward=lambda m, b: None)
    assert torch.equal(model[1].running_mean, before)


# ------------------------------------------------------------------------------ argument order
@pytest.mark.parametrize("entry", [precise_bn, recompute_stats, ema_report,
                                   freeze_with_precise_stats])
def test_torch_s_update_bn_order_raises_a_type_error_saying_the_model_comes_first(entry):
    model, loader = make_model(), [torch.randn(4, 2)]
    before = model[1].running_mean.clone()
    with pytest.raises(TypeError, match=rf"{entry.__name__}: expected the model .* first "
                                        r"argument, got list; the arguments are swapped"):
        entry(loader, model)
    assert torch.equal(model[1].running_mean, before)
