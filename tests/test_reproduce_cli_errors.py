"""`rethinkbn reproduce`: bad data and bad --only end in one line naming the file or option and
the problem (exit 2), before any study runs; a study named twice runs once."""

import json
import pickle
import re

import numpy as np
import pytest

from rethinkbn.cli import main
from rethinkbn_studies.contract.base import Study
from rethinkbn_studies.infra import harness


@pytest.fixture
def studies_run(monkeypatch):
    """The names of the studies that started; each stands in for a study and stops at once."""
    seen = []

    def fake(name):
        def run(ctx):
            seen.append(name)
            raise RuntimeError("stop: only whether it ran matters")

        return Study(name, "stands in", run)

    monkeypatch.setattr(harness, "get_study", fake)
    return seen


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rethinkbn reproduce: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert re.search(w, err), (w, err)
    return err


def _cifar(root, sizes=(6, 6, 6)):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in zip(["data_batch_1", "data_batch_2", "test_batch"], sizes, strict=True):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (root / name).write_bytes(pickle.dumps(batch))


def _images(root, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{i}.png")


def _truncated(root):
    _cifar(root)
    path = root / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    return path, "truncated"


def _not_a_dict(root):
    _cifar(root)
    path = root / "test_batch"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    return path, "got a list"


def _counts_differ(root):
    _cifar(root)
    path = root / "data_batch_1"
    batch = {b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 5}
    path.write_bytes(pickle.dumps(batch))
    return path, "6 images but 5 labels"


def _bad_shape(root):
    _cifar(root)
    path = root / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((6, 100), np.uint8), b"labels": [0] * 6}))
    return path, r"\(N, 3072\)"


def _bad_label(root):
    _cifar(root)
    path = root / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    return path, "0..9"


def _corrupt_png(root):
    _images(root)
    path = root / "dog" / "1.png"
    path.write_bytes(path.read_bytes()[:40])
    return path, "cannot be read as an image"


def _one_image_per_class(root):
    _images(root, per_class=1)
    return root / "cat", "1 image; each class needs at least 2"


def _val_class_missing(root):
    _images(root / "train")
    _images(root / "val")
    for p in (root / "val" / "dog").iterdir():
        p.unlink()
    (root / "val" / "dog").rmdir()
    return root / "val" / "dog", "missing"


@pytest.mark.parametrize("damage", [_truncated, _not_a_dict, _counts_differ, _bad_shape,
                                    _bad_label, _corrupt_png, _one_image_per_class,
                                    _val_class_missing])
def test_bad_data_is_one_line_naming_the_file_before_any_study(tmp_path, capsys, studies_run,
                                                               damage):
    path, problem = damage(tmp_path / "data")
    assert main(["reproduce", "--tiny", "--data", str(tmp_path / "data"), "--only", "nbs",
                 "--out", str(tmp_path / "out"), "--jobs", "1"]) == 2
    _one_line(capsys, re.escape(str(path)), problem)
    assert studies_run == [] and not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("only", [",,", "", " , "])
def test_only_without_a_name_is_an_error_not_every_study(tmp_path, capsys, studies_run, only):
    assert main(["reproduce", "--tiny", "--only", only, "--out", str(tmp_path)]) == 2
    _one_line(capsys, "--only", "no study named")
    assert studies_run == []


def test_only_naming_a_study_twice_runs_it_once_in_the_order_named(tmp_path, tiny_data,
                                                                   studies_run):
    assert main(["reproduce", "--tiny", "--data", tiny_data, "--only", "nbs,leakage,nbs",
                 "--out", str(tmp_path / "out"), "--jobs", "1"]) == 1  # the stand-ins fail
    assert studies_run == ["nbs", "leakage"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["studies"]) == ["nbs", "leakage"]
    assert "--only nbs,leakage " in results["environment"]["command"]


def test_the_harness_dedupes_and_refuses_an_empty_selection(tmp_path, tiny_data, studies_run):
    harness.reproduce(["nbs", "nbs"], tiny=True, data=tiny_data, out_dir=tmp_path,
                      progress=lambda it=None, **k: it)
    assert studies_run == ["nbs"]
    with pytest.raises(ValueError, match="no study named"):
        harness.reproduce([], tiny=True, data=tiny_data, out_dir=tmp_path)
