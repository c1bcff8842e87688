"""`rethinkbn diagnose`: the user's own errors keep their traceback, bad arguments are one line
naming what is wrong (exit 2), a checkpoint is never loaded by running code and its errors say
what is wrong with the file, and the metric checks are either run (--metric) or said to be
skipped."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rethinkbn.cli import main

SPEC = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))

def loader():
    x, y = torch.randn(128, 1, 16), torch.randint(0, 2, (128,))
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]

def pair():
    return model(), loader()

def accuracy(out, batch):
    return (out.argmax(1) == batch[1]).float().mean()

def buggy():
    raise ValueError("the user's own bug")

def not_a_model():
    return {"model": "resnet50", "train_data": loader()}

def no_batchnorm():
    return nn.Sequential(nn.Linear(16, 2)), loader()

def with_options():
    from rethinkbn import PreciseBNOptions

    return {"model": model(), "train_data": loader(),
            "options": PreciseBNOptions(num_batches=2, progress=False)}
"""

BROKEN_MODULE = "raise ValueError('broken at import')\ndef build():\n    pass\n"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    name = f"diag_cli_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SPEC)
    (tmp_path / f"{name}_broken.py").write_text(BROKEN_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path, name
    for mod in (name, f"{name}_broken"):
        sys.modules.pop(mod, None)


def one_line_error(capsys):
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# ------------------------------------------------------------------ the user's own code
def test_an_error_inside_the_spec_function_keeps_its_traceback(spec):
    _, name = spec
    with pytest.raises(ValueError, match="the user's own bug"):
        main(["diagnose", f"{name}:buggy", "--num-samples", "32"])


def test_an_error_while_the_spec_module_imports_keeps_its_traceback(spec):
    _, name = spec
    with pytest.raises(ValueError, match="broken at import"):
        main(["diagnose", f"{name}_broken:build"])


@pytest.mark.parametrize("function, needle", [
    ("not_a_model", "returned a str as the model; expected a torch.nn.Module"),
    ("no_batchnorm", "without any BatchNorm layer"),
])
def test_a_spec_without_a_batchnorm_model_is_one_line(spec, capsys, function, needle):
    _, name = spec
    assert main(["diagnose", f"{name}:{function}", "--num-samples", "32"]) == 2
    assert needle in one_line_error(capsys)


# ------------------------------------------------------------------ --checkpoint
def test_a_garbage_checkpoint_says_what_is_wrong_with_the_file(spec, capsys):
    tmp, name = spec
    (tmp / "garbage.pt").write_bytes(b"these are not weights\n" * 20)
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "garbage.pt")]) == 2
    line = one_line_error(capsys)
    assert "not a PyTorch checkpoint" in line and "weights_only" not in line


def test_an_empty_or_truncated_checkpoint_is_named(spec, capsys):
    tmp, name = spec
    (tmp / "empty.pt").write_bytes(b"")
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "empty.pt")]) == 2
    assert "is empty" in one_line_error(capsys)
    torch.save(nn.Linear(2, 2).state_dict(), tmp / "full.pt")
    data = (tmp / "full.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "cut.pt")]) == 2
    line = one_line_error(capsys)
    assert "cut.pt: is a truncated or damaged checkpoint" in line and "weights_only" not in line


class Payload:
    """Unpickling it would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(spec, capsys):
    tmp, name = spec
    marker = tmp / "marker"
    torch.save({"state_dict": Payload(str(marker))}, tmp / "evil.pt")
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "evil.pt")]) == 2
    line = one_line_error(capsys)
    assert "never run code" in line and "weights_only" not in line
    assert not marker.exists()


def test_a_checkpoint_with_missing_keys_names_them_and_leaves_the_model(spec, capsys):
    tmp, name = spec
    sys.path.insert(0, str(tmp))
    module = __import__(name)
    state = module.model().state_dict()
    del state["1.running_var"], state["5.bias"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp / "partial.pt")
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "partial.pt")]) == 2
    line = one_line_error(capsys)
    assert "missing keys '1.running_var', '5.bias'" in line
    assert "unexpected keys 'extra.weight'" in line


def test_a_checkpoint_with_a_wrong_shape_names_the_key_and_both_shapes(spec, capsys):
    tmp, name = spec
    sys.path.insert(0, str(tmp))
    state = __import__(name).model().state_dict()
    state["1.weight"] = torch.ones(5)
    torch.save({"model": state}, tmp / "shape.pt")
    assert main(["diagnose", f"{name}:pair", "--checkpoint", str(tmp / "shape.pt")]) == 2
    assert "'1.weight' is (5,) in the file, (4,) in the model" in one_line_error(capsys)


# ------------------------------------------------------------------ --metric
def test_without_a_metric_the_output_says_the_metric_checks_were_skipped(spec, capsys):
    _, name = spec
    assert main(["diagnose", f"{name}:pair", "--num-samples", "64"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "no metric given" in out


def test_metric_option_runs_the_metric_checks(spec, capsys):
    tmp, name = spec
    out_dir = tmp / "out"
    assert main(["diagnose", f"{name}:pair", "--metric", f"{name}:accuracy", "--num-samples",
                 "64", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "no metric given" not in printed
    import json

    metrics = json.loads((out_dir / "diagnosis.json").read_text())["metrics"]
    assert "train_data, training behaviour" in metrics


@pytest.mark.parametrize("metric, needle", [("nocolon", "--metric 'nocolon': expected"),
                                            ("{name}:missing", "has no function 'missing'")])
def test_a_bad_metric_option_is_one_line(spec, capsys, metric, needle):
    _, name = spec
    assert main(["diagnose", f"{name}:pair", "--metric", metric.format(name=name)]) == 2
    assert needle in one_line_error(capsys)


def test_a_spec_may_return_options_whose_budget_applies_without_num_samples(spec, capsys):
    tmp, name = spec
    out_dir = tmp / "out"
    assert main(["diagnose", f"{name}:with_options", "--out", str(out_dir)]) == 0
    import json

    assert json.loads((out_dir / "diagnosis.json").read_text())["num_samples"] == 2 * 16
    assert main(["diagnose", f"{name}:with_options", "--num-samples", "64", "--out",
                 str(out_dir)]) == 0  # the command line's budget wins
    assert json.loads((out_dir / "diagnosis.json").read_text())["num_samples"] == 64
