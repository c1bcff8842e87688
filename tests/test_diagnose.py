"""`rethinkbn.diagnose` and `rethinkbn diagnose`: planted BatchNorm problems are each found, a
healthy model raises no alarm, and the model is exactly as before."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rethinkbn
from rethinkbn import FrozenBatchNorm, convert_batchnorm, diagnose
from rethinkbn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def make_data(n, seed, contrast=1.0):
    """4 classes of noisy sines of different frequencies, (n, 1, 40)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.linspace(0, 1, 40)
    x = torch.sin(2 * math.pi * (y[:, None] + 1) * t) + 0.5 * torch.randn(n, 40, generator=g)
    return (contrast * x[:, None]).float(), y


def conv_net(pool_bn=False):
    layers = [nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
              nn.Conv1d(8, 16, 3, stride=2, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
              nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    if pool_bn:  # BN1d after pooling: one value per sample and channel
        layers.append(nn.BatchNorm1d(16))
    return nn.Sequential(*layers, nn.Linear(16, 4))


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x) - size + 1, size)]


def fit(model, x, y, batch, lr, epochs, momentum=None):
    """SGD with a cosine schedule; ``momentum`` sets the BN layers' (0: statistics frozen)."""
    torch.manual_seed(0)
    for m in model.modules():
        if momentum is not None and rethinkbn.is_batchnorm(m):
            m.momentum = momentum
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps, step = epochs * (len(x) // batch), 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(len(x) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


def accuracy(out, batch):
    return (out.argmax(1) == batch[1]).float().mean()


TRAIN = make_data(384, 0)
VAL = make_data(256, 1)


@pytest.fixture(scope="module")
def healthy():
    torch.manual_seed(0)
    return fit(conv_net(), *TRAIN, batch=32, lr=0.1, epochs=6)


def run(model, train=TRAIN, val=VAL, batch=32, **kw):
    kw.setdefault("metric", accuracy)
    return diagnose(model, batches(*train, batch), None if val is None else batches(*val, 32),
                    num_samples=kw.pop("num_samples", 512), progress=False, **kw)


def flagged(d, check, layer="any"):
    return [f for f in d.findings if f.check == check and f.severity != "ok"
            and (layer == "any" or f.layer == layer)]


def test_healthy_model_raises_no_alarm(healthy):
    d = run(healthy)
    assert d.problems == [], d.summary()
    assert {f.check for f in d.findings} == {"ema", "train-test", "domain"}
    assert set(d.layers) == {"1", "4"} and d.batch_size == 32
    assert [r.norm_batch_size for r in d.layers.values()] == [32, 32]
    assert [r.values_per_channel for r in d.layers.values()] == [32 * 40, 32 * 20]


def test_healthy_model_without_metric_or_eval_data_raises_no_alarm(healthy):
    d = run(healthy, val=None, metric=None)
    assert d.problems == [], d.summary()
    assert d.metrics == {}


def test_stale_ema_is_found_and_precise_bn_recommended():
    torch.manual_seed(0)  # a large lr while the running statistics do not move (momentum 0)
    model = fit(conv_net(), *TRAIN, batch=32, lr=1.0, epochs=3, momentum=0.0)
    d = run(model)
    top = d.findings[0]
    assert (top.check, top.severity, top.layer) == ("ema", "problem", None), d.summary()
    assert top.value > 0.1 and "precise_bn" in top.recommendation
    assert {f.layer for f in flagged(d, "ema")} >= {"1", "4"}
    assert all(r.ema_shift > 0.1 or r.ema_log_std > 0.1 for r in d.layers.values())


def test_tiny_normalization_batch_is_found():
    torch.manual_seed(0)
    model = convert_batchnorm(conv_net(), "ghost", norm_batch_size=2)
    model = fit(model, *TRAIN, batch=32, lr=0.1, epochs=3)
    d = run(model)
    assert [r.norm_batch_size for r in d.layers.values()] == [2, 2]
    assert "ghost groups of 2" in d.layers["1"].nbs_rule
    model_level = [f for f in flagged(d, "train-test") if f.layer is None]
    assert model_level and model_level[0].value < -0.05, d.summary()
    assert flagged(d, "train-test", "4"), d.summary()  # the per-layer gap


def test_contrast_shifted_eval_data_is_found_and_recompute_recommended(healthy):
    d = run(healthy, val=make_data(256, 1, contrast=0.3))
    top = d.findings[0]
    assert (top.check, top.severity) == ("domain", "problem"), d.summary()
    assert "recompute_stats" in top.recommendation and "StatsBank" in top.recommendation
    assert d.layers["1"].domain_log_std == pytest.approx(-math.log(0.3), abs=0.15)  # train/eval
    assert flagged(d, "domain", "1")
    assert not flagged(d, "ema") and not flagged(d, "train-test")


def test_bn1d_fed_two_values_per_channel_is_found():
    torch.manual_seed(0)
    d = run(conv_net(pool_bn=True), batch=2, num_samples=64, metric=None)
    row = d.layers["8"]
    assert (row.norm_batch_size, row.values_per_channel) == (2, 2)
    found = flagged(d, "nbs", "8")
    assert found and found[0].severity == "problem" and "2 values per channel" in found[0].message
    assert not flagged(d, "nbs", "1")  # the conv layers get 2 x 40 and 2 x 20 values


def test_reused_layer_is_found():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.bn(self.conv(x)))  # one layer, two different inputs

    d = run(Twice(), val=None, metric=None, num_samples=64)
    assert d.layers["bn"].calls_per_forward == 2
    assert flagged(d, "smell:reused-layer", "bn")


def test_batchnorm_in_train_mode_during_evaluation_is_found(healthy):
    d = run(healthy, val=None, metric=None, num_samples=64,
            forward=lambda m, b: m.train()(b[0]))  # an evaluation that forgets model.eval()
    assert {f.layer for f in flagged(d, "smell:batch-stats-in-eval")} == {"1", "4"}


def test_frozen_statistics_of_another_dataset_are_found(healthy):
    model = copy.deepcopy(healthy)
    convert_batchnorm(model, "frozen", include="1")
    assert isinstance(model[1], FrozenBatchNorm)
    with torch.no_grad():
        model[1].running_mean += 3.0  # statistics of some other data
    d = run(model, val=None, metric=None, num_samples=64)
    assert d.layers["1"].norm_batch_size is None and d.layers["1"].mode == "frozen"
    assert flagged(d, "smell:frozen-stats", "1")
    assert not flagged(d, "smell:frozen-stats", "4") and not flagged(d, "ema", "1")


def test_correlated_samples_in_a_normalization_batch_are_found(healthy):
    order = TRAIN[1].argsort(stable=True)  # batches of one or two classes each
    sorted_train = (TRAIN[0][order], TRAIN[1][order])
    d = run(healthy, train=sorted_train, val=None, metric=None, num_samples=128,
            group_ids=lambda b: b[1])
    assert flagged(d, "smell:correlated-batch")
    d = run(healthy, val=None, metric=None, num_samples=128, group_ids=lambda b: b[1])
    assert not flagged(d, "smell:correlated-batch")
    assert [f.check for f in d.findings].count("smell:correlated-batch") == 1


def test_train_test_gap_matches_a_slow_reference():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 0.0]))  # a zero weight: that channel is left out
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    model = nn.Sequential(bn).eval()
    data = [torch.randn(8, 3, 5) * 2 + 1 for _ in range(6)]
    d = diagnose(model, data, num_samples=48, progress=False)  # comparisons on 24: 3 batches
    x_all = torch.cat(data).double()
    mu = x_all.mean((0, 2))
    var = x_all.var((0, 2), unbiased=False) * x_all[:, 0].numel() / (x_all[:, 0].numel() - 1)
    sq, n = 0.0, 0
    for x in data[:3]:
        x = x.double()[:, :2]
        z_batch = (x - x.mean((0, 2), keepdim=True)) / (
            x.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
        z_pop = (x - mu[:2, None]) / (var[:2, None] + 1e-5).sqrt()
        sq += float((z_batch - z_pop).square().sum())
        n += z_batch.numel()
    assert d.layers["0"].train_test_gap == pytest.approx(math.sqrt(sq / n), rel=1e-4)


# ------------------------------------------------------------------ the model is never changed
def model_state(model):
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [m.training for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for m in model.modules()],
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
    }


def assert_same(before, after):
    assert before["modes"] == after["modes"] and before["hooks"] == after["hooks"]
    assert before["momenta"] == after["momenta"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k


def mixed_mode_model(healthy):
    model = copy.deepcopy(healthy).train()
    model[4].eval()  # a BN frozen by its mode, as detection backbones do
    model[2].register_forward_hook(lambda *a: None)
    return model


def test_state_dict_modes_and_hooks_are_identical_after(healthy):
    model = mixed_mode_model(healthy)
    before = model_state(model)
    d = run(model, group_ids=lambda b: b[1])
    assert_same(before, model_state(model))
    assert d.layers["4"].mode == "frozen"  # eval-mode BN in a training model


def test_state_is_identical_after_an_error(healthy):
    model = mixed_mode_model(healthy)
    before = model_state(model)
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 25:  # in the comparison pass (after 12 + 8 batches of statistics)
            raise RuntimeError("boom")
        return m(batch[0])

    with pytest.raises(RuntimeError, match="boom"):
        run(model, forward=failing)
    assert_same(before, model_state(model))


# the project's rule (and precise_bn's for the same option): a wrong type is a TypeError
@pytest.mark.parametrize("bad, error", [(0, ValueError), (True, TypeError), ("many", TypeError),
                                        (2.0, TypeError)])
def test_bad_num_samples_is_a_clear_error(healthy, bad, error):
    with pytest.raises(error, match="num_samples"):
        diagnose(healthy, batches(*TRAIN, 32), num_samples=bad)


def test_one_shot_iterators_and_unnamed_dict_inputs_are_clear_errors(healthy):
    before = model_state(healthy)
    with pytest.raises(TypeError, match="train_data is a one-shot iterator"):
        diagnose(healthy, iter(batches(*TRAIN, 32)))
    with pytest.raises(TypeError, match="input_key"):
        diagnose(healthy, [{"x": TRAIN[0][:32]}], num_samples=32)
    assert_same(before, model_state(healthy))


def test_a_model_without_batchnorm_is_a_clear_error():
    with pytest.raises(ValueError, match="no BatchNorm"):
        diagnose(nn.Linear(2, 2), [torch.zeros(4, 2)])


# ------------------------------------------------------------------ outputs
def test_the_distance_plot_draws_markers_short_labels_and_the_legend_outside(healthy):
    """Issue 22: layers are categories: markers, no connecting line; labels short enough to
    read; the legend beside the axes, not over the data."""
    pytest.importorskip("matplotlib")
    from rethinkbn.diagnosis._report import LABEL_CHARS, _figure

    d = run(healthy, val=make_data(256, 1, contrast=0.3))
    fig = _figure(d)
    ax = fig.axes[0]
    markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", None, "")]
    assert markers and all(line.get_linestyle() == "None" for line in markers)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == len(d.layers)
    assert all(len(t) <= LABEL_CHARS for t in labels)
    assert all(t.get_rotation() == 45 for t in ax.get_xticklabels())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # right of the axes


def test_short_label_keeps_the_index_and_the_names_end():
    from rethinkbn.diagnosis._report import short_label

    assert short_label(3, "layer2.0.bn1") == "3 layer2.0.bn1"
    long = short_label(12, "backbone.stages.3.blocks.2.shortcut.norm", width=24)
    assert len(long) == 24 and long.startswith("12 ...") and long.endswith("shortcut.norm")


def test_summary_report_json_and_plot(healthy, tmp_path):
    d = run(healthy, val=make_data(256, 1, contrast=0.3))
    lines = d.summary().splitlines()
    assert lines[1].split()[:3] == ["severity", "check", "layer"]
    assert lines[2].split()[:2] == ["problem", "domain"]  # most important first
    paths = d.save(tmp_path)
    names = {p.name for p in paths}
    assert names == {"report.md", "diagnosis.json", "layer_distances.png"}
    assert (tmp_path / "layer_distances.png").stat().st_size > 1000
    blob = json.loads((tmp_path / "diagnosis.json").read_text())
    assert blob["findings"][0]["check"] == "domain" and set(blob["layers"]) == {"1", "4"}
    report = (tmp_path / "report.md").read_text()
    assert "## Findings" in report and "recompute_stats" in report
    assert "](layer_distances.png)" in report


# ------------------------------------------------------------------ the command line
SPEC = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(128, 1, 16), torch.randint(0, 2, (128,))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]
    return {"model": model, "train_data": loader, "eval_data": loader,
            "metric": lambda out, b: (out.argmax(1) == b[1]).float().mean()}

def extra():
    return {**build(), "colour": "blue"}

def pair():
    model, loader = build()["model"], build()["train_data"]
    return model, loader

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    name = f"diag_spec_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path, name
    sys.modules.pop(name, None)


def test_cli_diagnoses_a_spec_and_writes_the_report(spec_dir, capsys):
    tmp, name = spec_dir
    out = tmp / "out"
    assert main(["diagnose", f"{name}:build", "--out", str(out), "--num-samples", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("rethinkbn diagnose:") and "report:" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "diagnosis.json",
                                               "layer_distances.png"}
    assert json.loads((out / "diagnosis.json").read_text())["num_samples"] == 64


def test_cli_loads_a_checkpoint(spec_dir, capsys):
    tmp, name = spec_dir
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_var.fill_(50.0)  # stale statistics the report must see
    torch.save({"state_dict": model.state_dict()}, tmp / "ckpt.pt")
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "ckpt.pt"),
                 "--num-samples", "64"]) == 0
    assert "EMA off the population" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["no_colon"], "expected module:function"),
    (["not a module:build"], "expected module:function"),
    (["no_such_module_xyz:build"], "no module named"),
    (["{name}:missing"], "has no function 'missing'"),
    (["{name}:NOT_A_FUNCTION"], "has no function"),
    (["{name}:extra"], "'colour'"),
    (["{name}:build", "--num-samples", "0"], "--num-samples"),
    (["{name}:build", "--checkpoint", "nowhere.pt"], "--checkpoint"),
])
def test_cli_bad_arguments_exit_2_with_one_line(spec_dir, capsys, args, needle):
    _, name = spec_dir
    assert main(["diagnose", *(a.format(name=name) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and needle in captured.err


def test_cli_rejects_a_checkpoint_that_does_not_fit(spec_dir, capsys):
    tmp, name = spec_dir
    torch.save({"weight": torch.zeros(3)}, tmp / "bad.pt")
    assert main(["diagnose", f"{name}:build", "--checkpoint", str(tmp / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--checkpoint" in err


# ------------------------------------------------------------------ the example
def test_example_runs_at_tiny_size(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("diagnose_mnist1d",
                                                  ROOT / "examples" / "diagnose_mnist1d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = module.main(["--tiny", "--out", str(tmp_path / "out"), "--cache",
                     str(tmp_path / "cache")])
    assert d.layers and (tmp_path / "out" / "report.md").exists()


# ------------------------------------------------------------------ torch.distributed
def diagnose_on_this_rank():
    """Each rank: its own shard (rank 1 one batch shorter), a SyncBatchNorm and a torch BN."""
    import torch.distributed as dist

    from rethinkbn import SyncBatchNorm

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), SyncBatchNorm(4), nn.ReLU(),
                          nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    x, y = make_data(64 - 16 * rank, 10 + rank)
    before = model_state(model)
    d = diagnose(model, batches(x, y, 16), batches(x, y, 16), metric=accuracy, num_samples=64,
                 progress=False)
    assert_same(before, model_state(model))
    return d.to_dict()


def test_every_rank_returns_the_same_diagnosis_under_torch_distributed():
    from gloo_world import GlooWorld

    with GlooWorld(2) as world:
        rank0, rank1 = world.run(diagnose_on_this_rank)
    assert rank0 == rank1
    assert rank0["layers"]["1"]["norm_batch_size"] == 32
    assert "2 ranks" in rank0["layers"]["1"]["nbs_rule"]
    assert rank0["layers"]["4"]["norm_batch_size"] == 16
    assert rank0["num_samples"] == 64 + 48  # precise_bn's pass, summed over the ranks


def test_dict_batches_with_input_key_and_device(healthy):
    as_dicts = [{"x": x, "y": y} for x, y in batches(*TRAIN, 32)]
    d = diagnose(healthy, as_dicts, input_key="x", device="cpu", num_samples=128,
                 metric=lambda out, b: (out.argmax(1) == b["y"]).float().mean(), progress=False)
    reference = run(healthy, val=None, num_samples=128)
    assert d.metrics == reference.metrics and d.layers == reference.layers


def test_the_example_is_a_spec_the_cli_resolves_from_the_repository_root(monkeypatch):
    from rethinkbn.cli import _load_spec

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert _load_spec("examples.diagnose_mnist1d:build").__name__ == "build"
    finally:
        for name in ("examples.diagnose_mnist1d", "examples"):
            sys.modules.pop(name, None)


def test_a_compiled_model_gets_the_same_diagnosis_as_its_module(healthy):
    # precise_bn names the layers of the model inside torch.compile's wrapper; diagnose must use
    # the same names, or every layer's numbers silently come out NaN.
    plain = run(healthy, val=None, metric=None, num_samples=64)
    compiled = run(torch.compile(healthy), val=None, metric=None, num_samples=64)
    assert list(compiled.layers) == list(plain.layers) == ["1", "4"]
    for name, layer in plain.layers.items():
        assert compiled.layers[name] == layer
        assert math.isfinite(layer.ema_shift) and layer.values_per_channel is not None
