"""SyncBatchNorm equals torch's BatchNorm over the concatenation of the ranks' batches.

Multi-process tests run in real gloo worlds of 2, 3 and 4 CPU processes (started once per module,
see tests/gloo_world.py); each test sends one scenario to every rank and compares what
the ranks return with torch.nn.BatchNorm run in this process over the concatenated batch.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from gloo_world import GlooWorld
from rethinkbn.convert import convert_batchnorm, revert_batchnorm
from rethinkbn.distributed import SyncBatchNorm, to_sync_bn
from rethinkbn.stats import Moments

TOL = {"atol": 1e-5, "rtol": 1e-5}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# ------------------------------------------------------------------------------ scenarios
def scenario(sizes, tail=(3,), **options):
    """A training run of SyncBatchNorm: rank r holds ``sizes[r]`` samples of shape ``tail``."""
    spec = {"sizes": list(sizes), "tail": tuple(tail), "steps": 2, "seed": 0,
            "dtype": torch.float32, "group_size": None, "offset": 1.0, "scale": 2.0,
            "affine": True, "momentum": 0.1, "track_running_stats": True}
    spec.update(options)
    return spec


def make_batch(spec, step):
    """The global batch of one step: input, upstream gradient (input dtype)."""
    g = torch.Generator().manual_seed(1000 * spec["seed"] + step)
    shape = (sum(spec["sizes"]), *spec["tail"])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spec["scale"] + spec["offset"]
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(spec["dtype"]), dy.to(spec["dtype"])


def make_layer(spec, cls, **kwargs):
    layer = cls(spec["tail"][0], momentum=spec["momentum"], affine=spec["affine"],
                track_running_stats=spec["track_running_stats"], **kwargs)
    if spec["affine"]:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=g))
    return layer


def local_slice(spec, rank):
    start = sum(spec["sizes"][:rank])
    return slice(start, start + spec["sizes"][rank])


def train_steps(layer, spec, rows):
    """Run the scenario's steps on the samples ``rows``; what a rank reports back."""
    steps = []
    for step in range(spec["steps"]):
        x, dy = make_batch(spec, step)
        x = x[rows].clone().requires_grad_()
        y = layer(x)
        y.backward(dy[rows])
        grads = {k: getattr(layer, k).grad.clone() for k in ("weight", "bias") if spec["affine"]}
        layer.zero_grad(set_to_none=True)
        steps.append({"y": y.detach(), "dx": x.grad, **grads})
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    return {"steps": steps, "buffers": buffers}


def run_sync_bn(spec):
    """On every rank: SyncBatchNorm over the rank's share of each step's batch."""
    layer = make_layer(spec, SyncBatchNorm, group_size=spec["group_size"])
    return train_steps(layer, spec, local_slice(spec, dist.get_rank()))


def reference(spec, ranks):
    """torch's BatchNorm over the concatenated batch of ``ranks`` (consecutive)."""
    rows = slice(local_slice(spec, ranks[0]).start, local_slice(spec, ranks[-1]).stop)
    layer = make_layer(spec, TORCH_BN[1 + len(spec["tail"])])
    return train_steps(layer, spec, rows)


def check_against_reference(spec, results):
    k = spec["group_size"] or len(spec["sizes"])
    for first in range(0, len(spec["sizes"]), k):
        ranks = list(range(first, first + k))
        ref = reference(spec, ranks)
        for step, expected in enumerate(ref["steps"]):
            got = [results[r]["steps"][step] for r in ranks]
            assert_close(torch.cat([g["y"] for g in got]), expected["y"], **TOL)
            assert_close(torch.cat([g["dx"] for g in got]), expected["dx"], **TOL)
            # Each rank returns its own share of the parameter gradients (DDP sums them).
            for key in ("weight", "bias") if spec["affine"] else ():
                assert_close(sum(g[key] for g in got), expected[key], **TOL)
        for r in ranks:
            for key, value in ref["buffers"].items():
                assert_close(results[r]["buffers"][key], value, **TOL)


# ------------------------------------------------------------------------------ worlds
@pytest.fixture(scope="module")
def world2():
    with GlooWorld(2) as world:
        yield world


@pytest.fixture(scope="module")
def world3():
    with GlooWorld(3) as world:
        yield world


@pytest.fixture(scope="module")
def world4():
    with GlooWorld(4) as world:
        yield world


# ------------------------------------------------------------------------------ equal batches
@pytest.mark.parametrize("tail", [(3,), (3, 5), (2, 3, 4), (2, 2, 3, 2)])
def test_two_ranks_equal_batches_match_torch_bn_for_every_input_rank(world2, tail):
    spec = scenario([4, 4], tail)
    check_against_reference(spec, world2.run(run_sync_bn, spec))


def test_four_ranks_equal_batches_match_torch_bn(world4):
    spec = scenario([3, 3, 3, 3], (4, 6))
    check_against_reference(spec, world4.run(run_sync_bn, spec))


@pytest.mark.parametrize(
    "options",
    [{"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["cumulative-momentum", "no-affine", "no-running-stats"],
)
def test_layer_options_match_torch_bn(world3, options):
    spec = scenario([2, 3, 4], (3, 4), steps=3, **options)
    check_against_reference(spec, world3.run(run_sync_bn, spec))


# ------------------------------------------------------------------------------ unequal batches
@settings(max_examples=8, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5), min_size=3, max_size=3).filter(lambda s: sum(s) >= 2),
    length=st.integers(1, 3),
)
def test_unequal_local_batches_match_torch_bn(world3, sizes, length):
    spec = scenario(sizes, (2, length))
    check_against_reference(spec, world3.run(run_sync_bn, spec))


def test_rank_with_empty_batch_gets_empty_output_and_zero_parameter_grads(world3):
    spec = scenario([3, 0, 4], (3, 5))
    results = world3.run(run_sync_bn, spec)
    check_against_reference(spec, results)
    empty = results[1]["steps"][0]
    assert empty["y"].shape == (0, 3, 5) and empty["dx"].shape == (0, 3, 5)
    assert torch.equal(empty["weight"], torch.zeros(3))
    assert torch.equal(empty["bias"], torch.zeros(3))


def test_too_few_values_in_the_group_raise_on_every_rank_naming_the_layer(world3):
    outcomes = world3.run_outcomes(run_sync_bn, scenario([1, 0, 0], (3,)))
    assert all("expected more than 1 value per channel" in o.error for o in outcomes)
    assert all("SyncBatchNorm" in o.error for o in outcomes)


# ------------------------------------------------------------------------------ groups
def test_group_size_two_of_four_ranks_normalizes_each_pair_alone(world4):
    spec = scenario([2, 3, 1, 4], (3, 4), group_size=2, offset=0.0)
    results = world4.run(run_sync_bn, spec)
    check_against_reference(spec, results)
    assert not torch.allclose(results[0]["buffers"]["running_mean"],
                              results[2]["buffers"]["running_mean"])


@settings(max_examples=5, deadline=None)
@given(sizes=st.lists(st.integers(0, 3), min_size=4, max_size=4).filter(
    lambda s: s[0] + s[1] > 0 and s[2] + s[3] > 0))
def test_group_size_two_of_four_ranks_with_any_local_batches(world4, sizes):
    spec = scenario(sizes, (2, 2), group_size=2)
    check_against_reference(spec, world4.run(run_sync_bn, spec))


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_float32_statistics(world2, dtype):
    spec = scenario([4, 6], (3, 5), dtype=dtype)
    results = world2.run(run_sync_bn, spec)
    ref = reference(spec, [0, 1])
    tol = {"atol": 2e-2, "rtol": 2e-2}
    y = torch.cat([r["steps"][0]["y"] for r in results])
    assert y.dtype == dtype and results[0]["buffers"]["running_var"].dtype == torch.float32
    assert_close(y.float(), ref["steps"][0]["y"].float(), **tol)
    dx = torch.cat([r["steps"][0]["dx"] for r in results])
    assert_close(dx.float(), ref["steps"][0]["dx"].float(), **tol)
    assert_close(results[0]["buffers"]["running_var"], ref["buffers"]["running_var"], **TOL)


def large_mean_scenario(steps=1):
    # float32 values near 1e4 with spread 1e-2: E[x^2] - E[x]^2 in float32 would be pure noise,
    # and a float32 mean (off by up to 5e-4) would already cost most of the spread's digits.
    return scenario([5, 7], (3, 8), offset=1e4, scale=1e-2, steps=steps, momentum=1.0)


def assert_last_step_variance_close(world, steps, rtol):
    spec = large_mean_scenario(steps)
    # momentum 1: the running variance is the last step's unbiased group variance.
    exact_var = make_batch(spec, steps - 1)[0].double().var((0, 2), unbiased=True)
    for r in world.run(run_sync_bn, spec):
        assert_close(r["buffers"]["running_var"].double(), exact_var, atol=0, rtol=rtol)


def test_large_mean_small_spread_gives_the_exact_variance_from_the_second_step(world2):
    assert_last_step_variance_close(world2, steps=2, rtol=1e-5)


def test_large_mean_small_spread_first_step_variance_is_within_float64_cancellation(world2):
    # With no shared shift yet, the float64 sums cancel by (mean / std)^2 = 1e12.
    assert_last_step_variance_close(world2, steps=1, rtol=1e-3)


def test_large_mean_small_spread_gives_exact_outputs_from_the_second_step(world2):
    spec = large_mean_scenario(steps=2)
    results = world2.run(run_sync_bn, spec)
    x64 = make_batch(spec, 1)[0].double()
    mean, var = x64.mean((0, 2), keepdim=True), x64.var((0, 2), unbiased=False, keepdim=True)
    g = torch.Generator().manual_seed(7)
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    exact = (x64 - mean) / (var + 1e-5).sqrt() * weight[:, None] + bias[:, None]
    ours = torch.cat([r["steps"][1]["y"] for r in results]).double()
    # torch's float32 BatchNorm is off by about 5e-2 here (its float32 mean).
    assert (ours - exact).abs().max() < 1e-5


# ------------------------------------------------------------------------------ no collectives
def run_eval_on_rank0_only(spec):
    """Only rank 0 calls the layer: any collective would leave it waiting until the timeout."""
    layer = make_layer(spec, SyncBatchNorm)
    with torch.no_grad():
        layer.running_mean.uniform_()
        layer.running_var.uniform_(0.5, 2)
    layer.eval()
    if dist.get_rank() != 0:
        return None
    x, _ = make_batch(spec, 0)
    return {"y": layer(x), "state": layer.state_dict()}


def test_eval_mode_makes_no_collective_and_equals_torch_bn(world2):
    spec = scenario([4, 4], (3, 5))
    # A collective on rank 0 alone would fail with the world's timeout error; run() raises it.
    got = world2.run(run_eval_on_rank0_only, spec)[0]
    torch_bn = TORCH_BN[3](3).eval()
    torch_bn.load_state_dict(got["state"])
    assert_close(got["y"], torch_bn(make_batch(spec, 0)[0]), atol=0, rtol=0)


def run_groups_of_one_on_rank0_only(spec):
    """Groups of one rank: only rank 0 trains, so any collective would wait for the timeout."""
    layer = make_layer(spec, SyncBatchNorm, group_size=1)  # creating the groups is collective
    if dist.get_rank() != 0:
        return None
    return train_steps(layer, spec, slice(0, spec["sizes"][0]))


def test_group_of_one_rank_makes_no_collective_and_equals_torch_bn(world2):
    spec = scenario([6], (3, 4))
    # A collective on rank 0 alone would fail with the world's timeout error; run() raises it.
    ours = world2.run(run_groups_of_one_on_rank0_only, spec)[0]
    check_against_reference(spec, [ours])


def test_no_process_group_equals_torch_bn_training():
    spec = scenario([8], (3, 4, 5), steps=2)
    ours = train_steps(make_layer(spec, SyncBatchNorm), spec, slice(0, 8))
    ref = reference(spec, [0])
    for got, expected in zip(ours["steps"], ref["steps"], strict=True):
        for key in expected:
            assert_close(got[key], expected[key], **TOL)
    for key, value in ref["buffers"].items():
        assert_close(ours["buffers"][key], value, **TOL)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 6),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    momentum=st.sampled_from([0.1, 0.5, None]),
)
def test_single_process_matches_torch_bn_for_any_shape(n, spatial, momentum):
    spec = scenario([n], (2, *spatial), momentum=momentum, seed=n)
    ours = train_steps(make_layer(spec, SyncBatchNorm), spec, slice(0, n))
    ref = reference(spec, [0])
    for key in ref["steps"][1]:
        assert_close(ours["steps"][1][key], ref["steps"][1][key], **TOL)
    assert_close(ours["buffers"]["running_var"], ref["buffers"]["running_var"], **TOL)


def test_backward_passes_gradcheck_and_gradgradcheck_for_input_weight_and_bias():
    # gradgradcheck: the create_graph backward rebuilds the statistics as functions of x.
    layer = SyncBatchNorm(3, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def normalize(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(normalize, (x, w, b))
    assert torch.autograd.gradgradcheck(normalize, (x, w, b))


# ------------------------------------------------------------------------------ errors
def test_bad_input_names_the_layer_and_the_expected_channels():
    layer = SyncBatchNorm(3)
    layer._rethinkbn_name = "head.bn"
    with pytest.raises(ValueError, match=r"'head.bn'.*expected 3 channels.*got 4"):
        layer(torch.randn(2, 4))


def test_process_group_and_group_size_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        SyncBatchNorm(3, process_group=object(), group_size=2)  # type: ignore[arg-type]



@pytest.mark.parametrize("group_size", [0, -2, 1.5, True])
def test_group_size_must_be_a_positive_int(group_size):
    error = ValueError if type(group_size) is int else TypeError  # a bool is not a count
    with pytest.raises(error, match=rf"group_size must be a positive int or None, "
                                    rf"got {group_size!r}"):
        SyncBatchNorm(3, group_size=group_size)

def rank1_raises_mid_step(spec):
    layer = make_layer(spec, SyncBatchNorm)
    x, _ = make_batch(spec, 0)
    if dist.get_rank() == 1:
        try:
            raise RuntimeError("rank 1 failed mid-step")
        finally:
            time.sleep(6)  # stay alive: rank 0 must time out, not see a closed connection
    layer(x[local_slice(spec, 0)])


def test_a_rank_that_raises_mid_step_makes_the_others_time_out_with_a_clear_error():
    spec = scenario([4, 4], (3,))
    with GlooWorld(2, timeout_s=2) as world:
        rank0, rank1 = world.run_outcomes(rank1_raises_mid_step, spec)
    assert "rank 1 failed mid-step" in rank1.error
    assert "SyncBatchNorm(3" in rank0.error
    assert "batch-moments all_reduce over 2 ranks failed" in rank0.error
    assert "Timed out" in rank0.error


# ------------------------------------------------------------------------------ observer
def run_observed(spec):
    layer = make_layer(spec, SyncBatchNorm)
    seen = []
    layer.observer = lambda _layer, moments: seen.append(moments)
    x, _ = make_batch(spec, 0)
    layer(x[local_slice(spec, dist.get_rank())])
    return seen


def test_observer_receives_the_moments_of_this_ranks_values(world2):
    # precise_bn merges what every rank observed in its own collective: reporting the group's
    # moments here would count every value once per rank.
    spec = scenario([3, 5], (3, 4))
    seen = world2.run(run_observed, spec)
    x, _ = make_batch(spec, 0)
    for rank, moments in enumerate(seen):
        (m,) = moments
        expected = Moments.of(x[local_slice(spec, rank)].double())
        assert_close(m.mean, expected.mean, atol=0, rtol=1e-6)
        assert_close(m.m2, expected.m2, atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------ conversion
def test_conversion_to_sync_bn_and_back_keeps_parameters_and_torch_classes():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Conv2d(3, 3, 1),
                          nn.BatchNorm2d(3), nn.SyncBatchNorm(3, momentum=None))
    params = [p for p in model.parameters()]
    to_sync_bn(model)
    assert [type(m) for m in model if isinstance(m, SyncBatchNorm)] == [SyncBatchNorm] * 3
    assert model[4].momentum is None
    revert_batchnorm(model)
    assert [type(m) for m in model][1::2] == [nn.BatchNorm1d, nn.BatchNorm2d]
    assert type(model[4]) is nn.SyncBatchNorm
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


def test_conversion_by_kind_name_passes_group_size():
    model = convert_batchnorm(nn.Sequential(nn.BatchNorm3d(2)), "sync", group_size=2)
    assert isinstance(model[0], SyncBatchNorm) and model[0].group_size == 2
    assert math.isclose(model[0].eps, 1e-5)


# ------------------------------------------------------------------------------ precise_bn
PRECISE_SIZES = [[4, 3, 5], [2, 6, 3]]  # rank r's batch sizes, step by step


def precise_model(bn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 3, 3), bn(3), nn.ReLU(), nn.Conv1d(3, 3, 1), bn(3))


def precise_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 2, 7, generator=g) * 3 + 1 for n in PRECISE_SIZES[rank]]


def run_precise_bn():
    from rethinkbn.population import precise_bn

    model = precise_model(SyncBatchNorm)
    precise_bn(model, precise_batches(dist.get_rank()), num_samples=None, num_batches=3)
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def test_precise_bn_gives_every_rank_the_statistics_of_all_ranks_batches(world2):
    from rethinkbn.population import precise_bn

    results = world2.run(run_precise_bn)
    # In the pass every rank normalizes its own batches (no sync), then the moments are merged:
    # the same as one process going through every rank's batches.
    reference = precise_model(nn.BatchNorm1d)
    batches = precise_batches(0) + precise_batches(1)
    precise_bn(reference, batches, num_samples=None, num_batches=len(batches))
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value)
        assert_close(value, reference.state_dict()[key], **TOL)


def run_after_a_nan_batch(spec):
    layer = make_layer(spec, SyncBatchNorm)
    rows = local_slice(spec, dist.get_rank())
    x, _ = make_batch(spec, 0)
    layer(torch.full_like(x[rows], float("nan")))
    layer.reset_running_stats()
    return layer(x[rows]).detach()


def test_a_non_finite_batch_does_not_poison_the_following_steps(world2):
    spec = scenario([3, 5], (3, 4), momentum=None)
    y = torch.cat(world2.run(run_after_a_nan_batch, spec))
    reference_bn = make_layer(spec, nn.BatchNorm1d)
    assert_close(y, reference_bn(make_batch(spec, 0)[0]), **TOL)
