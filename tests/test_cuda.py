"""The CUDA paths: every layer, precise_bn, StatsBank, fold, shuffle and SyncBatchNorm on the GPU.

Marked ``cuda`` (``pytest -m cuda``; ``benchmarks/gpu.sh`` runs them) and skipped without a GPU.
Each test runs the same thing on CUDA and on CPU (float64 where the reference must be exact) and
compares. SyncBatchNorm across 2 processes uses gloo with CUDA tensors: NCCL cannot put two
ranks on one GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from gloo_world import GlooWorld
from rethinkbn import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    ShuffledModule,
    StatsBank,
    SyncBatchNorm,
    fold_batchnorm,
    precise_bn,
)
from rethinkbn.distributed import PerDeviceBatchNorm, ShufflePlan

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOL = {"atol": 1e-4, "rtol": 1e-4}


def batch(shape=(8, 3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)


def step_on(layer, x, dy, device, **kwargs):
    layer = copy.deepcopy(layer).to(device)
    xd = x.to(device).requires_grad_()
    y = layer(xd, **kwargs)
    y.backward(dy.to(device))
    return y.detach().cpu(), xd.grad.cpu(), {k: v.cpu() for k, v in layer.state_dict().items()}


LAYERS = {
    "ghost-contiguous": lambda: GhostBatchNorm(3, 2),
    "ghost-strided": lambda: GhostBatchNorm(3, 2, grouping="strided"),
    "ghost-unequal": lambda: GhostBatchNorm(3, 3),
    "ghost-full": lambda: GhostBatchNorm(3),
    "frozen": lambda: FrozenBatchNorm(3),
    "per-device": lambda: PerDeviceBatchNorm(3, num_devices=2),
    "sync-one-process": lambda: SyncBatchNorm(3),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_layer_trains_on_cuda_as_on_cpu(name, channels_last):
    layer = LAYERS[name]()
    x, dy = batch()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got, ref = step_on(layer, x, dy, "cuda"), step_on(layer, x, dy, "cpu")
    for a, b in zip(got[:2], ref[:2], strict=True):
        assert_close(a, b, **TOL)
    for key, value in ref[2].items():
        assert_close(got[2][key], value, **TOL)


@pytest.mark.parametrize("ids_device", ["cpu", "cuda"])
def test_domain_batchnorm_with_per_sample_ids_on_either_device(ids_device):
    layer = DomainBatchNorm(3, num_domains=2)
    x, dy = batch()
    ids = torch.tensor([0, 1] * 4, device=ids_device)
    got = step_on(layer, x, dy, "cuda", domain=ids)
    ref = step_on(layer, x, dy, "cpu", domain=ids.cpu())
    for a, b in zip(got[:2], ref[:2], strict=True):
        assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics_on_cuda(dtype):
    x, dy = batch()
    for layer in (GhostBatchNorm(3, 4), SyncBatchNorm(3)):
        layer = layer.cuda()
        y = layer(x.cuda().to(dtype))
        assert y.dtype == dtype and layer.running_var.dtype == torch.float32
        assert_close(layer.running_mean.cpu(), 0.1 * x.double().mean((0, 2, 3)).float(),
                     atol=1e-3, rtol=1e-3)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         GhostBatchNorm(2, 4))


def test_precise_bn_on_cuda_equals_cpu():
    data = [batch(seed=s)[0] for s in range(3)]
    cpu, gpu = small_model(), small_model().cuda()
    precise_bn(cpu, data, num_samples=None, num_batches=3)
    precise_bn(gpu, [d.cuda() for d in data], num_samples=None, num_batches=3)
    for key, value in cpu.state_dict().items():
        assert_close(gpu.state_dict()[key].cpu(), value, **TOL)


def test_stats_bank_switches_cuda_buffers_and_restores_them_exactly(tmp_path):
    model = small_model().cuda()
    bank = StatsBank()
    bank.capture(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    precise_bn(model, [batch(seed=5)[0].cuda()], num_samples=None, num_batches=1)
    with bank.use(model, "a"):
        for key, value in before.items():
            assert torch.equal(model.state_dict()[key], value)
    bank.save(tmp_path / "bank.pt")
    assert StatsBank.load(tmp_path / "bank.pt", map_location="cuda").names == ["a"]


def test_fold_on_cuda_matches_the_eval_model():
    model = small_model().cuda()
    precise_bn(model, [batch(seed=1)[0].cuda()], num_samples=None, num_batches=1)
    model.eval()
    x = batch(seed=2)[0].cuda()
    assert_close(fold_batchnorm(model)(x), model(x), **TOL)


def test_virtual_shuffle_and_shuffled_module_on_cuda():
    x = batch()[0].cuda()
    plan = ShufflePlan.virtual(8, 2, seed=0, step=0)
    assert torch.equal(plan.unshuffle(plan.shuffle(x)), x)
    head = ShuffledModule(PerDeviceBatchNorm(3, num_devices=2), num_devices=2).cuda()
    cpu_head = ShuffledModule(PerDeviceBatchNorm(3, num_devices=2), num_devices=2)
    assert_close(head(x).cpu(), cpu_head(x.cpu()), **TOL)


def test_sync_batchnorm_training_step_makes_no_host_device_sync():
    layer = SyncBatchNorm(3).cuda()
    x = batch()[0].cuda().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_on_cuda(sizes):
    """SyncBatchNorm over gloo with CUDA tensors (both ranks on GPU 0)."""
    rank = dist.get_rank()
    x, dy = batch((sum(sizes), 3, 4, 2))
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    layer = SyncBatchNorm(3).cuda()
    xd = x[rows].cuda().requires_grad_()
    y = layer(xd)
    y.backward(dy[rows].cuda())
    (gx,) = torch.autograd.grad((layer(xd) * dy[rows].cuda()).sum(), xd, create_graph=True)
    gx.square().sum().backward()
    return y.detach().cpu(), layer.running_mean.cpu()


def test_sync_batchnorm_across_two_processes_with_cuda_tensors():
    sizes = [3, 5]
    with GlooWorld(2) as world:
        results = world.run(sync_on_cuda, sizes)
    x, _ = batch((8, 3, 4, 2))
    ref = nn.BatchNorm2d(3)
    assert_close(torch.cat([r[0] for r in results]), ref(x), **TOL)
    assert_close(results[0][1], results[1][1], atol=0, rtol=0)
