"""ema_report: EMA vs precise statistics, and the EMA mean among per-batch means (Fig. 2)."""

import torch
from torch import nn

from rethinkbn.population import ema_report, precise_bn


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2),
                          nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, generator=g) * 2 + 5 for _ in range(6)]
    return model, data


def test_after_precise_bn_on_the_same_data_the_distances_vanish():
    model, data = model_and_data()
    precise_bn(model, data, num_batches=6)
    report = ema_report(model, data, num_batches=6)
    for layer in report.layers.values():
        assert layer.mean_shift < 1e-5 and layer.std_log_ratio < 1e-5


def test_a_stale_ema_mean_lies_outside_every_batch_mean():
    model, data = model_and_data()
    model[1].running_mean.fill_(-100.0)
    report = ema_report(model, data, num_batches=6)
    layer = report.layers["1"]
    assert layer.calls == 6 and layer.outside_fraction == 1.0 and layer.mean_percentile == 0.0
    assert layer.mean_shift > 10


def test_the_percentile_matches_a_loop_over_batch_means():
    model, data = model_and_data()
    model[1].running_mean.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(0) for x in data])  # (batches, C)
    ema = model[1].running_mean
    expected_percentile = sum(
        sum(float(means[b, c] < ema[c]) for b in range(6)) / 6 for c in range(4)
    ) / 4
    expected_outside = sum(
        float(ema[c] < means[:, c].min() or ema[c] > means[:, c].max()) for c in range(4)
    ) / 4
    layer = ema_report(model, data, num_batches=6).layers["1"]
    assert abs(layer.mean_percentile - expected_percentile) < 1e-12
    assert abs(layer.outside_fraction - expected_outside) < 1e-12


def test_the_model_is_left_exactly_as_it_was():
    model, data = model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema_report(model, data, num_batches=6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prints_a_table_with_one_row_per_layer():
    model, data = model_and_data()
    text = str(ema_report(model, data, num_batches=6))
    assert "| layer | batches |" in text and "\n| 1 | 6 |" in text and "\n| 4 | 6 |" in text


def test_domain_batchnorm_is_compared_per_domain_and_absent_domains_are_left_out():
    from rethinkbn.layers import DomainBatchNorm

    bn = DomainBatchNorm(2, num_domains=3)
    bn.running_mean[1].fill_(50.0)  # far from domain 1's batch means; domain 2 never appears
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 2, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])) for _ in range(4)]
    layer = ema_report(bn, data, num_batches=4, forward=lambda m, b: m(*b)).layers["<model>"]
    outside = []
    for d in (0, 1):  # domain 2 never appears: left out
        for c in range(2):
            means = torch.stack([x[ids == d, c].mean() for x, ids in data])
            ema = bn.running_mean[d, c]
            outside.append(bool(ema < means.min() or ema > means.max()))
    assert layer.calls == 4
    assert layer.outside_fraction == sum(outside) / 4 and outside[2:] == [True, True]
