"""Converting between SyncBatchNorm classes keeps the layer's process group."""

import copy

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


def test_convert_sync_batchnorm_is_to_sync_bn_under_torchs_name(one_rank_world):
    # torch's habit, nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm1d(2))
    weight, running_mean = model[1].weight, model[1].running_mean
    twin = to_sync_bn(copy.deepcopy(model), one_rank_world)
    model = SyncBatchNorm.convert_sync_batchnorm(model, one_rank_world)
    assert [type(m) for m in model.modules()] == [type(m) for m in twin.modules()]
    assert type(model[1]) is SyncBatchNorm and model[1].process_group is one_rank_world
    assert model[1].weight is weight and model[1].running_mean is running_mean
    model = revert_batchnorm(model)
    assert [type(m) for m in model[1:]] == [nn.BatchNorm2d, nn.BatchNorm1d]
    assert model[1].weight is weight


def test_convert_sync_batchnorm_takes_to_sync_bns_keywords_and_converts_a_root_layer():
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2),
                                                               nn.BatchNorm1d(2)), exclude="1")
    assert [type(m) for m in model] == [SyncBatchNorm, nn.BatchNorm1d]
    layer = nn.BatchNorm1d(3)
    new = SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(new) is SyncBatchNorm and new.weight is layer.weight
    assert SyncBatchNorm.convert_sync_batchnorm.__doc__.count("to_sync_bn")
