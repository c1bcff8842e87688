"""Interop tier: real timm and torchvision models, and the BatchNorm tools of other libraries.

Run in the venv of constraints-interop.txt (``python -m pytest -m interop``); tests that need a
library skip where it does not import (torchvision built for another torch raises RuntimeError,
not ImportError, so the import is tried by hand). Models are built with ``pretrained=False`` /
``weights=None``: nothing is downloaded. Everything runs in float64 on one thread.
"""

import copy
import functools
import importlib
import io
import re
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rethinkbn import (
    FrozenBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    is_batchnorm,
    precise_bn,
    use_domain,
)
from rethinkbn.convert import convert_batchnorm, fold_batchnorm, revert_batchnorm
from rethinkbn.convert.norm_act import post_modules

pytestmark = pytest.mark.interop

TIMM_MODELS = ["resnet18", "resnet26d", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"]
TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"]
MODELS = [("timm", n) for n in TIMM_MODELS] + [("torchvision", n) for n in TORCHVISION_MODELS]
KINDS = {
    "ghost": {"norm_batch_size": 2},
    "frozen": {},
    "domain": {"num_domains": 2},
    "sync": {},
    "per_device": {"num_devices": 2},
    "torch_sync": {},
}


def need(module: str):
    """``import module``, or skip the test where it does not import."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError
        pytest.skip(f"{module} does not import here ({type(err).__name__}: {err})")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a busy two-core machine run these models 30x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _model(lib: str, name: str) -> nn.Module:
    if lib == "timm":
        model = need("timm").create_model(name, pretrained=False, num_classes=10)
    else:
        model = getattr(need("torchvision.models"), name)(weights=None, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "p", None), float):  # dropout, stochastic depth: off
                m.p = 0.0
            if is_batchnorm(m):  # statistics and affine away from their initial values
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.double().eval()


def model_of(lib: str, name: str) -> nn.Module:
    """A fresh copy of the (cached) model: float64, eval mode, nontrivial BatchNorm state."""
    return copy.deepcopy(_model(lib, name))


def convert(model: nn.Module, kind: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer skipped, nothing unconverted
        if kind == "torch_sync":
            return convert_batchnorm(model, nn.SyncBatchNorm)
        return convert_batchnorm(model, kind, **KINDS[kind])


def run(model: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    with torch.no_grad(), use_domain(model, 0) if kind == "domain" else nullcontext():
        return model(x)


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def classes(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


# ---------------------------------------------------------------------------- real models
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("lib", "name"), MODELS)
def test_every_conversion_of_a_real_model_keeps_activations_and_round_trips_exactly(
    lib, name, kind
):
    original, x = model_of(lib, name), images()
    expected = run(original, x, "torch")
    model = convert(copy.deepcopy(original), kind)

    converted = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    assert len(converted) == sum(is_batchnorm(m) for m in original.modules())
    wanted = nn.SyncBatchNorm if kind == "torch_sync" else _BatchNorm
    assert all(isinstance(m, wanted) == (kind == "torch_sync") for m in converted.values())
    for n, m in converted.items():  # timm's norm-act layers keep their drop and act
        before = original.get_submodule(n)
        assert {k: type(v) for k, v in post_modules(m).items()} == {
            k: type(v) for k, v in post_modules(before).items()
        }, n
    assert list(model.state_dict()) == list(original.state_dict())
    # ghost/frozen/domain normalize in eval with their own kernel: equal up to rounding
    torch.testing.assert_close(run(model, x, kind), expected, rtol=1e-10, atol=1e-10)

    reverted = revert_batchnorm(model, domain=0)
    assert classes(reverted) == classes(original)
    assert_same_state(reverted, original)
    assert torch.equal(run(reverted, x, "torch"), expected)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("lib", "name"), MODELS)
def test_a_converted_real_model_trains_with_its_kinds_statistics(lib, name, kind):
    # 64x64 images: the last layers' maps are 2x2, not 1x1, so that groups of two samples still
    # give well-conditioned variances.
    original, x = model_of(lib, name), images(64)
    model = convert(copy.deepcopy(original), kind).train()
    reference = copy.deepcopy(original).train()
    if kind in ("ghost", "per_device"):  # two groups of two: the torch model on each half
        expected = torch.cat([run(reference, x[:2], "torch"), run(reference, x[2:], "torch")])
    elif kind == "frozen":  # population statistics
        expected = run(reference.eval(), x, "torch")
    else:  # the whole batch (one domain; a world of one process)
        expected = run(reference, x, "torch")
    torch.testing.assert_close(run(model, x, kind), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", [None, "ghost", "frozen", "sync", "per_device", "torch_sync"])
@pytest.mark.parametrize(("lib", "name"), MODELS)
def test_fold_batchnorm_folds_every_layer_of_a_real_model_and_keeps_activations(
    lib, name, kind
):
    original, x = model_of(lib, name), images()
    model = original if kind is None else convert(copy.deepcopy(original), kind)
    folded = fold_batchnorm(model)
    assert not any(is_batchnorm(m) for m in folded.modules())
    kept = {k for k in original.state_dict() if ".act." in k or ".drop." in k}
    assert kept <= set(folded.state_dict())
    torch.testing.assert_close(run(folded, x, "torch"), run(original, x, "torch"),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["ghost", "frozen", "sync"])
def test_a_saved_and_reloaded_timm_model_reverts_to_timm_classes(kind):
    original = model_of("timm", "efficientnet_b0")
    buffer = io.BytesIO()
    torch.save(convert(copy.deepcopy(original), kind), buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    reverted = revert_batchnorm(reloaded)
    assert classes(reverted) == classes(original)
    assert_same_state(reverted, original)


def test_a_timm_checkpoint_loads_into_the_converted_model():
    original = model_of("timm", "mobilenetv3_small_100")
    model = convert(model_of("timm", "mobilenetv3_small_100"), "ghost")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(original.state_dict())
    assert_same_state(model, original)


def test_timm_norm_act_converts_to_torch_sync_batchnorm_with_its_activation():
    timm_layers = need("timm.layers")
    model = convert(model_of("timm", "efficientnet_b0"), "torch_sync")
    assert type(model.bn1) is timm_layers.SyncBatchNormAct
    assert type(revert_batchnorm(model).bn1) is timm_layers.BatchNormAct2d


# ---------------------------------------------------------------------------- the interop table
def ghost_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), GhostBatchNorm(4, norm_batch_size=2), nn.ReLU(),
                         nn.Conv2d(4, 4, 1), FrozenBatchNorm(4))


def loader() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 6, 6, generator=gen) * 3 + 1 for _ in range(3)]


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_row_torch_convert_sync_batchnorm_leaves_rethinkbn_layers_alone():
    model = ghost_net()
    result = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in result] == [type(m) for m in ghost_net()]
    # ours: convert_batchnorm(model, "sync") (rethinkbn.to_sync_bn)
    assert isinstance(convert_batchnorm(result, "sync")[1], SyncBatchNorm)


def test_row_torch_convert_sync_batchnorm_drops_what_a_batchnorm_subclass_adds():
    # The evidence against making rethinkbn layers _BatchNorm subclasses: torch's helper
    # rebuilds every _BatchNorm as a plain SyncBatchNorm, here losing timm's activation (the
    # act module is still a child, but SyncBatchNorm's forward never calls it).
    timm_layers = need("timm.layers")
    layer = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU).double().eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(layer))[0]
    assert type(converted) is nn.SyncBatchNorm
    x = -torch.ones(2, 4, 3, 3, dtype=torch.float64) * 5
    assert not torch.equal(converted(x), layer(x))


def test_row_swa_update_bn_ignores_rethinkbn_layers():
    from torch.optim.swa_utils import update_bn

    model = ghost_net()
    before = buffers(model)
    update_bn(loader(), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ours: precise_bn recomputes them
    precise_bn(model, loader(), num_samples=12)
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # fvcore's
def test_row_fvcore_update_bn_stats_ignores_rethinkbn_layers():
    precise = need("fvcore.nn.precise_bn")
    model = ghost_net()
    before = buffers(model)
    precise.update_bn_stats(model, loader(), num_iters=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert precise.get_bn_modules(model) == []


def test_row_weight_decay_exclusion_by_isinstance_misses_rethinkbn_layers():
    model = ghost_net()
    by_isinstance = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert by_isinstance == []
    # ours: rethinkbn.is_batchnorm
    assert [type(m) for m in model.modules() if is_batchnorm(m)] == [GhostBatchNorm,
                                                                     FrozenBatchNorm]


def test_row_timm_param_groups_weight_decay_excludes_rethinkbn_parameters():
    optim = need("timm.optim")
    model = ghost_net()
    groups = optim.param_groups_weight_decay(model, weight_decay=1e-4)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)["params"]
    bn_params = [p for m in model.modules() if is_batchnorm(m) for p in m.parameters()]
    assert all(any(p is q for q in no_decay) for p in bn_params)


def test_row_timm_freeze_and_sync_helpers_leave_rethinkbn_layers_alone():
    timm_layers = need("timm.layers")
    for helper in (timm_layers.freeze_batch_norm_2d, timm_layers.convert_sync_batchnorm):
        result = helper(ghost_net())
        assert [type(m) for m in result] == [type(m) for m in ghost_net()]


def test_row_timm_freeze_batch_norm_2d_then_rethinkbn_sees_no_batchnorm():
    # timm's / torchvision's FrozenBatchNorm2d (detectron2's design) is no _BatchNorm: rethinkbn
    # does not convert it; freeze_bn gives rethinkbn's FrozenBatchNorm, which revert undoes.
    timm_layers = need("timm.layers")
    model = timm_layers.freeze_batch_norm_2d(nn.Sequential(nn.Conv2d(3, 4, 1),
                                                           nn.BatchNorm2d(4)))
    assert not any(is_batchnorm(m) for m in model.modules())
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        convert_batchnorm(model, "ghost", norm_batch_size=2)


def test_row_torchvision_frozen_batchnorm_checkpoint_loads_into_rethinkbn_frozen_batchnorm():
    misc = need("torchvision.ops.misc")
    theirs = misc.FrozenBatchNorm2d(4, eps=1e-5)
    gen = torch.Generator().manual_seed(3)
    for key in ("weight", "bias", "running_mean"):
        getattr(theirs, key).copy_(torch.randn(4, generator=gen))
    theirs.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    ours = FrozenBatchNorm(4, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 3, 3, generator=gen)
    torch.testing.assert_close(ours.train()(x), theirs(x))


def test_row_lightning_sync_batchnorm_plugin_leaves_rethinkbn_layers_alone():
    plugins = need("lightning.pytorch.plugins")
    result = plugins.TorchSyncBatchNorm().apply(ghost_net())
    assert [type(m) for m in result] == [type(m) for m in ghost_net()]


def test_ci_runs_the_docs_interop_command_after_the_main_suite():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = (root / "docs" / "interop.md").read_text()  # the docs' Interop page
    command = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip()
    assert command.endswith("python -m pytest -m interop") and "constraints-interop.txt" in command
    ci = (root / ".ci" / "run").read_text().splitlines()
    main = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[1].strip()
    assert ci.index(main) < ci.index(command)


def test_timm_sync_norm_act_hands_its_process_group_to_ours_and_back():
    timm_layers = need("timm.layers")
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        layer = timm_layers.SyncBatchNormAct(4, process_group=group)
        layer.drop, layer.act = nn.Identity(), nn.SiLU()  # as timm's convert_sync_batchnorm does
        model = convert(nn.Sequential(layer), "sync")
        assert isinstance(model[0], SyncBatchNorm) and model[0].process_group is group
        assert model[0].act is layer.act
        model = revert_batchnorm(model)
        assert type(model[0]) is timm_layers.SyncBatchNormAct and model[0].process_group is group
        assert model[0].act is layer.act
    finally:
        dist.destroy_process_group()


def test_a_converted_timm_model_unpickles_in_a_fresh_process_and_reverts(tmp_path):
    # The norm-act classes are made on first use; a fresh process makes them while unpickling.
    need("timm")
    path = tmp_path / "model.pt"
    torch.save(convert(model_of("timm", "mobilenetv3_small_100"), "ghost"), path)
    code = (
        "import sys, torch; from rethinkbn.convert import revert_batchnorm; "
        f"m = torch.load({str(path)!r}, weights_only=False); "
        "print(type(m.bn1).__name__, type(revert_batchnorm(m).bn1).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["GhostBatchNormAct", "BatchNormAct2d"]
