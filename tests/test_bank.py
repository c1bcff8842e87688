"""Statistics banks: recompute_stats snapshots, switching a model between them, one file."""

import pytest
import torch
from torch import nn

from rethinkbn.population import StatsBank, capture_stats, precise_bn, recompute_stats


def model_and_domains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6, 4), nn.BatchNorm1d(4)).eval()
    g = torch.Generator().manual_seed(1)
    source = [torch.randn(8, 2, 8, generator=g) for _ in range(3)]
    contrast = [x * 0.2 + 1 for x in source]
    return model, source, contrast


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recompute_stats_returns_what_precise_bn_installs_and_changes_nothing():
    model, source, _ = model_and_domains()
    before = state(model)
    snapshot = recompute_stats(model, source, num_batches=3)
    assert_bit_identical(before, state(model))
    precise_bn(model, source, num_batches=3)
    assert_bit_identical({f"{n}.{k}": v for n, s in snapshot.items() for k, v in s.items()},
                         {k: v for k, v in state(model).items() if "running" in k})


def test_recompute_stats_installs_when_asked():
    model, source, _ = model_and_domains()
    snapshot = recompute_stats(model, source, num_batches=3, install=True)
    assert torch.equal(model[5].running_var, snapshot["5"]["running_var"])


def test_use_switches_statistics_and_restores_bit_identical_state():
    model, source, contrast = model_and_domains()
    bank = StatsBank()
    bank.capture(model, "source")
    bank["contrast"] = recompute_stats(model, contrast, num_batches=3)
    before = state(model)
    x = contrast[0]
    expected = nn.Sequential(*model)  # same modules: build the expected output by installing
    with bank.use(model, "contrast") as m:
        assert m is model
        assert torch.equal(model[1].running_mean, bank["contrast"]["1"]["running_mean"])
        inside = model(x)
    assert_bit_identical(before, state(model))
    precise_bn(expected, contrast, num_batches=3)
    torch.testing.assert_close(inside, expected(x), rtol=0, atol=0)


def test_use_restores_on_an_exception_in_the_block():
    model, _, contrast = model_and_domains()
    bank = StatsBank({"contrast": recompute_stats(model, contrast, num_batches=3)})
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"), bank.use(model, "contrast"):
        raise RuntimeError("boom")
    assert_bit_identical(before, state(model))


def test_switching_copies_into_the_same_tensors():
    model, _, contrast = model_and_domains()
    bank = StatsBank({"contrast": recompute_stats(model, contrast, num_batches=3)})
    pointers = [b.data_ptr() for b in model.buffers()]
    bank.install(model, "contrast")
    assert [b.data_ptr() for b in model.buffers()] == pointers


def test_the_bank_keeps_copies_not_views_of_the_model():
    model, _, _ = model_and_domains()
    bank = StatsBank()
    bank.capture(model, "source")
    model[1].running_mean.add_(1)
    assert torch.equal(bank["source"]["1"]["running_mean"], torch.zeros(3))


def test_save_and_load_round_trip_in_one_file(tmp_path):
    model, source, contrast = model_and_domains()
    bank = StatsBank({"source": recompute_stats(model, source, num_batches=3),
                      "contrast": recompute_stats(model, contrast, num_batches=3)})
    bank.save(tmp_path / "stats.pt")
    loaded = StatsBank.load(tmp_path / "stats.pt")
    assert loaded.names == ["source", "contrast"]
    for name in bank:
        for layer, buffers in bank[name].items():
            for key, value in buffers.items():
                assert torch.equal(loaded[name][layer][key], value)


def test_a_snapshot_of_another_model_is_refused_and_changes_nothing():
    model, _, _ = model_and_domains()
    other = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(5))
    bank = StatsBank({"other": capture_stats(other)})
    before = state(model)
    with pytest.raises(ValueError, match=r"missing \['5'\], not in the model \['0'\]"):
        bank.install(model, "other")
    model_like = {"1": capture_stats(model)["1"], "5": {"running_mean": torch.zeros(7),
                                                       "running_var": torch.ones(7)}}
    with pytest.raises(ValueError, match=r"'5' \(BatchNorm1d\) expects running_mean of shape "
                                         r"\(4,\), the snapshot has \(7,\)"):
        StatsBank({"bad": model_like}).install(model, "bad")
    assert_bit_identical(before, state(model))


def test_an_unknown_name_lists_the_bank():
    with pytest.raises(KeyError, match=r"no snapshot named 'noise'.*\['source'\]"):
        StatsBank({"source": {}})["noise"]


def test_a_snapshot_without_both_statistics_is_refused_naming_the_layer():
    bank = StatsBank()
    with pytest.raises(ValueError, match=r"'bad'.*layer '1' needs tensors.*got \['running_mean'\]"):
        bank["bad"] = {"1": {"running_mean": torch.zeros(3)}}
    assert "bad" not in bank


def _saved_bank(tmp_path):
    bank = StatsBank({"a": {"bn": {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}}})
    path = tmp_path / "bank.pt"
    bank.save(path)
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "junk"])
def test_load_of_a_damaged_file_names_it_and_says_it_is_not_a_stats_bank(tmp_path, damage):
    path = _saved_bank(tmp_path)
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "junk": b"hello, not a tensor file\n" * 8}[damage])
    with pytest.raises(ValueError, match=rf"{path.name}: not a StatsBank file"):
        StatsBank.load(path)


@pytest.mark.parametrize("content", [
    [1, 2],
    {"format": "rethinkbn.StatsBank/1"},
    {"format": "rethinkbn.StatsBank/1", "snapshots": {"a": [1, 2]}},
    {"format": "rethinkbn.StatsBank/1", "snapshots": {"a": {"bn": {"running_mean": 1}}}},
    {"format": "other", "snapshots": {}},
], ids=["list", "no-snapshots", "snapshot-not-dict", "not-tensors", "other-format"])
def test_load_of_a_file_with_other_content_says_it_is_not_a_stats_bank(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"{path.name}: not a StatsBank file"):
        StatsBank.load(path)


def test_load_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        StatsBank.load(tmp_path / "missing.pt")
