"""``rethinkbn._model``: the one definition of "every BatchNorm layer of a model by name"."""

from __future__ import annotations

import pytest
from torch import nn

from rethinkbn import _model
from rethinkbn.convert import surgery
from rethinkbn.distributed import PerDeviceBatchNorm, SyncBatchNorm
from rethinkbn.layers import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
    nonfinite_report,
    set_nonfinite,
)


def slow_listing(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The obvious reference: walk the tree, keep each BatchNorm once, at its first name."""
    seen, out = set(), []

    def walk(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, GhostBatchNorm, FrozenBatchNorm,
                               DomainBatchNorm, SyncBatchNorm, PerDeviceBatchNorm)):
            out.append((prefix, module))
        for key, child in module._modules.items():
            if child is not None:
                walk(f"{prefix}.{key}" if prefix else key, child)

    walk("", model)
    return out


def model() -> nn.Sequential:
    shared = nn.BatchNorm2d(3)
    return nn.Sequential(
        nn.Conv2d(3, 3, 1), shared, nn.Sequential(shared, GhostBatchNorm(3, norm_batch_size=2)),
        nn.ModuleDict({"f": FrozenBatchNorm(3), "d": DomainBatchNorm(3, num_domains=2),
                       "s": SyncBatchNorm(3), "p": PerDeviceBatchNorm(3, num_devices=2)}),
        nn.LayerNorm(3),
    )


def test_batchnorm_layers_lists_each_layer_once_at_its_first_name_in_module_order():
    m = model()
    assert _model.batchnorm_layers(m) == slow_listing(m)
    assert [n for n, _ in _model.batchnorm_layers(m)] == ["1", "2.1", "3.f", "3.d", "3.s", "3.p"]


def test_the_root_is_named_as_asked_and_extra_types_count_when_asked():
    bn = nn.BatchNorm1d(2)
    assert _model.batchnorm_layers(bn) == [("", bn)]
    assert _model.batchnorm_layers(bn, root="<model>") == [("<model>", bn)]
    norm = nn.Sequential(nn.LayerNorm(2))
    assert _model.batchnorm_layers(norm) == []
    assert _model.batchnorm_layers(norm, also=(nn.LayerNorm,)) == [("0", norm[0])]


def test_is_batchnorm_is_the_kernels_and_knows_every_layer_of_the_family():
    assert is_batchnorm is _model.is_batchnorm
    for _, layer in slow_listing(model()):
        assert is_batchnorm(layer)
    assert not is_batchnorm(nn.LayerNorm(3)) and not is_batchnorm(nn.GroupNorm(1, 3))


def test_the_layers_and_the_conversions_list_layers_with_the_kernel():
    m = model()
    names = [n for n, _ in _model.batchnorm_layers(m)]
    assert [s.name for s in surgery._batchnorm_sites(m)] == names
    assert set_nonfinite(m, "skip") == len(names) - 1  # all but torch's BatchNorm2d
    assert nonfinite_report(m) == {}


@pytest.mark.xfail(strict=True, reason="fixed in phase 2: population/_state.batchnorm_layers "
                   "and diagnosis._bn_layers are copies of _model.batchnorm_layers")
def test_population_and_diagnosis_list_layers_with_the_kernel():
    from rethinkbn import diagnosis
    from rethinkbn.population import _state

    assert _state.batchnorm_layers is _model.batchnorm_layers
    assert not hasattr(diagnosis, "_bn_layers")
