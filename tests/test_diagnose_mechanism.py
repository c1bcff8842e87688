"""diagnose reports the mechanism of Sec. 4 per layer (issue 20 item 1): the between-sample share
of a BatchNorm input's variance and the expected variance ratio E[var_k]/var at the layer's
training NBS, and says whether a small NBS is a train/test inconsistency or only noise.

Inputs are planted with a known share: sample ``i``, channel ``c``, position ``j`` holds
``sqrt(rho_c) * a_ic + sqrt(1 - rho_c) * e_icj`` with i.i.d. standard normal ``a`` (the
per-sample offsets) and ``e``. The mean of a sample's ``L`` values carries ``1/L`` of the noise
too, so the between-sample share (variance of the per-sample means over the total) is
``rho_c + (1 - rho_c) / L``, and a ``k``-sample group's variance is expected short of the
population's by ``share / k``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rethinkbn import GhostBatchNorm, diagnose
from rethinkbn.diagnosis._compare import share_moments
from rethinkbn.population import (
    INCONSISTENCY_THRESHOLD,
    between_sample_share,
    expected_variance_ratio,
)

LENGTH = 32  # values per sample and channel


def planted(rho: list[float], samples: int, batch: int, seed: int = 0, length: int = LENGTH
            ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.tensor(rho, dtype=torch.float64)[None, :, None]
    a = torch.randn(samples, len(rho), 1, generator=g, dtype=torch.float64)
    e = torch.randn(samples, len(rho), length, generator=g, dtype=torch.float64)
    x = (r.sqrt() * a + (1 - r).sqrt() * e + 2.0).float()
    return list(x.split(batch))


def slow_share(batches: list[torch.Tensor]) -> list[float]:
    """The reference: a loop over samples and channels in float64, biased variances."""
    x = torch.cat(batches).double()
    out = []
    for c in range(x.size(1)):
        values = x[:, c].reshape(-1)
        means = torch.stack([x[i, c].mean() for i in range(x.size(0))])
        total = ((values - values.mean()) ** 2).mean()
        between = ((means - means.mean()) ** 2).mean()
        out.append(float(between / total))
    return out


def model(nbs: int | None) -> nn.Module:
    layer = nn.BatchNorm1d(3) if nbs is None else GhostBatchNorm(3, norm_batch_size=nbs)
    return nn.Sequential(layer).eval()


def planted_share(rho: float, length: int = LENGTH) -> float:
    return rho + (1 - rho) / length


def slow_group_ratio(batches: list[torch.Tensor], k: int) -> float:
    """The reference for E[var_k]/var: the mean biased variance of contiguous k-sample groups
    over the variance of all values, per channel, averaged over channels."""
    x = torch.cat(batches).double()
    ratios = []
    for c in range(x.size(1)):
        total = x[:, c].reshape(-1).var(unbiased=False)
        groups = [x[i:i + k, c].reshape(-1).var(unbiased=False) for i in range(0, len(x), k)]
        ratios.append(float(torch.stack(groups).mean() / total))
    return sum(ratios) / len(ratios)


def run(rho: list[float], nbs: int | None, samples: int = 1024, batch: int = 64,
        length: int = LENGTH):
    data = planted(rho, samples, batch, length=length)
    # the comparisons (where the share is measured) read the first half of the budget
    return diagnose(model(nbs), data, num_samples=samples, progress=False), data[
        : samples // 2 // batch]


def by_check(d, check):
    return [f for f in d.findings if f.check == check]


def test_the_share_is_the_between_sample_variance_over_the_total_of_the_inputs_seen():
    d, seen = run([0.05, 0.5, 0.9], nbs=2)
    row = d.layers["0"]
    reference = slow_share(seen)
    assert row.between_share == pytest.approx(sum(reference) / 3, rel=1e-6)
    planted_mean = sum(planted_share(r) for r in (0.05, 0.5, 0.9)) / 3
    assert row.between_share == pytest.approx(planted_mean, abs=0.08)
    # the library's formula at the offsets' share rho = (s L - 1) / (L - 1) is 1 - s / k
    s = sum(reference) / 3
    rho = (s * LENGTH - 1) / (LENGTH - 1)
    assert row.variance_ratio == pytest.approx(expected_variance_ratio(rho, 2, LENGTH), rel=1e-6)
    assert row.variance_ratio == pytest.approx(1 - s / 2, rel=1e-6)


@pytest.mark.parametrize("rho", [0.02, 0.3, 0.8])
@pytest.mark.parametrize("length", [1, 4, 32])
def test_the_share_recovers_planted_per_sample_offsets(rho, length):
    d, _ = run([rho] * 3, nbs=4, samples=4096, length=length)
    assert d.layers["0"].between_share == pytest.approx(planted_share(rho, length), abs=0.05)
    assert d.layers["0"].variance_ratio == pytest.approx(
        1 - rho / 4 - (1 - rho) / (4 * length), abs=0.02)


@pytest.mark.parametrize("rho", [0.1, 0.6])
def test_the_variance_ratio_is_what_k_sample_groups_of_the_data_show(rho):
    # few values per sample, where counting the within-sample noise twice would show
    d, seen = run([rho] * 3, nbs=2, samples=8192, length=4)
    assert d.layers["0"].variance_ratio == pytest.approx(slow_group_ratio(seen, 2), abs=0.015)


def test_a_small_nbs_with_a_large_share_is_an_inconsistency():
    d, _ = run([0.9] * 3, nbs=2)
    model_level = [f for f in by_check(d, "nbs-mechanism") if f.layer is None]
    assert [f.severity for f in model_level] == ["warning"], d.summary()
    assert "train/test inconsistency" in model_level[0].message
    assert model_level[0].value == pytest.approx(1 - d.layers["0"].variance_ratio)
    assert model_level[0].value > INCONSISTENCY_THRESHOLD == model_level[0].threshold
    assert [f.layer for f in by_check(d, "nbs-mechanism") if f.severity == "warning"] == [
        "0", None]


def test_a_small_nbs_with_a_small_share_is_only_noise():
    d, _ = run([0.02] * 3, nbs=2)
    (finding,) = by_check(d, "nbs-mechanism")
    assert finding.severity == "ok" and "noise" in finding.message, d.summary()
    assert finding.value < INCONSISTENCY_THRESHOLD


def test_a_large_nbs_cannot_be_inconsistent_and_is_not_checked():
    # |E[var_k]/var - 1| <= 1/k: at k = 64 it is below the threshold whatever the share
    d, _ = run([0.9] * 3, nbs=None)
    assert d.layers["0"].norm_batch_size == 64
    assert not by_check(d, "nbs-mechanism")
    assert math.isfinite(d.layers["0"].between_share)


def test_the_mechanism_is_in_the_table_the_markdown_and_the_json(tmp_path):
    d, _ = run([0.5] * 3, nbs=2)
    assert "between-sample share" in d.summary() and "E[var_k]/var" in d.summary()
    d.save(tmp_path)
    blob = json.loads((tmp_path / "diagnosis.json").read_text())
    assert blob["layers"]["0"]["between_share"] == pytest.approx(d.layers["0"].between_share)
    assert blob["layers"]["0"]["variance_ratio"] == pytest.approx(d.layers["0"].variance_ratio)
    assert blob["thresholds"]["variance_bias"] == INCONSISTENCY_THRESHOLD
    report = (tmp_path / "report.md").read_text()
    assert "between_share" in report and "variance_ratio" in report
    assert "nbs-mechanism" in report


def test_a_frozen_layer_has_a_share_but_no_variance_ratio():
    data = planted([0.5] * 3, 256, 32)
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)).train()
    net[1].eval()  # frozen by its mode
    d = diagnose(net, data, num_samples=256, progress=False)
    assert math.isfinite(d.layers["1"].between_share)
    assert d.layers["1"].norm_batch_size is None and math.isnan(d.layers["1"].variance_ratio)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), spatial=st.lists(st.integers(1, 5), max_size=2),
       offset=st.sampled_from([0.0, 1e4]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 1000))
def test_share_moments_match_a_float64_loop(n, c, spatial, offset, dtype, seed):
    """The one-pass moments against the obvious reference on the same (rounded) values: a loop
    over samples and channels in float64, whatever the dtype, shape or mean."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 0.5
         + torch.randn(n, c, *([1] * len(spatial)), generator=g, dtype=torch.float64) + offset)
    if dtype in (torch.float16, torch.bfloat16):
        x = x - offset  # half precision cannot hold 1e4 + a small spread
    x = x.to(dtype)
    total, between = share_moments(x)
    ref = x.double().reshape(n, c, -1)
    for ch in range(c):
        values = ref[:, ch].reshape(-1)
        means = torch.stack([ref[i, ch].mean() for i in range(n)])
        assert float(total.count[ch]) == values.numel() and float(between.count[ch]) == n
        assert float(total.mean[ch]) == pytest.approx(float(values.mean()), rel=1e-12)
        assert float(total.m2[ch]) == pytest.approx(
            float(((values - values.mean()) ** 2).sum()), rel=1e-5, abs=1e-9)
        assert float(between.m2[ch]) == pytest.approx(
            float(((means - means.mean()) ** 2).sum()), rel=1e-9, abs=1e-12)
    if n > 1:
        share = between.var() / total.var()
        torch.testing.assert_close(share, between_sample_share(x), rtol=1e-4, atol=1e-9)


class First(nn.Module):
    """A BatchNorm layer (named ``bn``) that sees the model input itself."""

    def __init__(self, bn: nn.Module, domain: int | None = None) -> None:
        super().__init__()
        self.bn, self.domain = bn, domain

    def forward(self, x):
        return self.bn(x) if self.domain is None else self.bn(x, self.domain)


def every_layer():
    from rethinkbn import DomainBatchNorm, FrozenBatchNorm, SyncBatchNorm
    from rethinkbn.distributed import PerDeviceBatchNorm

    return {
        "torch BatchNorm1d": (First(nn.BatchNorm1d(3)), 32),
        "GhostBatchNorm": (First(GhostBatchNorm(3, norm_batch_size=4)), 4),
        "FrozenBatchNorm": (First(FrozenBatchNorm(3)), None),
        "DomainBatchNorm": (First(DomainBatchNorm(3, num_domains=2), domain=1), 32),
        "SyncBatchNorm": (First(SyncBatchNorm(3)), 32),
        "PerDeviceBatchNorm": (First(PerDeviceBatchNorm(3, num_devices=4)), 8),
    }


@pytest.mark.parametrize("kind", list(every_layer()))
def test_every_layer_kind_reports_the_share_of_its_input(kind):
    net, nbs = every_layer()[kind]
    data = planted([0.3, 0.6, 0.9], 256, 32)
    d = diagnose(net.eval(), data, num_samples=256, progress=False)
    row = d.layers["bn"]
    seen = torch.cat(data[:4])  # the comparisons: half the budget
    assert row.between_share == pytest.approx(float(between_sample_share(seen).mean()), rel=1e-6)
    assert row.norm_batch_size == nbs
    if nbs is None:
        assert math.isnan(row.variance_ratio)
    else:
        assert row.variance_ratio == pytest.approx(1 - row.between_share / nbs, rel=1e-6)


def test_empty_batches_add_nothing_to_the_share():
    data = planted([0.5] * 3, 256, 32)
    with_empty = [data[0], data[0][:0], *data[1:]]
    got = diagnose(model(2), with_empty, num_samples=256, progress=False).layers["0"]
    want = diagnose(model(2), data, num_samples=256, progress=False).layers["0"]
    assert got.between_share == want.between_share
    assert got.variance_ratio == want.variance_ratio
