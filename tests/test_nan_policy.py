"""The family's NaN policy, and no host-device synchronization in a training step.

Policy (README "Reliability: exact, or a clear error"): a non-finite batch statistic never
reaches the running buffers. Per channel (and per domain row) the buffers keep their old
values where the step's mean or variance is not finite, the event is counted on the device
(``nonfinite_count``), and the output is torch's (NaN in, NaN out). ``nonfinite="raise"``
raises instead, naming the layer and the channels, before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gloo_world import GlooWorld
from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.distributed.virtual import PerDeviceBatchNorm
from rethinkbn.layers import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    nonfinite_report,
    set_nonfinite,
    use_domain,
)

IDS = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
BAD_SAMPLE, BAD_CHANNEL = 3, 1  # sample 3 is in domain 2

LAYERS = {
    "ghost whole": (lambda: GhostBatchNorm(3), {}),
    "ghost equal contiguous": (lambda: GhostBatchNorm(3, 2), {}),
    "ghost equal strided": (lambda: GhostBatchNorm(3, 2, grouping="strided"), {}),
    "ghost unequal": (lambda: GhostBatchNorm(3, 3), {}),
    "per-device": (lambda: PerDeviceBatchNorm(3, num_devices=2), {}),
    "domain int, shared stats": (
        lambda: DomainBatchNorm(3, 3, population_stats="shared"), {"domain": 1}),
    "domain int, per-domain stats": (lambda: DomainBatchNorm(3, 3), {"domain": 2}),
    "domain ids": (lambda: DomainBatchNorm(3, 3), {"domain": IDS}),
    "domain ids, shared train stats": (
        lambda: DomainBatchNorm(3, 3, train_stats="shared"), {"domain": IDS}),
    "sync, no process group": (lambda: SyncBatchNorm(3), {}),
}


def batch(nan: bool = True) -> torch.Tensor:
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1
    if nan:
        x[BAD_SAMPLE, BAD_CHANNEL, 0] = float("nan")
    return x


def bad_cells(layer: nn.Module, kwargs: dict) -> torch.Tensor:
    """Where the NaN lands in the running buffers."""
    mask = torch.zeros_like(layer.running_mean, dtype=torch.bool)
    if mask.dim() == 1:
        mask[BAD_CHANNEL] = True
    else:
        domain = kwargs["domain"]
        mask[int(domain) if isinstance(domain, int) else int(IDS[BAD_SAMPLE]), BAD_CHANNEL] = True
    return mask


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_nan_leaves_its_channel_s_buffers_unchanged_and_is_counted(name):
    make, kwargs = LAYERS[name]
    layer, clean = make(), make()
    layer._rethinkbn_name = "head.bn"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(batch(), **kwargs)
    clean(batch(nan=False), **kwargs)
    bad = bad_cells(layer, kwargs)
    for key in ("running_mean", "running_var"):
        value = getattr(layer, key)
        assert torch.isfinite(value).all()
        assert torch.equal(value[bad], before[key][bad])
        assert torch.equal(value[~bad], getattr(clean, key)[~bad])
    assert torch.equal(layer.num_batches_tracked, clean.num_batches_tracked)
    assert torch.equal(layer.nonfinite_count, bad.long())
    assert torch.isnan(y[BAD_SAMPLE, BAD_CHANNEL]).all()
    assert "nonfinite_count" not in layer.state_dict()
    report = nonfinite_report(layer)
    assert list(report) == ["head.bn"] and torch.equal(report["head.bn"], bad.long())


@pytest.mark.parametrize("name", list(LAYERS))
def test_strict_mode_raises_naming_the_layer_and_the_channel_and_changes_nothing(name):
    make, kwargs = LAYERS[name]
    layer = make()
    layer._rethinkbn_name = "head.bn"
    assert set_nonfinite(layer, "raise") == 1
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"'head.bn'.*NaN or Inf in .*1\)?\]") as info:
        layer(batch(), **kwargs)
    assert "nonfinite='raise'" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert not layer.nonfinite_count.any()
    layer(batch(nan=False), **kwargs)  # a finite batch goes through


def test_an_inf_counts_like_a_nan():
    layer = GhostBatchNorm(3, 2)
    x = batch(nan=False)
    x[0, 2, 1] = float("inf")
    layer(x)
    assert layer.nonfinite_count.tolist() == [0, 0, 1]


def test_frozen_bn_never_writes_its_buffers_and_passes_nan_through_like_torch():
    layer, bn = FrozenBatchNorm(3).train(), nn.BatchNorm1d(3).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(batch()), bn(batch()), equal_nan=True)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_the_output_is_torch_s_for_a_nan_input():
    layer, bn = GhostBatchNorm(3), nn.BatchNorm1d(3)
    torch.testing.assert_close(layer(batch()), bn(batch()), equal_nan=True)


def test_nonfinite_report_names_the_layers_with_events_and_resets():
    model = nn.Sequential(GhostBatchNorm(3, 2), nn.Identity(), DomainBatchNorm(3, 3))
    assert nonfinite_report(model) == {}
    model[0](batch())
    with use_domain(model, IDS):
        model[2](batch())
    report = nonfinite_report(model, reset=True)
    assert list(report) == ["0", "2"]
    assert report["0"].tolist() == [0, 1, 0]
    assert report["2"].shape == (3, 3) and report["2"][2, 1] == 1 and report["2"].sum() == 1
    assert nonfinite_report(model) == {}


def test_set_nonfinite_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match=r"policy must be one of \('skip', 'raise'\), got 'warn'"):
        set_nonfinite(GhostBatchNorm(3), "warn")


def test_the_counter_follows_the_layer_to_another_dtype_and_device():
    layer = DomainBatchNorm(3, 3).to(torch.float64)
    assert layer.nonfinite_count.shape == (3, 3) and layer.nonfinite_count.dtype == torch.long


# ------------------------------------------------------------------------------ two gloo ranks
@pytest.fixture(scope="module")
def world2():
    with GlooWorld(2) as world:
        yield world


def sync_step_with_nan_on_rank_1(strict: bool):
    layer = SyncBatchNorm(3)
    layer._rethinkbn_name = "head.bn"
    if strict:
        set_nonfinite(layer, "raise")
    rows = slice(0, 4) if dist.get_rank() == 1 else slice(4, 8)  # sample 3 is on rank 1
    x = batch()[rows]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer(x)
    except ValueError as exc:
        return {"error": str(exc), "unchanged": all(
            torch.equal(before[k], v) for k, v in layer.state_dict().items())}
    clean = SyncBatchNorm(3)
    clean(batch(nan=False)[rows])
    return {"buffers": {k: v.clone() for k, v in layer.named_buffers()},
            "clean": {k: v.clone() for k, v in clean.named_buffers()}}


def test_sync_bn_with_a_nan_on_one_rank_keeps_every_rank_s_buffers(world2):
    # Regression (issue 9 item 2): a NaN on one rank poisoned running_mean on every rank.
    for result in world2.run(sync_step_with_nan_on_rank_1, False):
        buffers, clean = result["buffers"], result["clean"]
        for key in ("running_mean", "running_var"):
            assert torch.isfinite(buffers[key]).all()
            assert buffers[key][BAD_CHANNEL] == (0.0 if key == "running_mean" else 1.0)
            keep = torch.arange(3) != BAD_CHANNEL
            assert torch.equal(buffers[key][keep], clean[key][keep])
        assert buffers["nonfinite_count"].tolist() == [0, 1, 0]


def test_sync_bn_strict_mode_raises_on_every_rank(world2):
    for result in world2.run(sync_step_with_nan_on_rank_1, True):
        assert "'head.bn'" in result["error"] and "channel(s) [1]" in result["error"]
        assert result["unchanged"]


# ------------------------------------------------------------------------------ no host sync
SYNC_OPS = {
    torch.ops.aten._local_scalar_dense,  # .item(), bool(), int(), float(), .tolist()
    torch.ops.aten.nonzero,
    torch.ops.aten.bincount,
    torch.ops.aten.unique_dim,
    torch.ops.aten.unique_consecutive,
    torch.ops.aten._unique2,
    torch.ops.aten.masked_select,
    torch.ops.aten.lift_fresh,  # torch.tensor(data): a host-to-device copy on a GPU
}


class ForbidHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor's values on the host (a sync on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS or (
            func.overloadpacket is torch.ops.aten.repeat_interleave
            and (kwargs or {}).get("output_size") is None
        ):
            raise AssertionError(f"host-device synchronization: {func}")
        return func(*args, **(kwargs or {}))


NO_SYNC = {
    **{k: v for k, v in LAYERS.items() if not k.startswith("sync")},
    "domain ids, validate=False": (lambda: DomainBatchNorm(3, 3, validate=False),
                                   {"domain": IDS}),
    "frozen": (lambda: FrozenBatchNorm(3), {}),
    "ghost momentum=None": (lambda: GhostBatchNorm(3, 2, momentum=None), {}),
}
NO_SYNC = {k: v for k, v in NO_SYNC.items() if k not in ("domain ids",
                                                          "domain ids, shared train stats")}


@pytest.mark.parametrize("name", list(NO_SYNC))
def test_a_training_step_reads_nothing_back_to_the_host(name):
    make, kwargs = NO_SYNC[name]
    layer = make()
    x = batch().requires_grad_()
    with ForbidHostSync():
        layer(x, **kwargs).nansum().backward()
    assert x.grad is not None


def test_the_sync_detector_catches_item():
    with pytest.raises(AssertionError, match="host-device synchronization"), ForbidHostSync():
        torch.ones(2).sum().item()


COMPILED = {
    "ghost whole": (lambda: GhostBatchNorm(3), {}),
    "ghost equal contiguous": (lambda: GhostBatchNorm(3, 2), {}),
    "ghost equal strided": (lambda: GhostBatchNorm(3, 2, grouping="strided"), {}),
    "frozen": (lambda: FrozenBatchNorm(3), {}),
    "domain=int": (lambda: DomainBatchNorm(3, 3), {"domain": 2}),
    "domain ids, validate=False": (lambda: DomainBatchNorm(3, 3, validate=False),
                                   {"domain": IDS}),
}


@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_fullgraph_has_no_graph_break_and_matches_eager(name):
    make, kwargs = COMPILED[name]
    eager = make()
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        xs = [batch(nan=False).requires_grad_() for _ in range(2)]
        ys = [eager(xs[0], **kwargs), step(xs[1], **kwargs)]
        for y in ys:
            (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        torch.testing.assert_close(ys[1], ys[0])
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
    torch.testing.assert_close(dict(compiled.named_buffers()), dict(eager.named_buffers()))


def test_torch_compile_fullgraph_with_use_domain():
    layer = DomainBatchNorm(3, 3)
    step = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with use_domain(layer, 1):
        y = step(batch(nan=False))
    torch.testing.assert_close(y, DomainBatchNorm(3, 3)(batch(nan=False), domain=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(NO_SYNC))
def test_a_cuda_training_step_makes_no_host_sync(name):
    make, kwargs = NO_SYNC[name]
    layer = make().cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    x = batch().cuda().requires_grad_()
    layer(x, **kwargs)  # first call: lazy CUDA initialization may synchronize
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x, **kwargs).nansum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["ghost equal contiguous", "domain ids"])
def test_a_failing_precise_bn_pass_leaves_the_nonfinite_counters_as_they_were(name):
    # precise_bn raises on non-finite statistics and promises the model unchanged: the pass's own
    # NaN batch must not show up in nonfinite_report as a training event.
    from rethinkbn import precise_bn

    make, kwargs = LAYERS[name]
    layer = make()
    layer(batch(), **kwargs)  # one event from training
    before = layer.nonfinite_count.clone()

    def forward(model, x):
        return model(x, **kwargs)

    with pytest.raises(ValueError, match="non-finite"):
        precise_bn(layer, [batch()], num_batches=1, forward=forward, progress=False)
    assert torch.equal(layer.nonfinite_count, before)
