"""The NaN policy under torch's cumulative average (``momentum=None``): a skipped batch does not
count (issue 18 item 3).

Reference: torch's BatchNorm with ``momentum=None`` fed only the finite batches. Batches with
means 1, NaN, 3 give ``running_mean`` 2.0 (before the fix: 1.667, the NaN batch advanced
``num_batches_tracked``). Per-channel skips count per channel, per-domain skips per domain row,
on every layer of the family that tracks running statistics, SyncBatchNorm on 2 gloo ranks too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gloo_world import GlooWorld
from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.distributed.virtual import PerDeviceBatchNorm
from rethinkbn.layers import DomainBatchNorm, GhostBatchNorm

MEANS = (1.0, 3.0, -2.0)


def batches(nan_channel: int | None = None, dtype=torch.float64) -> list[torch.Tensor]:
    """Batch 0 and 2 finite, batch 1 NaN (everywhere, or in one channel)."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(8, 3, 4, generator=g, dtype=dtype) + m for m in (1.0, 5.0, 3.0)]
    if nan_channel is None:
        out[1].fill_(float("nan"))
    else:
        out[1][:, nan_channel] = float("nan")
    return out


def torch_bn(xs: list[torch.Tensor]) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(3, momentum=None).to(xs[0].dtype)
    for x in xs:
        bn(x)
    return bn


WHOLE = {  # layers whose running statistics are torch's over the whole batch
    "ghost whole": lambda: GhostBatchNorm(3, momentum=None),
    "domain int, shared stats": lambda: DomainBatchNorm(3, 2, population_stats="shared",
                                                        momentum=None),
    "domain int, per-domain stats": lambda: DomainBatchNorm(3, 2, momentum=None),
    "sync, no process group": lambda: SyncBatchNorm(3, momentum=None),
}
GROUPED = {  # layers whose running statistics average groups: compared with a clean twin
    "ghost equal contiguous": lambda: GhostBatchNorm(3, 2, momentum=None),
    "ghost equal strided": lambda: GhostBatchNorm(3, 2, grouping="strided", momentum=None),
    "ghost unequal": lambda: GhostBatchNorm(3, 3, momentum=None),
    "per-device": lambda: PerDeviceBatchNorm(3, num_devices=2, momentum=None),
}


def feed(layer: nn.Module, xs: list[torch.Tensor]) -> nn.Module:
    layer = layer.to(xs[0].dtype)
    for x in xs:
        if isinstance(layer, DomainBatchNorm):
            layer(x, domain=1)
        else:
            layer(x)
    return layer


def buffers(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = layer.running_mean, layer.running_var
    return (mean[1], var[1]) if mean.dim() == 2 else (mean, var)


def test_the_issue_s_reproducer_gives_torch_s_2_0():
    layer = GhostBatchNorm(1, momentum=None, dtype=torch.float64)
    for m in (1.0, float("nan"), 3.0):
        layer(torch.tensor([[m - 1], [m + 1]], dtype=torch.float64))
    assert layer.running_mean.item() == pytest.approx(2.0)
    assert int(layer.num_batches_tracked) == 2


@pytest.mark.parametrize("name", list(WHOLE))
def test_a_batch_skipped_in_every_channel_does_not_count(name):
    xs = batches()
    layer = feed(WHOLE[name](), xs)
    ref = torch_bn([xs[0], xs[2]])
    mean, var = buffers(layer)
    torch.testing.assert_close(mean, ref.running_mean)
    torch.testing.assert_close(var, ref.running_var)
    tracked = layer.num_batches_tracked
    assert int(tracked[1] if tracked.dim() else tracked) == 2
    # the state_dict still loads into torch's BatchNorm
    if mean.dim() == 1 and layer.running_mean.dim() == 1:
        bn = nn.BatchNorm1d(3, momentum=None).double()
        bn.load_state_dict(layer.state_dict())


@pytest.mark.parametrize("name", list(WHOLE))
def test_a_channel_skip_counts_for_that_channel_alone(name):
    xs = batches(nan_channel=1)
    layer = feed(WHOLE[name](), xs)
    skipped, full = torch_bn([xs[0], xs[2]]), torch_bn([x.nan_to_num(7.0) for x in xs])
    mean, var = buffers(layer)
    for c, ref in ((0, full), (1, skipped), (2, full)):
        torch.testing.assert_close(mean[c], ref.running_mean[c])
        torch.testing.assert_close(var[c], ref.running_var[c])


@pytest.mark.parametrize("name", list(GROUPED))
@pytest.mark.parametrize("nan_channel", [None, 1])
def test_grouped_layers_average_as_if_fed_the_finite_values_alone(name, nan_channel):
    xs = batches(nan_channel)
    layer = feed(GROUPED[name](), xs)
    clean = feed(GROUPED[name](), [xs[0], xs[2]])
    full = feed(GROUPED[name](), [x.nan_to_num(7.0) for x in xs])
    channels = [1] if nan_channel is not None else [0, 1, 2]
    for c in range(3):
        ref = clean if c in channels else full
        torch.testing.assert_close(layer.running_mean[c], ref.running_mean[c])
        torch.testing.assert_close(layer.running_var[c], ref.running_var[c])


def test_domain_rows_count_their_own_skips():
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    xs = batches(dtype=torch.float64)
    xs[1] = torch.randn(8, 3, 4, dtype=torch.float64) + 5
    xs[1][4:] = float("nan")  # domain 1 is NaN in batch 1, domain 0 is finite
    layer = DomainBatchNorm(3, 2, momentum=None).double()
    for x in xs:
        layer(x, domain=ids)
    assert layer.num_batches_tracked.tolist() == [3, 2]
    for d, kept in ((0, xs), (1, [xs[0], xs[2]])):
        ref = torch_bn([x[ids == d] for x in kept])
        torch.testing.assert_close(layer.running_mean[d], ref.running_mean)
        torch.testing.assert_close(layer.running_var[d], ref.running_var)


def test_a_loaded_checkpoint_resumes_the_average_like_torch():
    xs = batches(nan_channel=1)
    layer = feed(GhostBatchNorm(3, momentum=None), xs[:2])
    bn = torch_bn([xs[0]])
    layer.load_state_dict(bn.state_dict())  # a torch checkpoint: 1 batch in every channel
    layer(xs[2])
    bn(xs[2])
    torch.testing.assert_close(layer.running_mean, bn.running_mean)


def test_reset_running_stats_forgets_the_skips():
    xs = batches(nan_channel=1)
    layer = feed(GhostBatchNorm(3, momentum=None), xs)
    layer.reset_running_stats()
    assert not layer.skipped_batches.any()
    feed(layer, [xs[0]])
    torch.testing.assert_close(layer.running_mean, torch_bn([xs[0]]).running_mean)


# ------------------------------------------------------------------------------ two gloo ranks
def sync_cumulative(nan_channel):
    xs = batches(nan_channel)
    rows = slice(0, 4) if dist.get_rank() == 0 else slice(4, 8)
    layer = SyncBatchNorm(3, momentum=None).double()
    for x in xs:
        layer(x[rows])
    return layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked)


@pytest.mark.parametrize("nan_channel", [None, 1])
def test_sync_bn_on_two_ranks_averages_the_finite_batches_alone(nan_channel):
    xs = batches(nan_channel)
    skipped, full = torch_bn([xs[0], xs[2]]), torch_bn([x.nan_to_num(7.0) for x in xs])
    with GlooWorld(2) as world:
        results = world.run(sync_cumulative, nan_channel)
    for mean, var, tracked in results:
        assert tracked == (2 if nan_channel is None else 3)
        for c in range(3):
            ref = skipped if nan_channel is None or c == nan_channel else full
            torch.testing.assert_close(mean[c], ref.running_mean[c])
            torch.testing.assert_close(var[c], ref.running_var[c])
