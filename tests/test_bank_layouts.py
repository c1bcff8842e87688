"""StatsBank (issue 18 item 5): a snapshot whose statistics are not dense floating-point tensors
is refused where it enters (``StatsBank[...] =``, ``load``, ``install``, ``use``), before any
buffer is written; ``install`` is all or nothing."""

import pytest
import torch
from torch import nn

from rethinkbn.population import StatsBank, capture_stats, install_stats


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.BatchNorm1d(3) for _ in range(4)))
    for layer in model:
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    return model


def odd_snapshot(model, kind):
    snapshot = {name: {k: v * 2 for k, v in stats.items()}
                for name, stats in capture_stats(model).items()}
    last = snapshot["3"]
    if kind == "sparse":
        last["running_var"] = last["running_var"].to_sparse()
    elif kind == "int":
        last["running_var"] = last["running_var"].round().to(torch.int64)
    elif kind == "meta":
        last["running_var"] = torch.empty(3, device="meta")
    return snapshot


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["sparse", "int", "meta"])
def test_install_stats_refuses_a_statistic_that_is_not_dense_float_and_changes_nothing(kind):
    model = make_model()
    before = state(model)
    with pytest.raises(ValueError, match=r"layer '3'.*running_var"):
        install_stats(model, odd_snapshot(model, kind))
    assert same(before, state(model))


@pytest.mark.parametrize("kind", ["sparse", "int", "meta"])
def test_a_bank_refuses_such_a_snapshot_when_it_is_stored(kind):
    model = make_model()
    with pytest.raises(ValueError, match=r"layer '3' running_var"):
        StatsBank({"odd": odd_snapshot(model, kind)})


def test_a_saved_bank_holding_a_sparse_tensor_is_not_a_bank_file(tmp_path):
    model = make_model()
    path = tmp_path / "bank.pt"
    snapshots = {"odd": odd_snapshot(model, "sparse")}
    torch.save({"format": "rethinkbn.StatsBank/1", "snapshots": snapshots}, path)
    with pytest.raises(ValueError, match=r"not a StatsBank file.*strided"):
        StatsBank.load(path)


def test_install_is_all_or_nothing_when_a_copy_fails_half_way():
    model = make_model()
    # a buffer whose in-place copy fails after the checks passed: an expanded (overlapping) view
    model[3].running_var = torch.ones(1).expand(3)
    before = state(model)
    with pytest.raises(RuntimeError):
        install_stats(model, odd_snapshot(model, "none"))
    assert same(before, state(model))
