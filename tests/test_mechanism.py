"""The between-sample share and the k-sample variance bias (rethinkbn.population.mechanism)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn.population import (
    between_sample_share,
    expected_variance_ratio,
    variance_decomposition,
)


def slow_share(x: torch.Tensor) -> torch.Tensor:
    """A loop over channels and samples, float64: var of per-sample means / var of all values."""
    x = x.double().reshape(x.size(0), x.size(1), -1)
    out = []
    for c in range(x.size(1)):
        means = [x[i, c].mean() for i in range(x.size(0))]
        m = torch.stack(means)
        out.append(((m - m.mean()) ** 2).mean() / ((x[:, c] - x[:, c].mean()) ** 2).mean())
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 6), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), max_size=3),
       seed=st.integers(0, 1000))
def test_share_matches_slow_reference(n: int, c: int, spatial: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g) * 3 + torch.randn(n, c, *([1] * len(spatial)),
                                                                      generator=g)
    torch.testing.assert_close(between_sample_share(x), slow_share(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spatial", [(64,), (8, 8), (4, 4, 4)])
def test_planted_share(spatial: tuple[int, ...]) -> None:
    # offset variance 1, within-sample noise variance 3: rho = 1/4 (up to sampling error)
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.randn(n, 2, *([1] * len(spatial)), generator=g) + \
        torch.randn(n, 2, *spatial, generator=g) * math.sqrt(3)
    share = between_sample_share(x)
    # between = 1 + 3/L (noise of the per-sample mean), total = 4
    expected = (1 + 3 / 64) / 4
    torch.testing.assert_close(share, torch.full((2,), expected, dtype=torch.float64), atol=0.03,
                               rtol=0)


def test_expected_ratio_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(1)
    rho, k, length, groups = 0.3, 2, 16, 40000
    a = torch.randn(groups, k, 1, generator=g, dtype=torch.float64) * math.sqrt(rho)
    e = torch.randn(groups, k, length, generator=g, dtype=torch.float64) * math.sqrt(1 - rho)
    v = (a + e).reshape(groups, -1).var(dim=1, unbiased=False).mean()
    assert float(v) == pytest.approx(expected_variance_ratio(rho, k, length), abs=0.01)
    assert expected_variance_ratio(0.0, 1, 1) == 0.0  # one value: no variance
    with pytest.raises(ValueError, match="norm_batch_size"):
        expected_variance_ratio(0.5, 0, 4)


def test_share_is_one_for_2d_inputs_and_errors() -> None:
    torch.testing.assert_close(between_sample_share(torch.randn(8, 3)),
                               torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no samples"):
        between_sample_share(torch.randn(0, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        between_sample_share(torch.tensor([[[1.0, float("nan")]], [[0.0, 1.0]]]))
    with pytest.raises(ValueError, match="shape"):
        between_sample_share(torch.randn(5))


def test_variance_decomposition_over_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv1d(3, 3, 3),
                          nn.BatchNorm1d(3))
    model.train()
    data = [torch.randn(5, 2, 20) for _ in range(3)] + [torch.randn(0, 2, 20)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = variance_decomposition(model, data, norm_batch_size=2)
    assert [r.name for r in out] == ["1", "4"]
    assert model.training  # flags restored
    assert not any(m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # reference: the BN inputs of the eval-mode model, concatenated
    model.eval()
    with torch.no_grad():
        x = torch.cat(data)
        h1 = model[0](x)
        h2 = model[3](model[2](model[1](h1)))
    model.train()
    torch.testing.assert_close(out[0].share, slow_share(h1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out[1].share, slow_share(h2), rtol=1e-9, atol=1e-12)
    assert out[0].values_per_sample == 18
    r = out[0]
    # the measured share already holds 1/L of the within-sample noise: the bias is -s/k (the old
    # -(s/k + (1-s)/(kL)) counted that noise twice)
    assert r.variance_bias == pytest.approx(-r.mean_share / 2)


def test_variance_decomposition_errors_name_the_layer() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no samples"):
        variance_decomposition(model, [torch.randn(0, 2, 4)], norm_batch_size=2)
    bad = torch.randn(4, 2, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'1'.*NaN"):
        variance_decomposition(model, [bad], norm_batch_size=2)
    assert model.training and not model[1]._forward_pre_hooks
    with pytest.raises(ValueError, match="no BatchNorm"):
        variance_decomposition(nn.Linear(2, 2), [torch.randn(2, 2)], norm_batch_size=2)


def test_group_variance_ratio_is_what_k_sample_groups_of_the_measured_share_show():
    # Samples with correlated values (an offset plus a within-sample ramp): the measured share s
    # gives the mean biased variance of k-sample groups as 1 - s/k, checked against the groups.
    from rethinkbn.population.mechanism import LayerVariance, group_variance_ratio

    g = torch.Generator().manual_seed(0)
    n, length, k = 4096, 6, 4
    x = (2.0 * torch.randn(n, 1, 1, generator=g, dtype=torch.float64)
         + torch.linspace(-1, 1, length, dtype=torch.float64)
         + torch.randn(n, 1, length, generator=g, dtype=torch.float64))
    s = float(between_sample_share(x)[0])
    groups = x.reshape(n // k, k * length)
    measured = float(groups.var(dim=1, unbiased=False).mean() / x.var(unbiased=False))
    assert abs(group_variance_ratio(s, k) - measured) < 0.01
    layer = LayerVariance("bn", torch.tensor([s], dtype=torch.float64), length, k)
    assert layer.variance_bias == pytest.approx(group_variance_ratio(s, k) - 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        group_variance_ratio(s, 0)
