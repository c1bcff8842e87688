"""precise_bn across 2 real gloo processes: one reduction, identical statistics on every rank."""

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rethinkbn.distributed import SyncBatchNorm
from rethinkbn.population import precise_bn
from rethinkbn.population._state import batchnorm_layers

WORLD = 2
TIMEOUT_S = 120
# Unequal shards and batch sizes, so that weighting by element count matters.
SHARDS = {0: [6, 4, 7], 1: [3, 9]}
NORMS = {"torch": nn.BatchNorm2d, "sync": nn.SyncBatchNorm, "rethinkbn-sync": SyncBatchNorm}


def make_model(norm="torch"):
    torch.manual_seed(0)
    bn2d = NORMS[norm]
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bn2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5),
        nn.BatchNorm1d(5),
    )


def shard(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(n, 2, 4, 4, generator=g) * (1 + rank) + rank for n in SHARDS[rank]]


def large_mean_shard(rank):
    # A mean 1e6 times the spread: summing m2 + n * mean^2 across ranks would cancel to ~1e-4.
    g = torch.Generator().manual_seed(200 + rank)
    return [1e5 + 0.1 * torch.randn(n, 3, 8, generator=g, dtype=torch.float64)
            for n in SHARDS[rank]]


def large_mean_model():
    return nn.Sequential(nn.BatchNorm1d(3)).double()


def buffers(model):
    return {f"{name}.{key}": getattr(bn, key).clone() for name, bn in batchnorm_layers(model)
            for key in ("running_mean", "running_var")}


def worker(rank, port, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        data = shard(rank)
        for norm in ("torch", "sync", "rethinkbn-sync"):
            model = make_model(norm).eval()
            report = precise_bn(model, data, num_batches=len(data))
            results[norm] = buffers(model)
            results[f"{norm}-samples"] = (report.num_samples, report.num_batches,
                                          {k: v.samples for k, v in report.layers.items()})

        model = large_mean_model()
        precise_bn(model, large_mean_shard(rank), num_batches=len(SHARDS[rank]))
        results["large_mean"] = buffers(model)

        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        precise_bn(ddp, data, num_batches=len(data))
        results["ddp"] = buffers(model)
        ddp.train()(data[0]).sum().backward()  # DDP still trains after the pass

        model = make_model()
        before = buffers(model)
        try:
            precise_bn(model, data if rank == 0 else [], num_batches=2)
        except ValueError as err:
            results["empty_error"] = str(err)
        results["empty_unchanged"] = all(torch.equal(v, buffers(model)[k])
                                         for k, v in before.items())
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("precise_dist")
    ctx = mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} gloo processes did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def one_process_over_the_union():
    model = make_model().eval()
    data = shard(0) + shard(1)
    precise_bn(model, data, num_batches=len(data))
    return buffers(model)


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", ["torch", "sync", "rethinkbn-sync", "ddp"])
def test_every_rank_installs_bit_identical_statistics(ranks, case):
    assert_bit_identical(ranks[0][case], ranks[1][case])


@pytest.mark.parametrize("case", ["torch", "sync", "rethinkbn-sync", "ddp"])
def test_the_statistics_are_those_of_one_process_over_the_union(ranks, case):
    union = one_process_over_the_union()
    for k, v in union.items():
        torch.testing.assert_close(ranks[0][case][k], v, rtol=1e-6, atol=1e-6)


def test_an_empty_loader_on_one_rank_makes_every_rank_raise_and_change_nothing(ranks):
    assert "no batches" in ranks[1]["empty_error"]
    assert "other rank" in ranks[0]["empty_error"]
    assert ranks[0]["empty_unchanged"] and ranks[1]["empty_unchanged"]


def test_a_large_mean_merges_across_ranks_without_cancellation(ranks):
    model = large_mean_model()
    data = large_mean_shard(0) + large_mean_shard(1)
    precise_bn(model, data, num_batches=len(data))
    expected = buffers(model)
    for rank_buffers in ranks:
        for key, value in expected.items():
            torch.testing.assert_close(rank_buffers["large_mean"][key], value, rtol=1e-9, atol=0)
    assert_bit_identical(ranks[0]["large_mean"], ranks[1]["large_mean"])


def test_the_report_counts_the_samples_of_every_rank(ranks):
    union = sum(SHARDS.values(), [])
    expected = (sum(union), len(union), {"1": sum(union), "5": sum(union)})
    for rank_results in ranks:
        for norm in ("torch", "sync", "rethinkbn-sync"):
            assert rank_results[f"{norm}-samples"] == expected
