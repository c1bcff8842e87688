"""batch_stats_inference: BatchNorm uses the evaluated batch's statistics, nothing else changes."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.layers import DomainBatchNorm, GhostBatchNorm
from rethinkbn.population import batch_stats_inference


def cnn(bn=nn.BatchNorm2d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn(3), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(3, 3, 3), bn(3))
    for m in model.modules():
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def batch_stats_reference(model, x):
    """A copy with BatchNorm in training mode (momentum irrelevant) and everything else in eval."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, (nn.BatchNorm2d, GhostBatchNorm)):
            m.train()
    with torch.no_grad():
        return ref(x)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, getattr(m, "track_running_stats", None),
              len(m._forward_hooks)) for m in model.modules()])


def assert_unchanged(before, model):
    state, flags = snapshot(model)
    assert flags == before[1]
    for k, v in state.items():
        assert torch.equal(v, before[0][k]), k


def test_batchnorm_normalizes_with_the_batch_statistics_and_dropout_is_off():
    model, x = cnn(), torch.randn(6, 2, 5, 5)
    with torch.no_grad(), batch_stats_inference(model):
        out = model(x)
    torch.testing.assert_close(out, batch_stats_reference(model, x))


def test_running_buffers_and_flags_are_untouched_and_restored():
    model = cnn().train()
    before = snapshot(model)
    with torch.no_grad(), batch_stats_inference(model):
        model(torch.randn(6, 2, 5, 5))
        assert not model[3].training
    assert_unchanged(before, model)


def test_flags_are_restored_when_the_block_raises():
    model = cnn()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), batch_stats_inference(model, 2):
        raise RuntimeError("boom")
    assert_unchanged(before, model)


@settings(max_examples=8, deadline=None)
@given(groups=st.integers(1, 4), nbs=st.integers(2, 4), remainder=st.integers(0, 1))
def test_groups_of_norm_batch_size_equal_a_loop_over_groups(groups, nbs, remainder):
    # every op but BatchNorm is per-sample, so each group can be evaluated on its own
    model = cnn()
    x = torch.randn(groups * nbs + remainder * (nbs - 1), 2, 5, 5)
    with torch.no_grad(), batch_stats_inference(model, norm_batch_size=nbs):
        out = model(x)
    expected = torch.cat([batch_stats_reference(model, chunk)
                          for chunk in x.split(ghost_groups(len(x), nbs))])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def ghost_groups(n, nbs):
    """GhostBatchNorm's documented groups: a single left-over sample joins the last group."""
    sizes = [nbs] * (n // nbs) + ([n % nbs] if n % nbs else [])
    if sizes[-1] == 1 and len(sizes) > 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def test_ghost_batchnorm_groups_with_the_given_size_and_gets_its_own_back():
    model = cnn(lambda c: GhostBatchNorm(c, norm_batch_size=8))
    x = torch.randn(6, 2, 5, 5)
    with torch.no_grad(), batch_stats_inference(model, norm_batch_size=3):
        assert model[1].norm_batch_size == 3
        out = model(x)
    assert model[1].norm_batch_size == 8
    expected = torch.cat([batch_stats_reference(model, chunk) for chunk in x.split(3)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_layer_that_cannot_group_is_named_and_nothing_changes():
    model = nn.Sequential(nn.Linear(3, 3), DomainBatchNorm(3, num_domains=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '1' \(DomainBatchNorm\) cannot normalize in "
                                         r"groups of norm_batch_size=2"):
        with batch_stats_inference(model, norm_batch_size=2):
            pass
    assert_unchanged(before, model)


def test_a_bad_norm_batch_size_is_rejected():
    with pytest.raises(ValueError, match="got 0"), batch_stats_inference(cnn(), 0):
        pass


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, GhostBatchNorm])
def test_a_group_with_one_value_per_channel_is_a_named_error(bn):
    model = nn.Sequential(nn.Linear(2, 3), bn(3)).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'1' \(.*more than 1 value per channel.*got 1"):
        with torch.no_grad(), batch_stats_inference(model, norm_batch_size=1):
            model(torch.randn(4, 2))
    assert_unchanged(before, model)


def test_a_norm_batch_size_that_is_not_an_int_is_a_type_error():
    model = cnn()
    before = snapshot(model)
    with pytest.raises(TypeError, match="batch_stats_inference: norm_batch_size .*got 2.5"):
        with batch_stats_inference(model, 2.5):
            pass
    assert_unchanged(before, model)


def _sync_layer_on_each_rank_alone(kind):
    """On every rank: a SyncBatchNorm under batch_stats_inference, batches of different sizes."""
    import torch.distributed as dist

    from rethinkbn.distributed import SyncBatchNorm

    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = (nn.SyncBatchNorm if kind == "torch" else SyncBatchNorm)(3).eval()
    x = torch.randn(2 + rank, 3, 4, generator=torch.Generator().manual_seed(rank)) * 2 + rank
    before = snapshot(layer)
    with torch.no_grad(), batch_stats_inference(layer):
        y = layer(x)
    alone = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    assert_unchanged(before, layer)
    return torch.allclose(y, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["torch", "rethinkbn"])
def test_a_sync_batchnorm_normalizes_each_ranks_batch_alone(kind):
    from gloo_world import GlooWorld

    with GlooWorld(2) as world:
        assert world.run(_sync_layer_on_each_rank_alone, kind) == [True, True]
