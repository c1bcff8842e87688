"""The package's exception rule, case by case across its modules.

TypeError for a wrong type (``bool``, ``float`` and ``str`` are not ints), ValueError for a wrong
value (out of range, NaN/Inf statistics, a snapshot that does not match the model),
FileNotFoundError for a missing file; an old keyword of the 0.1 API fails as Python fails on any
unknown keyword (TypeError).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rethinkbn
from rethinkbn import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    Moments,
    PreciseBNOptions,
    ShuffledModule,
    StatsBank,
    SyncBatchNorm,
    revert_batchnorm,
    to_domain_bn,
    to_ghost_bn,
    virtual_devices,
)
from rethinkbn.distributed import PerDeviceBatchNorm, ShufflePlan, consecutive_group
from rethinkbn.population import FreezeBNHook, PreciseBNHook, freeze_epoch_for
from rethinkbn.stats import all_gather_moments, all_reduce_moments


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


# Every argument that takes a count: (the call with the value, the smallest valid value).
COUNT_ARGUMENTS = {
    "GhostBatchNorm.num_features": (lambda v: GhostBatchNorm(v), 1),
    "GhostBatchNorm.norm_batch_size": (lambda v: GhostBatchNorm(3, norm_batch_size=v), 1),
    "FrozenBatchNorm.num_features": (lambda v: FrozenBatchNorm(v), 1),
    "DomainBatchNorm.num_domains": (lambda v: DomainBatchNorm(3, num_domains=v), 1),
    "PerDeviceBatchNorm.num_devices": (lambda v: PerDeviceBatchNorm(3, num_devices=v), 1),
    "SyncBatchNorm.group_size": (lambda v: SyncBatchNorm(3, group_size=v), 1),
    "consecutive_group": (lambda v: consecutive_group(v), 1),
    "virtual_devices": (lambda v: virtual_devices(_model(), v), 1),
    "ShufflePlan.virtual": (lambda v: ShufflePlan.virtual(4, v, seed=0, step=0), 1),
    "ShuffledModule.num_devices": (lambda v: ShuffledModule(nn.Identity(), num_devices=v), 1),
    "to_ghost_bn": (lambda v: to_ghost_bn(_model(), v), 1),
    "to_domain_bn": (lambda v: to_domain_bn(_model(), v), 1),
    "revert_batchnorm.domain": (lambda v: revert_batchnorm(to_domain_bn(_model(), 2), domain=v),
                                0),
    "PreciseBNOptions.num_batches": (lambda v: PreciseBNOptions(num_batches=v), 1),
    "PreciseBNOptions.num_samples": (lambda v: PreciseBNOptions(num_samples=v), 1),
    "PreciseBNOptions.pass_norm_batch_size": (
        lambda v: PreciseBNOptions(pass_norm_batch_size=v), 1),
    "PreciseBNHook.every_n_epochs": (lambda v: PreciseBNHook(None, every_n_epochs=v), 1),
    "FreezeBNHook.freeze_epoch": (lambda v: FreezeBNHook(None, freeze_epoch=v), 0),
    "freeze_epoch_for": (lambda v: freeze_epoch_for(0.2, v), 1),
}


@pytest.mark.parametrize("bad", [True, 2.0, "2"], ids=["bool", "float", "str"])
@pytest.mark.parametrize("where", sorted(COUNT_ARGUMENTS))
def test_a_non_int_count_is_a_type_error(where, bad):
    call, _ = COUNT_ARGUMENTS[where]
    with pytest.raises(TypeError, match=rf"must be .*int.*got {bad!r}"):
        call(bad)


@pytest.mark.parametrize("where", sorted(COUNT_ARGUMENTS))
def test_a_count_below_its_minimum_is_a_value_error(where):
    call, minimum = COUNT_ARGUMENTS[where]
    with pytest.raises(ValueError, match=rf"must be .*, got {minimum - 1}"):
        call(minimum - 1)


def test_out_of_range_floats_are_value_errors():
    with pytest.raises(ValueError, match="eps must be > 0"):
        GhostBatchNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        FrozenBatchNorm(3, momentum=1.5)


def test_a_wrong_choice_is_a_value_error():
    with pytest.raises(ValueError, match="grouping must be one of"):
        GhostBatchNorm(3, 2, grouping="diagonal")
    with pytest.raises(ValueError, match="unknown|kind"):
        rethinkbn.convert_batchnorm(_model(), "no-such-kind")


def test_a_wrong_type_of_flag_or_model_is_a_type_error():
    with pytest.raises(TypeError, match="keep_modes must be a bool"):
        PreciseBNOptions(keep_modes=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an nn.Module"):
        rethinkbn.convert_batchnorm("model", "ghost")  # type: ignore[arg-type]


def test_nonfinite_statistics_are_value_errors_in_the_layers_and_in_precise_bn():
    layer = GhostBatchNorm(2)
    rethinkbn.layers.set_nonfinite(layer, "raise")
    x = torch.randn(4, 2)
    x[0, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite|NaN"):
        layer(x)
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="non-finite"):
        rethinkbn.precise_bn(model, [x])


def test_a_snapshot_that_does_not_match_the_model_is_a_value_error():
    bank = StatsBank()
    bank.capture(_model(), "two-layers")
    other = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="does not match"):
        bank.install(other, "two-layers")
    with pytest.raises(ValueError, match="does not match"), bank.use(other, "two-layers"):
        pass


def test_a_snapshot_of_non_tensors_is_a_type_error_and_a_missing_name_a_key_error():
    bank = StatsBank()
    with pytest.raises(TypeError, match="needs tensors"):
        bank["s"] = {"0": {"running_mean": 1.0, "running_var": 1.0}}
    with pytest.raises(KeyError, match="no snapshot named"):  # a mapping's missing key
        bank["s"]


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        StatsBank.load(tmp_path / "nothing.pt")


def test_the_model_comes_first_in_every_bank_method():
    bank = StatsBank()
    with pytest.raises(TypeError, match=r"capture\(model, name\)"):
        bank.capture("source", _model())  # type: ignore[arg-type]


def test_old_keywords_fail_loudly():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="groups"):
        Moments.of(x, groups=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="virtual_devices"):
        ShuffledModule(nn.Identity(), virtual_devices=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="group"):
        all_reduce_moments([Moments.of(x)], group=None)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="group"):
        all_gather_moments([Moments.of(x)], group=None)  # type: ignore[call-arg]
