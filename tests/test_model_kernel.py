"""``rethinkbn._model``: the package's kernel about models (layers by name, unwrap, the guard,
ranks, the batch convention), each defined once."""

from __future__ import annotations

import ast
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import pytest
import torch
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


def test_population_lists_layers_with_the_kernel():
    from rethinkbn.population import _state

    assert _state.batchnorm_layers is _model.batchnorm_layers


def test_diagnosis_lists_layers_with_the_kernel():
    from rethinkbn import diagnosis

    assert not hasattr(diagnosis, "_bn_layers")


# ---------------------------------------------------------------------------- one definition each
KERNEL_NAMES = {  # what the kernel defines once, and the names its former copies had
    "unwrap", "_unwrap", "batchnorm_layers", "_bn_layers", "ModelGuard", "_Saved", "world_size",
    "_world", "select_input", "_model_input", "num_samples", "batch_size", "_num_samples",
    "to_device", "_moved", "first_tensor", "_first_tensor", "running_buffers",
}
LIBRARY = Path(__file__).resolve().parents[1] / "src" / "rethinkbn"


def _definitions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.relative_to(LIBRARY.parent)}:{node.lineno} {node.name}"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in KERNEL_NAMES]


def test_the_kernel_is_the_one_definition_of_each_model_helper():
    outside = [d for p in sorted(LIBRARY.rglob("*.py"))
               if p.name != "_model.py" and "diagnosis" not in p.parts and p.stem != "diagnosis"
               for d in _definitions(p)]
    assert not outside, outside


def test_diagnosis_defines_no_copy_of_a_model_helper():
    found = [d for p in sorted(LIBRARY.rglob("*.py"))
             if "diagnosis" in p.parts or p.stem == "diagnosis" for d in _definitions(p)]
    assert not found, found


# ---------------------------------------------------------------- wrappers, guard, ranks
def test_unwrap_removes_data_parallel_and_compile_wrappers_at_any_depth():
    inner = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    wrapped = torch.compile(nn.DataParallel(torch.compile(inner)))
    assert _model.unwrap(wrapped) is inner and _model.unwrap(inner) is inner


def test_model_guard_puts_back_attributes_values_slots_hooks_and_modes_bit_for_bit():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    bn = m[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    guard = _model.ModelGuard(m)
    guard.set_attr(bn, "momentum", 1.0)
    guard.set_attr(bn, "_rethinkbn_name", "1")
    guard.keep_values([bn.running_mean])
    guard.set_buffer_slot(bn, "running_var", None)
    guard.hook(bn.register_forward_hook(lambda *_: None))
    m.eval()
    bn.running_mean.add_(3.0)
    guard.restore()
    assert bn.momentum == 0.1 and not hasattr(bn, "_rethinkbn_name")
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert not bn._forward_hooks and all(x.training for x in m.modules())


def test_outside_torch_distributed_the_world_is_one_rank():
    assert _model.world_size() == 1 and _model.world_size(None) == 1 and _model.rank() == 0


# ---------------------------------------------------------------------------- the batch convention
Pair = namedtuple("Pair", ["x", "y"])
X = torch.randn(5, 3)


@pytest.mark.parametrize(("batch", "key", "want"), [
    (X, None, X), ((X, 1), None, X), ([X], None, X), (Pair(X, 1), None, X),
    ({"a": 1, "x": X}, "x", X), ("text", None, "text"), (torch.tensor(2.0), None, None),
])
def test_select_input_takes_the_tensor_the_first_item_or_the_keyed_entry(batch, key, want):
    got = _model.select_input(batch, key)
    assert got is want or (want is None and got is batch)


def test_select_input_refuses_an_empty_tuple_and_a_mapping_without_its_key():
    with pytest.raises(ValueError, match="empty tuple"):
        _model.select_input(())
    with pytest.raises(ValueError, match="empty list"):
        _model.select_input([])
    with pytest.raises(TypeError, match=r"keys \['x', 'y'\]; pass input_key="):
        _model.select_input({"x": X, "y": 1})
    with pytest.raises(KeyError, match=r"input_key='z'.*\['x', 'y'\]"):
        _model.select_input({"x": X, "y": 1}, "z")


@pytest.mark.parametrize(("batch", "key", "n"), [
    (X, None, 5), ((X, torch.zeros(7)), None, 5), (Pair(X, 1), None, 5),
    ({"x": X}, "x", 5), ({"y": torch.zeros(4), "x": X}, None, 4),  # no key: the first tensor
    ((torch.tensor(3.0), X), None, 5),  # a 0-d model input is no batch: the first 1-d+ tensor
    ([{"w": torch.tensor(1.0)}, (X,)], None, 5), ((), None, None), (torch.tensor(1.0), None, None),
    ("text", None, None), ({"x": torch.tensor(1.0)}, "x", None),
])
def test_num_samples_is_dim_0_of_the_model_input_or_of_the_first_tensor(batch, key, n):
    if n is None:
        with pytest.raises(TypeError, match="cannot tell the batch size"):
            _model.num_samples(batch, key)
    else:
        assert _model.num_samples(batch, key) == n


def test_to_device_moves_every_tensor_and_keeps_every_container_type():
    factory = defaultdict(list, {"x": X, "n": 3})
    batch = [Pair(X, (X, "s")), OrderedDict(b=X, a=[X]), factory, torch.tensor(1.0), "s"]
    moved = _model.to_device(batch, "meta")
    assert type(moved) is list and type(moved[0]) is Pair and moved[0].x.is_meta
    assert moved[0].y[0].is_meta and moved[0].y[1] == "s"
    assert type(moved[1]) is OrderedDict and list(moved[1]) == ["b", "a"]
    assert moved[1]["a"][0].is_meta
    assert type(moved[2]) is defaultdict and moved[2].default_factory is list
    assert moved[2]["x"].is_meta and moved[2]["n"] == 3
    assert moved[3].is_meta and moved[4] == "s" and not X.is_meta
    assert _model.to_device(batch, None) is batch


def test_first_call_counts_dim_0_of_the_first_batchnorm_input():
    m = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    first = _model.FirstCall()
    for layer in m:
        layer.register_forward_pre_hook(first.hook)
    m(X)
    assert first.samples == 5


def test_precise_bn_follows_the_convention_on_odd_batches():
    from rethinkbn.population import precise_bn

    torch.manual_seed(0)
    x = torch.randn(8, 3)
    bn = nn.Sequential(nn.BatchNorm1d(3))
    # a defaultdict batch moved to a device keeps its type (it used to fail rebuilding it)
    batch = defaultdict(list, {"x": x, "step": torch.tensor(3)})
    report = precise_bn(bn, [batch], input_key="x", device="cpu", num_batches=1)
    assert report.num_samples == 8
    torch.testing.assert_close(bn[0].running_var, x.var(0))
    # a 0-d model input is no batch of samples: the first tensor of 1+ dims counts
    report = precise_bn(bn, [(torch.tensor(1.0), x)], forward=lambda m, b: m(b[1]), num_batches=1)
    assert report.num_samples == 8
    with pytest.raises(ValueError, match="empty tuple"):
        precise_bn(bn, [()], num_batches=1)
