"""Per-device BN of virtual devices follows the normalization batch that population tools choose."""

import torch
import torch.nn.functional as F

from rethinkbn.distributed import PerDeviceBatchNorm
from rethinkbn.population import batch_stats_inference, precise_bn


def loop_over_groups(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([F.batch_norm(g, None, None, training=True) for g in x.split(size)])


def test_batch_stats_inference_groups_by_the_given_size_not_by_the_device_count():
    layer = PerDeviceBatchNorm(3, num_devices=4, affine=False).eval()
    x = torch.randn(16, 3, 5, dtype=torch.float64)
    layer.double()
    with batch_stats_inference(layer, norm_batch_size=2):
        y = layer(x)
    torch.testing.assert_close(y, loop_over_groups(x, 2))
    assert layer.num_devices == 4 and not layer.training


def test_batch_stats_inference_without_a_size_uses_the_whole_batch():
    layer = PerDeviceBatchNorm(3, num_devices=4, affine=False).double().eval()
    x = torch.randn(16, 3, 5, dtype=torch.float64)
    with batch_stats_inference(layer):
        y = layer(x)
    torch.testing.assert_close(y, loop_over_groups(x, 16))


def test_training_still_splits_by_devices_after_a_precise_pass():
    layer = PerDeviceBatchNorm(3, num_devices=2, affine=False).double()
    batches = [torch.randn(8, 3, 4, dtype=torch.float64) for _ in range(3)]
    precise_bn(layer, batches, num_batches=3, progress=False)
    torch.testing.assert_close(layer.running_mean, torch.cat(batches).mean((0, 2)))
    assert layer.num_devices == 2
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_over_groups(x, 4))
