"""Converting between SyncBatchNorm classes keeps the layer's process group."""

import pytest
import torch.distributed as dist
from torch import nn

from rethinkbn import SyncBatchNorm, to_sync_bn
from rethinkbn.convert import convert_batchnorm, revert_batchnorm


@pytest.fixture
def one_rank_world():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def test_torch_sync_batchnorm_hands_its_process_group_to_ours_and_back(one_rank_world):
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=one_rank_world))
    model = to_sync_bn(model)
    assert type(model[0]) is SyncBatchNorm and model[0].process_group is one_rank_world
    model = revert_batchnorm(model)
    assert type(model[0]) is nn.SyncBatchNorm and model[0].process_group is one_rank_world


def test_an_explicit_group_wins_over_the_carried_one(one_rank_world):
    other = dist.new_group([0])
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=one_rank_world))
    model = convert_batchnorm(model, "sync", process_group=other)
    assert model[0].process_group is other


def test_a_target_that_does_not_sync_gets_no_group(one_rank_world):
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=one_rank_world))
    model = convert_batchnorm(model, nn.BatchNorm1d)
    assert type(model[0]) is nn.BatchNorm1d
