"""The statistics core against float64 references computed the obvious way."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rethinkbn.stats import Moments, segment_var_mean


def reference(x: torch.Tensor):
    """Mean and biased variance per channel, in float64, by flattening every non-channel dim."""
    flat = x.double().transpose(0, 1).reshape(x.size(1), -1)
    mean = flat.mean(1)
    return flat.size(1), mean, ((flat - mean[:, None]) ** 2).mean(1)


@settings(max_examples=30, deadline=None)
@given(
    rank=st.integers(2, 5),
    n=st.integers(1, 6),
    c=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_moments_of_any_rank_match_float64_reference(rank, n, c, dtype):
    shape = (n, c) + (3,) * (rank - 2)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    m = Moments.of(x)
    count, mean, var = reference(x)
    assert m.count.dtype == torch.float64 and m.shape == (c,)
    assert torch.all(m.count == count)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(m.mean, mean, rtol=tol, atol=tol)
    torch.testing.assert_close(m.var(), var, rtol=tol, atol=tol)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5), c=st.integers(1, 3))
def test_merge_equals_moments_of_the_concatenation(sizes, c):
    parts = [torch.randn(s, c, 2, dtype=torch.float64) * 5 + 2 for s in sizes]
    merged = Moments.zeros(c)
    for p in parts:
        merged = merged.merge(Moments.of(p) if p.numel() else Moments.zeros(c))
    whole = torch.cat(parts)
    if whole.size(0) == 0:
        assert torch.all(merged.count == 0)
        return
    count, mean, var = reference(whole)
    assert torch.all(merged.count == count)
    torch.testing.assert_close(merged.mean, mean)
    torch.testing.assert_close(merged.var(), var)


def test_segment_merge_equals_a_loop_over_segments():
    x = torch.randn(12, 3, 4, dtype=torch.float64)
    ids = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2])
    rows = Moments(
        torch.full((12, 3), 4.0, dtype=torch.float64), x.mean(2), x.var(2, correction=0) * 4
    )
    merged = rows.segment_merge(ids, 4)
    for d in range(3):
        _, mean, var = reference(x[ids == d])
        torch.testing.assert_close(merged.mean[d], mean)
        torch.testing.assert_close(merged.var()[d], var)
    assert torch.all(merged.count[3] == 0)


def test_moments_of_groups_equal_a_loop_over_groups():
    x = torch.randn(12, 3, 5, dtype=torch.float64)
    grouped = Moments.of(x, num_groups=4)
    assert grouped.shape == (4, 3)
    for g in range(4):
        count, mean, var = reference(x[3 * g: 3 * g + 3])
        assert torch.all(grouped.count[g] == count)
        torch.testing.assert_close(grouped.mean[g], mean)
        torch.testing.assert_close(grouped.var()[g], var)
    with pytest.raises(ValueError, match="does not split"):
        Moments.of(x, num_groups=5)


def test_an_empty_batch_has_zero_count():
    m = Moments.of(torch.randn(0, 3, 4))
    assert m.shape == (3,) and torch.all(m.count == 0)


def test_segment_var_mean_equals_a_loop_over_segments_and_is_differentiable():
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 0, 1, 1, 3, 0, 1, 3, 3])
    var, mean, count, xc = segment_var_mean(x, ids, 4)
    for d in (0, 1, 3):
        n, ref_mean, ref_var = reference(x[ids == d].detach())
        assert count[d] == n
        torch.testing.assert_close(mean[d], ref_mean)
        torch.testing.assert_close(var[d], ref_var)
    assert count[2] == 0 and torch.all(var[2] == 0)
    torch.testing.assert_close(xc, x - mean[ids][:, :, None])
    assert torch.autograd.gradcheck(lambda t: segment_var_mean(t, ids, 4)[0], (x,))


def test_unbiased_variance_and_undefined_cases():
    m = Moments.of(torch.tensor([[1.0], [3.0]]))
    assert m.var().item() == 1.0 and m.var(unbiased=True).item() == 2.0
    assert torch.isnan(Moments.of(torch.tensor([[1.0]])).var(unbiased=True)).all()
    assert torch.isnan(Moments.zeros(2).var()).all()


@pytest.mark.parametrize("unbiased", [False, True])
def test_from_var_mean_rebuilds_the_moments_of_a_biased_or_unbiased_variance(unbiased):
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    count, mean, var = reference(x)
    if unbiased:
        var = var * count / (count - 1)
    m = Moments.from_var_mean(count, mean, var, unbiased=unbiased)
    expected = Moments.of(x)
    for field in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(m, field), getattr(expected, field))


def test_large_mean_small_spread_is_robust_where_naive_formula_fails():
    torch.manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(4096, 2, dtype=torch.float64)
    x = x64.float()
    _, _, true_var = reference(x)  # the variance of the float32 values, computed in float64
    robust = Moments.of(x).var()
    naive = (x * x).mean(0) - x.mean(0) ** 2  # E[x^2] - E[x]^2 in float32
    torch.testing.assert_close(robust, true_var, rtol=1e-3, atol=0)
    assert ((naive.double() - true_var).abs() / true_var > 0.5).any()
