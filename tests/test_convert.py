"""Model surgery: every BatchNorm converts to another kind and back, exactly, or not at all."""

import copy
import io
import warnings
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.convert import (
    convert_batchnorm,
    fold_batchnorm,
    freeze_bn,
    register_converter,
    register_norm_act,
    revert_batchnorm,
    to_domain_bn,
    to_ghost_bn,
    unfreeze_bn,
)
from rethinkbn.convert import registry as registry_tables
from rethinkbn.distributed import to_sync_bn
from rethinkbn.layers import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
    use_domain,
)

KINDS = {
    "ghost": {"norm_batch_size": 2},
    "frozen": {},
    "domain": {"num_domains": 3},
    "torch_sync": {},
}


def _convert(model, kind):
    if kind == "torch_sync":
        return convert_batchnorm(model, nn.SyncBatchNorm)
    return convert_batchnorm(model, kind, **KINDS[kind])


def _revert(model):
    return revert_batchnorm(model, domain=0)


class Net(nn.Module):
    """BatchNorm1d/2d/3d in nested containers, one BatchNorm reused at two places."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3))
        shared = nn.BatchNorm2d(4, momentum=None)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1), shared), shared])
        self.heads = nn.ModuleDict(
            {
                "plain": nn.BatchNorm1d(4, affine=False),
                "volume": nn.BatchNorm3d(4, track_running_stats=False),
            }
        )
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.blocks[1](self.blocks[0](self.stem(x)))
        v = self.heads["volume"](x.unsqueeze(2)).squeeze(2)
        return self.fc(self.heads["plain"](v.mean((2, 3))))


def trained(model, steps=2):
    """The model after a few training forwards, so that running statistics are not trivial."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for _ in range(steps):
            model(torch.randn(6, 3, 5, 5))
    return model


def assert_same_state(a, b):
    """Same keys, dtypes and values; ``a`` and ``b`` are modules or state_dicts."""
    sa, sb = (m if isinstance(m, dict) else m.state_dict() for m in (a, b))
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def bn_layers(model):
    return [m for m in model.modules() if is_batchnorm(m)]


def unconvertible():
    """A layer no conversion takes without ``domain=``: per-domain statistics to choose from.

    (These tests used torch's ``bias=False`` until every kind converted it.)
    """
    return DomainBatchNorm(4, num_domains=2)


@pytest.fixture
def net():
    return trained(Net())


@pytest.fixture
def registry():
    """Restores the converter registry after a test that registers converters."""
    registries = (registry_tables.KINDS, registry_tables.READERS,
                  registry_tables.SOURCE_CONVERTERS, registry_tables.ACT_VARIANTS)
    saved = tuple(dict(r) for r in registries)
    yield
    for live, old in zip(registries, saved, strict=True):
        live.clear()
        live.update(old)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_then_revert_restores_state_dict_and_outputs_exactly(net, kind):
    reference = copy.deepcopy(net)
    x = torch.randn(6, 3, 5, 5)
    model = _revert(_convert(net, kind))
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert_same_state(model, reference)
    for training in (False, True):
        model.train(training)
        reference.train(training)
        assert torch.equal(model(x), reference(x))
    assert_same_state(model, reference)


@pytest.mark.parametrize("kind", ["ghost", "frozen", "torch_sync"])
def test_a_converted_model_computes_what_the_original_computes_in_eval_mode(net, kind):
    x = torch.randn(6, 3, 5, 5)
    expected = copy.deepcopy(net).eval()(x)
    torch.testing.assert_close(_convert(net, kind).eval()(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("ghost", GhostBatchNorm), ("frozen", FrozenBatchNorm), ("domain", DomainBatchNorm),
     ("torch_sync", nn.SyncBatchNorm)],
)
def test_every_batchnorm_becomes_the_target_class(net, kind, cls):
    model = _convert(net, kind)
    assert len(bn_layers(model)) == 4
    assert all(type(m) is cls for m in bn_layers(model))


@pytest.mark.parametrize("kind", ["ghost", "frozen", "torch_sync"])
def test_parameters_stay_the_same_objects(net, kind):
    before = [id(p) for p in net.parameters()]
    model = _convert(net, kind)
    assert [id(p) for p in model.parameters()] == before
    assert [id(p) for p in _revert(model).parameters()] == before


def test_an_optimizer_built_before_the_conversion_keeps_training_the_model(net):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    model = to_ghost_bn(net, norm_batch_size=2)
    weight = model.stem[1].weight
    before = weight.detach().clone()
    model(torch.randn(6, 3, 5, 5)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(weight, before)


def test_a_shared_batchnorm_is_converted_once_and_stays_shared(net):
    model = to_ghost_bn(net, norm_batch_size=2)
    assert isinstance(model.blocks[1], GhostBatchNorm)
    assert model.blocks[0][1] is model.blocks[1]
    model = revert_batchnorm(model)
    assert type(model.blocks[1]) is nn.BatchNorm2d
    assert model.blocks[0][1] is model.blocks[1]


def test_a_root_batchnorm_is_replaced_by_a_new_root():
    bn = trained(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))[1]
    reference = copy.deepcopy(bn)
    ghost = to_ghost_bn(bn, norm_batch_size=2)
    assert isinstance(ghost, GhostBatchNorm) and ghost is not bn
    back = revert_batchnorm(ghost)
    assert type(back) is nn.BatchNorm2d
    assert_same_state(back, reference)


@settings(max_examples=12, deadline=None)
@given(
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    training=st.booleans(),
    requires_grad=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    torch_class=st.sampled_from([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]),
    kind=st.sampled_from(["ghost", "frozen", "domain"]),
)
def test_hyper_parameters_flags_and_dtype_carry_over_both_ways(
    eps, momentum, affine, bias, track, training, requires_grad, dtype, torch_class, kind
):
    bn = torch_class(5, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                     dtype=dtype, bias=bias)
    bn.train(training)
    for p in bn.parameters():
        p.requires_grad_(requires_grad)
    model = nn.Sequential(bn)
    converted = convert_batchnorm(model, kind, **KINDS[kind])[0]
    for layer in (converted, revert_batchnorm(model, domain=0)[0]):
        assert (layer.eps, layer.momentum, layer.track_running_stats) == (eps, momentum, track)
        assert layer.training == training
        assert (layer.bias is None) == (not (affine and bias))
        assert all(p.requires_grad == requires_grad for p in layer.parameters())
        assert all(t.dtype == dtype for t in (*layer.parameters(), *layer.buffers())
                   if t.is_floating_point())
    assert type(model[0]) is torch_class
    assert (model[0].weight is None) == (not affine)


# ---------------------------------------------------------------------------- selection
def test_include_and_exclude_select_by_qualified_name_glob(net):
    model = to_ghost_bn(net, norm_batch_size=2, include="heads.*", exclude="*.plain")
    assert isinstance(model.heads["volume"], GhostBatchNorm)
    assert type(model.heads["plain"]) is nn.BatchNorm1d
    assert type(model.stem[1]) is nn.BatchNorm2d


def test_predicate_selects_by_name_and_module(net):
    model = freeze_bn(net, predicate=lambda name, m: isinstance(m, nn.BatchNorm2d))
    assert {type(m) for m in bn_layers(model)} == {FrozenBatchNorm, nn.BatchNorm1d,
                                                    nn.BatchNorm3d}


def test_converted_layers_know_their_qualified_name(net):
    model = to_ghost_bn(net, norm_batch_size=2)
    assert model.stem[1]._rethinkbn_name == "stem.1"
    assert model.heads["volume"]._rethinkbn_name == "heads.volume"


def test_a_class_names_the_kind_too(net):
    model = convert_batchnorm(net, GhostBatchNorm, norm_batch_size=2)
    assert all(type(m) is GhostBatchNorm for m in bn_layers(model))


def test_forward_hooks_follow_the_layer_and_their_handles_still_remove_them(net):
    seen = []
    handle = net.stem[1].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    model = to_ghost_bn(net, norm_batch_size=2)
    model(torch.randn(4, 3, 5, 5))
    assert seen == [GhostBatchNorm]
    handle.remove()
    revert_batchnorm(model)(torch.randn(4, 3, 5, 5))
    assert seen == [GhostBatchNorm]


# ---------------------------------------------------------------------------- specific kinds
def test_freeze_then_unfreeze_restores_eps_momentum_and_only_touches_frozen_layers(net):
    reference = copy.deepcopy(net)
    model = freeze_bn(net, include="stem.*")
    frozen = model.stem[1]
    assert isinstance(frozen, FrozenBatchNorm) and (frozen.eps, frozen.momentum) == (1e-3, 0.1)
    model = to_ghost_bn(model, norm_batch_size=2, include="heads.*")
    model = unfreeze_bn(model)
    assert type(model.stem[1]) is nn.BatchNorm2d
    assert isinstance(model.heads["plain"], GhostBatchNorm)
    assert_same_state(revert_batchnorm(model), reference)


def test_freezing_the_affine_parameters_is_undone_by_unfreezing(net):
    model = freeze_bn(net, affine_trainable=False)
    assert not model.stem[1].weight.requires_grad
    model = unfreeze_bn(model)
    assert model.stem[1].weight.requires_grad and model.stem[1].bias.requires_grad


def test_a_failed_freeze_does_not_switch_off_requires_grad(net):
    net.heads["tail"] = unconvertible()
    with pytest.raises(ValueError, match="'heads.tail'"):
        freeze_bn(net, affine_trainable=False)
    assert all(p.requires_grad for p in net.parameters())


def test_domain_layers_start_every_domain_from_the_single_layers_statistics(net):
    bn = net.stem[1]
    model = to_domain_bn(net, num_domains=3, affine="domain")
    layer = model.stem[1]
    assert layer.running_mean.shape == (3, 4) and layer.weight.shape == (3, 4)
    for d in range(3):
        assert torch.equal(layer.running_mean[d], bn.running_mean)
        assert torch.equal(layer.running_var[d], bn.running_var)
        assert torch.equal(layer.num_batches_tracked[d], bn.num_batches_tracked)
        assert torch.equal(layer.weight[d], bn.weight)


def test_reverting_per_domain_statistics_needs_a_domain_and_keeps_that_one(net):
    model = to_domain_bn(net, num_domains=3)
    with torch.no_grad():
        model.stem[1].running_mean[2].add_(1.0)
    expected = model.stem[1].running_mean[2].clone()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'stem\.1'.*domain=k.*got domain=None"):
        revert_batchnorm(model)
    with pytest.raises(ValueError, match=r"got domain=3"):
        revert_batchnorm(model, domain=3)
    assert_same_state(model, reference)
    model = revert_batchnorm(model, domain=2)
    assert torch.equal(model.stem[1].running_mean, expected)


def test_torch_sync_batchnorm_converts_in_and_out(net):
    reference = copy.deepcopy(net)
    model = convert_batchnorm(net, nn.SyncBatchNorm)
    assert type(model.heads["plain"]) is nn.SyncBatchNorm
    model = convert_batchnorm(model, nn.BatchNorm2d, include=["stem.1", "blocks.*"])
    model = convert_batchnorm(model, nn.BatchNorm1d, include="heads.plain")
    model = convert_batchnorm(model, nn.BatchNorm3d, include="heads.volume")
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert_same_state(model, reference)


def test_revert_goes_back_to_the_torch_class_before_any_conversion(net):
    model = to_ghost_bn(convert_batchnorm(net, nn.SyncBatchNorm), norm_batch_size=2)
    model = revert_batchnorm(model)
    assert type(model.heads["plain"]) is nn.BatchNorm1d
    native = revert_batchnorm(to_ghost_bn(nn.Sequential(nn.SyncBatchNorm(3)), norm_batch_size=2))
    assert type(native[0]) is nn.SyncBatchNorm


def test_a_layer_of_unknown_torch_class_reverts_to_the_rank_agnostic_sync_batchnorm():
    model = nn.Sequential(GhostBatchNorm(3, norm_batch_size=2))
    with pytest.warns(UserWarning, match=r"'0' \(GhostBatchNorm\).*SyncBatchNorm.*torch_class="):
        model = revert_batchnorm(model)
    assert type(model[0]) is nn.SyncBatchNorm
    x = torch.randn(4, 3, 2)
    assert torch.allclose(model.eval()(x), nn.BatchNorm1d(3).eval()(x))


# ---------------------------------------------------------------------------- bad input
def test_nothing_to_convert_warns_and_returns_the_model_unchanged():
    model = nn.Sequential(nn.Linear(2, 2))
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no BatchNorm layer to convert"):
        out = to_ghost_bn(model, norm_batch_size=2)
    assert out is model
    assert_same_state(model, state)


def test_an_invalid_argument_names_the_layer_and_value_and_changes_nothing(net):
    reference = copy.deepcopy(net)
    types = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match=r"'stem\.1' \(BatchNorm2d\).*norm_batch_size=0"):
        to_ghost_bn(net, norm_batch_size=0)
    assert [type(m) for m in net.modules()] == types
    assert_same_state(net, reference)


def test_a_failure_at_a_later_layer_leaves_the_earlier_ones_unchanged(net):
    net.heads["tail"] = unconvertible()
    reference = copy.deepcopy(net)
    types = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match=r"'heads\.tail'.*per-domain"):
        to_ghost_bn(net, norm_batch_size=2)
    assert [type(m) for m in net.modules()] == types
    assert_same_state(net, reference)


def test_an_unknown_target_lists_the_known_kinds(net):
    with pytest.raises(ValueError, match=r"unknown target 'ghosts'.*'frozen'"):
        convert_batchnorm(net, "ghosts")


def test_torch_class_must_be_a_torch_batchnorm_class(net):
    with pytest.raises(ValueError, match=r"torch_class=.*got to='torch', torch_class=<class"):
        revert_batchnorm(net, torch_class=GhostBatchNorm)


def test_an_unknown_keyword_names_the_layer(net):
    with pytest.raises(TypeError, match=r"'stem\.1'.*nbs=2"):
        convert_batchnorm(net, "ghost", nbs=2)


# ---------------------------------------------------------------------------- subclasses, registry
class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm fused with an activation, as timm has."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_batchnorm_subclass_with_more_behaviour_is_skipped_with_a_warning():
    model = nn.Sequential(BatchNormAct2d(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"'0' \(BatchNormAct2d\)"):
        to_ghost_bn(model, norm_batch_size=2)
    assert type(model[0]) is BatchNormAct2d and isinstance(model[1], GhostBatchNorm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revert_batchnorm(model)  # a torch subclass already is torch BatchNorm: nothing to say


def test_a_registered_source_converter_handles_a_subclass(registry):
    def to_ghost_act(module, **kwargs):
        ghost = GhostBatchNorm(module.num_features, **kwargs)
        return nn.Sequential(ghost, nn.ReLU())

    register_converter("ghost", source=BatchNormAct2d, build=to_ghost_act)
    model = to_ghost_bn(nn.Sequential(BatchNormAct2d(3)), norm_batch_size=2)
    assert isinstance(model[0][0], GhostBatchNorm) and model[0][0].norm_batch_size == 2


def test_a_registered_source_converter_carries_the_hooks_over(registry):
    def to_ghost_act(module, **kwargs):
        return nn.Sequential(GhostBatchNorm(module.num_features, **kwargs), nn.ReLU())

    register_converter("ghost", source=BatchNormAct2d, build=to_ghost_act)
    model = nn.Sequential(BatchNormAct2d(3))
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    to_ghost_bn(model, norm_batch_size=2)(torch.randn(4, 3, 2, 2))
    assert seen == [nn.Sequential]
    handle.remove()
    model(torch.randn(4, 3, 2, 2))
    assert seen == [nn.Sequential]


def test_a_registered_kind_converts_and_reverts(registry, net):
    class EchoBatchNorm(GhostBatchNorm):
        """Stands in for a layer that registers itself, as rethinkbn.distributed does."""

    register_converter("echo", EchoBatchNorm)
    reference = copy.deepcopy(net)
    model = convert_batchnorm(net, "echo", norm_batch_size=3)
    assert all(type(m) is EchoBatchNorm for m in bn_layers(model))
    assert_same_state(revert_batchnorm(model), reference)


def test_register_converter_refuses_a_kind_it_cannot_build(registry):
    with pytest.raises(TypeError, match="build=fn"):
        register_converter("odd", nn.Identity)


# ---------------------------------------------------------------------------- norm-act layers
class TimmLikeAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: BatchNorm2d, then the children drop and act."""

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = nn.Identity()
        self.act = nn.PReLU(num_features)  # an activation with a parameter: its key must stay

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def norm_act_net():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), TimmLikeAct(4), nn.Conv2d(4, 4, 1), TimmLikeAct(4))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model:
            if isinstance(m, TimmLikeAct):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                m.act.weight.uniform_(-1, 1)
    return model.double()


def norm_act_input():
    return torch.randn(4, 3, 3, 3, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["ghost", "frozen", "domain"])
def test_a_norm_act_layer_converts_with_its_activation_and_reverts_exactly(registry, kind):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    reference, x = norm_act_net().eval(), norm_act_input()
    model = _convert(copy.deepcopy(reference), kind)
    target = {"ghost": GhostBatchNorm, "frozen": FrozenBatchNorm, "domain": DomainBatchNorm}[kind]
    assert isinstance(model[1], target) and isinstance(model[1].act, nn.PReLU)
    assert type(model[1]).__name__ == f"{target.__name__}Act"
    assert list(model.state_dict()) == list(reference.state_dict())
    with torch.no_grad(), use_domain(model, 0) if kind == "domain" else nullcontext():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    reverted = _revert(model)
    assert [type(m) for m in reverted] == [type(m) for m in reference]
    assert_same_state(reverted, reference)
    assert torch.equal(reverted(x), reference(x))


def test_a_norm_act_layer_already_of_the_kind_is_left_alone(registry):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    model = freeze_bn(norm_act_net())
    layer = model[1]
    with pytest.warns(UserWarning, match="no BatchNorm layer to convert"):
        freeze_bn(model)
    assert model[1] is layer


def test_a_norm_act_layer_trains_with_the_new_kinds_statistics_then_its_activation(registry):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    reference, x = norm_act_net().train(), norm_act_input()
    model = to_ghost_bn(copy.deepcopy(reference), norm_batch_size=2)
    with torch.no_grad():
        expected = torch.cat([reference(x[:2]), reference(x[2:])])
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_a_norm_act_layer_reverts_to_a_torch_class_only_through_its_norm_act_counterpart(
    registry,
):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    model = to_ghost_bn(norm_act_net(), norm_batch_size=2)
    assert type(revert_batchnorm(model, torch_class=nn.BatchNorm2d)[1]) is TimmLikeAct
    model = to_ghost_bn(norm_act_net(), norm_batch_size=2)
    with pytest.raises(ValueError, match=r"'1'.*BatchNorm3d has no norm-act counterpart"):
        revert_batchnorm(model, torch_class=nn.BatchNorm3d)
    assert isinstance(model[1], GhostBatchNorm)  # nothing changed


def test_fold_batchnorm_folds_a_norm_act_layer_and_keeps_its_activation(registry):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    for model in (norm_act_net(), to_ghost_bn(norm_act_net(), norm_batch_size=2)):
        folded, x = fold_batchnorm(model), norm_act_input()
        assert not any(is_batchnorm(m) for m in folded.modules())
        assert {"1.act.weight", "3.act.weight"} <= set(folded.state_dict())
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_a_saved_norm_act_model_reloads_and_reverts_to_its_class(registry):
    register_norm_act(nn.BatchNorm2d, TimmLikeAct)
    reference = norm_act_net()
    buffer = io.BytesIO()
    torch.save(to_ghost_bn(copy.deepcopy(reference), norm_batch_size=2), buffer)
    buffer.seek(0)
    reverted = revert_batchnorm(torch.load(buffer, weights_only=False))
    assert [type(m) for m in reverted] == [type(m) for m in reference]
    assert_same_state(reverted, reference)


def test_an_unregistered_norm_act_subclass_is_still_skipped_with_a_warning():
    model = nn.Sequential(*norm_act_net(), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"'1' \(TimmLikeAct\)"):
        to_ghost_bn(model, norm_batch_size=2)
    assert type(model[1]) is TimmLikeAct and isinstance(model[4], GhostBatchNorm)


def test_register_norm_act_refuses_a_class_that_is_not_the_plain_ones_subclass(registry):
    with pytest.raises(TypeError, match="subclass of BatchNorm2d"):
        register_norm_act(nn.BatchNorm2d, nn.BatchNorm1d)


# ---------------------------------------------------------------------------- reloads
def test_a_whole_saved_model_reverts_to_its_torch_classes_after_a_reload(net):
    reference = copy.deepcopy(net)
    buffer = io.BytesIO()
    torch.save(to_ghost_bn(net, norm_batch_size=2), buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reverted = _revert(torch.load(buffer, weights_only=False))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in reference.modules()]
    assert_same_state(reverted, reference)


def _saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["ghost", "frozen", "domain", "sync"])
def test_a_checkpoint_loaded_into_fresh_rethinkbn_layers_reverts_to_the_original_classes(net, kind):
    convert = to_sync_bn if kind == "sync" else lambda model: _convert(model, kind)
    reference = copy.deepcopy(net)
    checkpoint = _saved_and_loaded(convert(net).state_dict())
    fresh = convert(Net())
    for module in fresh.modules():  # as if built directly as rethinkbn layers: no record
        module.__dict__.pop("_rethinkbn_torch_class", None)
    fresh.load_state_dict(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reverted = _revert(fresh)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in reference.modules()]
    if kind != "domain":  # a DomainBatchNorm's per-domain rows are copies, not the originals
        assert_same_state(reverted, reference)
    # Metadata, not a key: the keys are torch's, and torch's own layers load the checkpoint
    # (strictly; a DomainBatchNorm's per-domain buffers have another shape).
    assert list(checkpoint) == list(reference.state_dict())
    if kind != "domain":
        Net().load_state_dict(checkpoint)


def test_a_checkpoint_without_a_torch_class_reverts_to_the_class_named_or_warns():
    source = nn.Sequential(GhostBatchNorm(3, norm_batch_size=2))  # built directly: no record
    rebuilt = nn.Sequential(GhostBatchNorm(3, norm_batch_size=2))
    rebuilt.load_state_dict(_saved_and_loaded(source.state_dict()))
    with pytest.warns(UserWarning, match="torch_class="):
        assert type(revert_batchnorm(copy.deepcopy(rebuilt))[0]) is nn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(revert_batchnorm(rebuilt, torch_class=nn.BatchNorm1d)[0]) is nn.BatchNorm1d
