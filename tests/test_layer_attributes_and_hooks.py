"""Attributes a user set stay set, and a user's hooks keep their effect (issue 18 item 4).

* PerDeviceBatchNorm splits by ``num_devices`` for one call only: its ``norm_batch_size`` stays
  the constructor's (before: ``None`` became 4 after one training forward).
* ``batch_stats_inference(norm_batch_size=k)`` on torch's BatchNorm: a user's forward hook acts
  on the grouped output (before: a clamp-to-0.5 hook's output was dropped, max |y| 3.0).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rethinkbn.distributed.virtual import PerDeviceBatchNorm
from rethinkbn.layers import GhostBatchNorm
from rethinkbn.population import batch_stats_inference


def data(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1


@pytest.mark.parametrize("nbs", [None, 2])
def test_per_device_bn_keeps_its_norm_batch_size(nbs):
    layer = PerDeviceBatchNorm(3, num_devices=2, norm_batch_size=nbs)
    layer(data())
    assert layer.norm_batch_size == nbs
    layer.num_devices = None  # now it groups by its own norm_batch_size
    ref = GhostBatchNorm(3, nbs)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(data()), ref(data()))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)


def test_per_device_bn_still_normalizes_each_device_alone():
    layer, bn = PerDeviceBatchNorm(3, num_devices=2), nn.BatchNorm1d(3)
    y = layer(data())
    torch.testing.assert_close(y[:4], bn(data()[:4]))
    torch.testing.assert_close(y[4:], bn(data()[4:]))


def test_per_device_bn_refusing_a_batch_changes_nothing():
    layer = PerDeviceBatchNorm(3, num_devices=3, norm_batch_size=2)
    with pytest.raises(ValueError, match="does not split into 3 equal virtual devices"):
        layer(data())
    assert layer.norm_batch_size == 2 and int(layer.num_batches_tracked) == 0


def clamp(_module, _args, output):
    return output.clamp(-0.5, 0.5)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(3), lambda: GhostBatchNorm(3)],
                         ids=["torch", "ghost"])
def test_a_user_s_forward_hook_acts_on_the_grouped_output(make):
    layer = make()
    layer.register_forward_hook(clamp)
    model = nn.Sequential(layer)
    with batch_stats_inference(model, norm_batch_size=2):
        y = model(data())
    assert y.abs().max() <= 0.5
    ref = GhostBatchNorm(3, 2)
    torch.testing.assert_close(y, ref(data()).clamp(-0.5, 0.5))
    # and the hook is still the user's, alone, after the block
    assert list(layer._forward_hooks.values()) == [clamp]
