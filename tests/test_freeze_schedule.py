"""FrozenBN late in training: precise statistics, then FrozenBatchNorm, from plain-loop hooks."""

import copy

import pytest
import torch
from torch import nn

from rethinkbn.convert import unfreeze_bn
from rethinkbn.layers import FrozenBatchNorm
from rethinkbn.population import (
    FreezeBNHook,
    PreciseBNHook,
    freeze_epoch_for,
    freeze_with_precise_stats,
    precise_bn,
)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2),
                          nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, generator=g) * 2 + 1, torch.randn(8, 2, generator=g))
            for _ in range(4)]
    return model, data


def train_step(model, optimizer, batch):
    x, y = batch
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_layers_become_frozen_with_the_precise_statistics():
    model, data = model_and_data()
    reference = copy.deepcopy(model)
    precise_bn(reference, data, num_batches=4)
    model = freeze_with_precise_stats(model, data, num_batches=4)
    for i in (1, 4):
        assert isinstance(model[i], FrozenBatchNorm)
        assert torch.equal(model[i].running_mean, reference[i].running_mean)
        assert torch.equal(model[i].running_var, reference[i].running_var)


def test_the_optimizer_keeps_training_the_same_affine_parameters():
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[1].weight
    model = freeze_with_precise_stats(model, data, num_batches=4)
    assert model[1].weight is weight
    before, stats = weight.detach().clone(), model[1].running_mean.clone()
    train_step(model.train(), optimizer, data[0])
    assert not torch.equal(weight, before)
    assert torch.equal(model[1].running_mean, stats)


def test_only_selected_layers_freeze_and_the_others_keep_their_statistics():
    model, data = model_and_data()
    ema = model[4].running_mean.clone()
    model = freeze_with_precise_stats(model, data, num_batches=4, include="1")
    assert isinstance(model[1], FrozenBatchNorm) and isinstance(model[4], nn.BatchNorm1d)
    assert torch.equal(model[4].running_mean, ema)


def test_the_freeze_hook_passes_the_layer_selection_on():
    model, data = model_and_data()
    model = FreezeBNHook(data, freeze_epoch=0, include="1", num_batches=4)(model, 0)
    assert isinstance(model[1], FrozenBatchNorm) and isinstance(model[4], nn.BatchNorm1d)


def test_unfreeze_bn_is_the_reverse():
    model, data = model_and_data()
    model = freeze_with_precise_stats(model, data, num_batches=4)
    frozen_stats = model[1].running_var.clone()
    model = unfreeze_bn(model)
    assert type(model[1]) is nn.BatchNorm1d
    assert torch.equal(model[1].running_var, frozen_stats)


def test_an_interrupted_pass_leaves_the_model_unchanged():
    model, data = model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing():
        yield data[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        freeze_with_precise_stats(model, failing(), num_batches=4)
    assert type(model[1]) is nn.BatchNorm1d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_last_fifth_of_training_starts_at_epoch_80_of_100():
    assert freeze_epoch_for(0.2, 100) == 80
    assert freeze_epoch_for(0.2, 10) == 8
    assert freeze_epoch_for(1.0, 5) == 0


@pytest.mark.filterwarnings("ignore:precise_bn.*no BatchNorm layer")  # all frozen in epoch 3
def test_hooks_in_a_plain_loop_recompute_each_epoch_and_freeze_once():
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    precise = PreciseBNHook(data, every_n_epochs=2, num_batches=4)
    freeze = FreezeBNHook.last_fraction(data, 0.25, total_epochs=4, num_batches=4)
    kinds = []
    for epoch in range(4):
        model = freeze(model, epoch)
        kinds.append(type(model[1]).__name__)
        model.train()
        for batch in data:
            train_step(model, optimizer, batch)
        precise(model.eval(), epoch)
    assert kinds == ["BatchNorm1d"] * 3 + ["FrozenBatchNorm"]
    assert sorted(precise.reports) == [1, 3] and freeze.frozen


def test_hook_arguments_are_checked_up_front():
    with pytest.raises(ValueError, match="every_n_epochs"):
        PreciseBNHook([], every_n_epochs=0)
    with pytest.raises(TypeError, match="num_sample"):
        PreciseBNHook([], num_sample=10)
    with pytest.raises(TypeError, match=r"FreezeBNHook: unknown arguments \['num_sample'\]"):
        FreezeBNHook([], freeze_epoch=80, num_sample=10)
    FreezeBNHook([], freeze_epoch=80, include="1", affine_trainable=False, num_samples=10)


def test_a_misspelt_argument_is_refused_before_the_pass_and_changes_nothing():
    model, data = model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="freeze_with_precise_stats: unknown.*'affine_trainble'"):
        freeze_with_precise_stats(model, data, num_batches=4, affine_trainble=False)
    assert type(model[1]) is nn.BatchNorm1d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
