"""Files the harness reads never run code: run cache entries, CIFAR-10 pickles, the leakage
study's torchrun results. Each payload below writes a marker file if it is ever unpickled."""

import json
import pickle
import re
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from rethinkbn.cli import main
from rethinkbn_studies.contract.base import RunContext, Study, Task
from rethinkbn_studies.infra import harness
from rethinkbn_studies.infra.cache import RunCache, load_result, save_result
from rethinkbn_studies.studies import leakage
from rethinkbn_studies.toolkit.data import data_fingerprint, load_cifar10, load_data
from rethinkbn_studies.toolkit.roi import RoiTaskConfig


class Payload:
    """Unpickled, it writes ``marker``: what a hostile file would do with a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _poisoned(path, marker, how):
    if how == "torch.save":  # the cache's format before: what a colleague's old cache holds
        torch.save({"config": {"seed": 0}, "result": Payload(marker)}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:  # a zip (what the new format is) whose member is a pickled object array
        with zipfile.ZipFile(path, "w") as z:
            with z.open("structure.npy", "w") as f:
                np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)


# ----------------------------------------------------------------------------- run cache
@pytest.mark.parametrize("how", ["torch.save", "pickle", "npz-object"])
def test_a_poisoned_cache_entry_never_runs_and_is_recomputed(tmp_path, how):
    marker = tmp_path / "marker"
    cache = RunCache(tmp_path / "cache")
    path = cache.path({"seed": 0})
    path.parent.mkdir()
    _poisoned(path, marker, how)
    with pytest.warns(RuntimeWarning, match=rf"{path.name} cannot be read.*running it again"):
        result = cache.get_or_run({"seed": 0}, lambda: {"err": 1.0})
    assert not marker.exists()
    assert result == {"err": 1.0} and (cache.hits, cache.misses) == (0, 1)
    assert (path.parent / f"{path.name}.corrupt").exists()  # moved aside, kept for a look
    assert RunCache(tmp_path / "cache").get({"seed": 0}) == {"err": 1.0}


def _square(ctx, x):
    return {"sq": torch.tensor(float(x * x))}


def test_a_poisoned_entry_among_good_ones_costs_one_run_in_run_all(tmp_path):
    marker = tmp_path / "marker"
    ctx = RunContext(quick=True, seeds=(0,), out_dir=tmp_path, device=torch.device("cpu"),
                     cache=RunCache(tmp_path / "cache"), progress=lambda it=None, **k: it,
                     dataset=lambda: None)
    tasks = [Task({"x": x}, _square, (x,)) for x in (2, 3)]
    first = ctx.run_all(tasks)
    _poisoned(ctx.cache.path({"x": 3}), marker, "torch.save")
    ctx.cache.hits = ctx.cache.misses = 0
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        again = ctx.run_all(tasks)
    assert not marker.exists()
    assert (ctx.cache.hits, ctx.cache.misses) == (1, 1)
    assert [float(r["sq"]) for r in again] == [float(r["sq"]) for r in first] == [4.0, 9.0]


def test_an_entry_holding_another_configs_result_is_a_miss(tmp_path):
    cache = RunCache(tmp_path)
    cache.put({"seed": 1}, {"err": 1.0})
    cache.path({"seed": 1}).rename(cache.path({"seed": 0}))  # a file copied under a wrong name
    with pytest.warns(RuntimeWarning, match="another configuration"):
        assert cache.get({"seed": 0}) is None


def _same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t  # noqa: E731
        assert torch.equal(bits(a), bits(b))  # bit for bit: NaN payloads and -0.0 included
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
def test_every_tensor_dtype_and_shape_round_trips_bit_for_bit(tmp_path, dtype):
    base = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 7
    value = {"t": base.to(dtype), "scalar": base[0, 0].to(dtype), "empty": base[:0].to(dtype),
             "strided": base.to(dtype).t()}
    save_result(tmp_path / "r.pt", value)
    back, _ = load_result(tmp_path / "r.pt")
    _same(value, back)


def test_nested_results_round_trip_with_their_types(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    value = {"err": 1.5, "nan": float("nan"), "inf": float("-inf"), "n": 3, "ok": True,
             "none": None, "name": "x", 7: [1, (2.0, "a")], (1, 2): {"nested": [[]]},
             "state": dict(model.state_dict()), "np": np.arange(6.0).reshape(2, 3),
             "np_scalar": np.float32(2.5), "grad": torch.ones(2, requires_grad=True) * 2}
    save_result(tmp_path / "r.pt", value, meta={"seed": 0})
    back, meta = load_result(tmp_path / "r.pt")
    assert meta == {"seed": 0}
    _same({**value, "grad": value["grad"].detach()}, back)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    fresh.load_state_dict(back["state"])


@pytest.mark.parametrize("value", [{"fn": len}, {"obj": Payload("x")},
                                   {"sparse": torch.eye(2).to_sparse()},
                                   {"objects": np.array([None], dtype=object)}])
def test_a_result_the_format_cannot_hold_is_refused_and_writes_nothing(tmp_path, value):
    with pytest.raises(TypeError, match="cached result"):
        RunCache(tmp_path).put({"seed": 0}, value)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- CIFAR pickles
def _batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)), b"batch_label": b"training batch 1 of 5",
            b"filenames": [f"{i}.png".encode() for i in range(n)]}


def _write_cifar(root, protocol=pickle.DEFAULT_PROTOCOL):
    root.mkdir(exist_ok=True)
    for i, name in enumerate(["data_batch_1", "data_batch_2", "test_batch"]):
        (root / name).write_bytes(pickle.dumps(_batch(seed=i), protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_pickles_of_every_protocol_still_load(tmp_path, protocol):
    _write_cifar(tmp_path, protocol)
    data = load_cifar10(tmp_path)
    want = torch.from_numpy(np.array(_batch(seed=2)[b"labels"], dtype=np.int64))
    assert data.train_x.shape == (8, 3, 32, 32) and torch.equal(data.val_y, want)


class SneakyDtype:
    """A numpy-looking global that is not on the list."""

    def __reduce__(self):
        return np.load, ("/nonexistent", True)


@pytest.mark.parametrize("payload", ["exec", "nested", "numpy.load", "codecs"])
def test_a_poisoned_cifar_batch_is_refused_naming_the_file(tmp_path, payload):
    marker = tmp_path / "marker"
    _write_cifar(tmp_path / "cifar")
    target = tmp_path / "cifar" / "data_batch_2"
    blob = {"exec": Payload(marker), "nested": {**_batch(), b"x": [Payload(marker)]},
            "numpy.load": {b"data": SneakyDtype(), b"labels": []}}.get(payload)
    if payload == "codecs":  # an allowed name with arguments CIFAR never uses
        raw = pickle.dumps(b"\xff", protocol=2).replace(b"latin1", b"rot13_")
        target.write_bytes(raw)
    else:
        target.write_bytes(pickle.dumps(blob))
    with pytest.raises(ValueError, match=rf"{re.escape(str(target))}: refused") as err:
        load_cifar10(tmp_path / "cifar")
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_reproduce_refuses_a_poisoned_cifar_folder_in_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    _write_cifar(tmp_path / "cifar")
    target = tmp_path / "cifar" / "test_batch"
    target.write_bytes(pickle.dumps(Payload(marker)))
    assert main(["reproduce", "--tiny", "--data", str(tmp_path / "cifar"), "--only",
                 "precise-batch", "--out", str(tmp_path / "out"), "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err and "refused" in err, err
    assert not marker.exists() and not (tmp_path / "out" / "report.md").exists()


# ----------------------------------------------------------------------------- torchrun results
def test_leakage_reads_its_workers_result_without_running_code(tmp_path, monkeypatch):
    marker = tmp_path / "marker"

    def poisoned_worker(cmd, timeout_s, env=None):  # stands in for torchrun's rank 0
        out = cmd[cmd.index("--out") + 1]
        torch.save({"state_dict": Payload(marker), "train_loss": 0.0}, out)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(leakage, "run_command", poisoned_worker)
    scale = leakage.LeakageScale(num_train_images=16, num_test_images=8, epochs=1,
                                 precise_batches=2, task=RoiTaskConfig(rois_per_image=4))
    with pytest.raises(RuntimeError, match=r"state\.pt, which cannot be read"):
        leakage.train_on_ranks("syncbn", scale, seed=0, ranks=2)
    assert not marker.exists()


# ----------------------------------------------------------------------------- data fingerprint
def test_the_fingerprint_follows_the_contents_not_the_path_or_mtime(tmp_path):
    _write_cifar(tmp_path / "a")
    _write_cifar(tmp_path / "b")
    assert data_fingerprint("mnist1d") is None and data_fingerprint("mnist1d:40") is None
    first = data_fingerprint(str(tmp_path / "a"))
    assert first == data_fingerprint(str(tmp_path / "b")) and first.startswith("sha256:")
    target = tmp_path / "a" / "test_batch"
    target.touch()  # mtime only
    assert data_fingerprint(str(tmp_path / "a")) == first
    batch = _batch(seed=2)
    batch[b"labels"][0] = (batch[b"labels"][0] + 1) % 10  # one label, same size
    target.write_bytes(pickle.dumps(batch))
    assert data_fingerprint(str(tmp_path / "a")) != first


def test_changing_a_data_file_is_a_cache_miss_and_the_report_names_the_data(tmp_path,
                                                                          monkeypatch):
    """--data DIR runs are keyed by the folder's contents, not its path."""
    seen = []

    def study(ctx):
        data = ctx.dataset()
        seen.append(ctx.cache.get_or_run({"study": "demo", "data": ctx.data_spec},
                                         lambda: {"val": data.val_y.clone()}))
        raise RuntimeError("stop: only the cache matters here")

    monkeypatch.setattr(harness, "get_study", lambda name: Study(name, "demo", study))
    data = tmp_path / "cifar"
    _write_cifar(data)
    out = tmp_path / "out"

    def run():
        harness.reproduce(["demo"], tiny=True, data=str(data), out_dir=out,
                          progress=lambda it=None, **k: it, log=None)
        env = json.loads((out / "results.json").read_text())["environment"]
        return env["cache"], env["data_fingerprint"]

    first, fp1 = run()
    assert first == {"dir": str(out / "cache"), "hits": 0, "misses": 1}
    assert run()[0]["hits"] == 1
    batch = _batch(seed=2)
    batch[b"labels"][0] = (batch[b"labels"][0] + 1) % 10
    (data / "test_batch").write_bytes(pickle.dumps(batch))
    third, fp2 = run()
    assert third["misses"] == 1 and fp1 != fp2
    assert torch.equal(seen[-1]["val"], load_data(str(data)).val_y)  # the new labels
    assert not torch.equal(seen[0]["val"], seen[-1]["val"])
    assert f"(content fingerprint {fp2})" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- the siblings
@pytest.mark.parametrize("how", ["pickle", "npz-object"])
def test_a_poisoned_mnist1d_data_cache_is_regenerated_without_running(tmp_path, how):
    from rethinkbn_studies.toolkit.data import load_mnist1d

    marker = tmp_path / "marker"
    first = load_mnist1d(40, cache_dir=tmp_path)
    path = tmp_path / "mnist1d-40-42.npz"
    _poisoned(path, marker, how)
    with pytest.warns(RuntimeWarning, match=rf"{path.name} cannot be read"):
        again = load_mnist1d(40, cache_dir=tmp_path)
    assert not marker.exists() and torch.equal(again.train_x, first.train_x)


def test_a_poisoned_stats_bank_snapshot_is_refused_without_running(tmp_path):
    from rethinkbn.population import StatsBank

    marker = tmp_path / "marker"
    torch.save({"format": "x", "snapshots": Payload(marker)}, tmp_path / "bank.pt")
    with pytest.raises(ValueError, match="not a StatsBank file"):
        StatsBank.load(tmp_path / "bank.pt")
    assert not marker.exists()


SPEC = """
import torch
from torch import nn

def build():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return model, [torch.randn(8, 3) for _ in range(4)]
"""


def test_a_poisoned_diagnose_checkpoint_is_refused_without_running(tmp_path, monkeypatch,
                                                                    capsys):
    import sys

    marker = tmp_path / "marker"
    name = f"trust_spec_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    torch.save({"state_dict": Payload(marker)}, tmp_path / "ckpt.pt")
    try:
        assert main(["diagnose", f"{name}:build", "--checkpoint", str(tmp_path / "ckpt.pt")]) == 2
    finally:
        sys.modules.pop(name, None)
    assert "--checkpoint" in capsys.readouterr().err and not marker.exists()
