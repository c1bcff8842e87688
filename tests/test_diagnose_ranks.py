"""`diagnose` under 2 real gloo ranks whose batches differ: the ranks skip a batch too small for
training behaviour together (SyncBatchNorm's and a ShuffledModule's collectives stay matched),
and a regression fails within the process group's timeout instead of hanging."""

import pytest
import torch
from torch import nn

from gloo_world import GlooWorld
from test_diagnose import accuracy, assert_same, batches, make_data, model_state


def sync_model():
    from rethinkbn import SyncBatchNorm

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), SyncBatchNorm(4), nn.ReLU(),
                         nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 4)).eval()


def rank_data(sizes, drop=None):
    """This rank's batches: ``sizes[rank]`` lists the batch sizes; the batch at index ``drop``
    is left out (every other batch holds the same samples as without ``drop``)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    x, y = make_data(sum(sizes[rank]), 20 + rank)
    out, start = [], 0
    for n in sizes[rank]:
        out.append((x[start:start + n], y[start:start + n]))
        start += n
    return [b for i, b in enumerate(out) if i != drop]


def diagnose_with_sizes(sizes, wrap_shuffle, drop=None):
    from rethinkbn import ShuffledModule, diagnose

    model = sync_model()
    if wrap_shuffle:
        model = ShuffledModule(model).train()
    data = rank_data(sizes, drop)
    before = model_state(model)
    d = diagnose(model, data, metric=accuracy, num_samples=64, progress=False)
    assert_same(before, model_state(model))
    return d.to_dict()


def diagnose_all_small():
    from rethinkbn import diagnose

    data = [(x[:1], y[:1]) for x, y in batches(*make_data(64, 3), 16)]
    try:
        diagnose(sync_model(), data, num_samples=4, progress=False)
    except ValueError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def world():
    with GlooWorld(2, timeout_s=20, run_timeout_s=120) as w:
        yield w


@pytest.mark.parametrize("wrap_shuffle", [False, True])
def test_a_one_sample_batch_on_one_rank_is_skipped_by_every_rank(world, wrap_shuffle):
    # the comparisons read from the start again: rank 1's one-sample batch (its second) meets
    # rank 0's full one; both leave that step out
    sizes = [[16] * 8, [16, 1, 16, 16, 16, 16, 16, 16]]
    rank0, rank1 = world.run(diagnose_with_sizes, sizes, wrap_shuffle)
    assert rank0 == rank1
    sync = rank0["layers"]["inner.1" if wrap_shuffle else "1"]
    assert sync["norm_batch_size"] == 32 and sync["train_test_gap"] is not None


def test_ranks_with_different_batch_sizes_stop_together(world):
    # rank 0 reaches the comparisons' 32 samples in 2 batches, rank 1 in 4: both run 4 steps
    sizes = [[16] * 8, [8] * 16]
    rank0, rank1 = world.run(diagnose_with_sizes, sizes, False)
    assert rank0 == rank1 and rank0["layers"]["1"]["train_test_gap"] is not None


def test_only_too_small_batches_fail_on_every_rank(world):
    errors = world.run(diagnose_all_small)
    assert all(e is not None and "fewer than 2 samples" in e for e in errors), errors


def rank_planted(rank, rho):
    """Rank ``rank``'s batches of planted per-sample offsets (3 channels, 8 values a sample)."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 64 + 32 * rank  # the ranks hold different amounts
    a = torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
    e = torch.randn(n, 3, 8, generator=g, dtype=torch.float64)
    return list((rho ** 0.5 * a + (1 - rho) ** 0.5 * e).float().split(16))


def diagnose_planted(rho):
    import torch.distributed as dist

    from rethinkbn import GhostBatchNorm, diagnose

    model = nn.Sequential(GhostBatchNorm(3, norm_batch_size=2)).eval()
    # a budget past every rank's data: the comparisons read until the shortest rank's data ends
    d = diagnose(model, rank_planted(dist.get_rank(), rho), num_samples=1024, progress=False)
    return d.to_dict()


@pytest.mark.parametrize("size", [2, 3])
def test_the_between_sample_share_is_the_union_of_the_ranks(size):
    from rethinkbn.population import between_sample_share

    with GlooWorld(size, timeout_s=20, run_timeout_s=120) as w:
        dicts = w.run(diagnose_planted, 0.6)
    assert all(d == dicts[0] for d in dicts)
    # the ranks stop together when the first one's data ends: each ran that many batches
    steps = min(len(rank_planted(r, 0.6)) for r in range(size))
    union = torch.cat([x for r in range(size) for x in rank_planted(r, 0.6)[:steps]])
    want = float(between_sample_share(union).mean())
    assert dicts[0]["layers"]["0"]["between_share"] == pytest.approx(want, rel=1e-6)
    assert dicts[0]["layers"]["0"]["variance_ratio"] == pytest.approx(1 - want / 2, rel=1e-6)
