"""Moments at the edges (issue 18 item 4): empty operands, extreme spreads, wrong types.

Reference: float64 statistics of the same values (``x.double()``), and the non-empty operand.
"""

from __future__ import annotations

import pytest
import torch

from rethinkbn.stats import Moments
from rethinkbn.stats.collectives import _pack, _unpack

NAN = float("nan")


def full() -> Moments:
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 4
    return Moments.of(x)


def empty_with(value: float) -> Moments:
    z = torch.zeros(3, dtype=torch.float64)
    return Moments(z, torch.full((3,), value, dtype=torch.float64), torch.full_like(z, value))


def assert_same(a: Moments, b: Moments) -> None:
    for name in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


@pytest.mark.parametrize("value", [0.0, 5.0, NAN, float("inf")])
def test_merging_with_an_empty_operand_is_the_identity_whatever_its_mean(value):
    m, e = full(), empty_with(value)
    assert_same(m.merge(e), m)
    assert_same(e.merge(m), m)
    both = e.merge(e)
    assert both.count.eq(0).all() and not both.mean.isnan().any()


def test_an_empty_batch_s_moments_merge_as_the_identity():
    m = full()
    mean = var = torch.full((3,), NAN)  # what a kernel gives for no samples
    empty = Moments.from_var_mean(0, mean, var)
    assert_same(m.merge(empty), m)


def test_segment_merge_and_total_ignore_empty_rows_whatever_their_mean():
    m = full()
    rows = Moments(torch.stack([m.count, torch.zeros(3, dtype=torch.float64)]),
                   torch.stack([m.mean, torch.full((3,), NAN, dtype=torch.float64)]),
                   torch.stack([m.m2, torch.full((3,), NAN, dtype=torch.float64)]))
    assert_same(rows.total(), m)
    merged = rows.segment_merge(torch.tensor([0, 0]), 2)
    assert_same(Moments(merged.count[0], merged.mean[0], merged.m2[0]), m)
    assert merged.count[1].eq(0).all() and not merged.mean[1].isnan().any()


def test_the_cross_rank_sums_ignore_an_empty_rank_s_mean():
    # all_reduce_moments packs (n, n * mean, m2 + n * mean^2): an empty rank's NaN mean must add 0
    m, e = full(), empty_with(NAN)
    flat = _pack([m]) + _pack([e])  # what the all_reduce sums
    (back,) = _unpack(flat, [m])
    torch.testing.assert_close(back.mean, m.mean)
    torch.testing.assert_close(back.m2, m.m2)


def extreme(spread: float, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(*shape, dtype=torch.float64, generator=g) * spread + 3 * spread).to(dtype)


@pytest.mark.parametrize("spread", [1e20, 1e-25, 1e30, 1.0])
@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 5, 4)], ids=["2d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_spreads_in_float32_and_bfloat16_match_float64(spread, shape, dtype):
    x = extreme(spread, shape, dtype)
    got, ref = Moments.of(x), Moments.of(x.double())
    assert torch.isfinite(got.m2).all() and (got.m2 > 0).all()
    torch.testing.assert_close(got.mean, ref.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.var(), ref.var(), rtol=1e-5, atol=0)


def test_extreme_spreads_per_group():
    x = extreme(1e20, (8, 3, 4), torch.float32)
    got, ref = Moments.of(x, num_groups=4), Moments.of(x.double(), num_groups=4)
    torch.testing.assert_close(got.var(), ref.var(), rtol=1e-5, atol=0)


def test_a_channels_last_input_gives_the_same_moments():
    x = extreme(1e20, (4, 3, 5, 6), torch.float32)
    a, b = Moments.of(x), Moments.of(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(b.m2).all()
    torch.testing.assert_close(b.var(), a.var(), rtol=1e-6, atol=0)


def test_non_finite_inputs_still_give_non_finite_moments():
    x = torch.randn(8, 3, 4)
    x[0, 1, 0] = NAN
    x[1, 2, 0] = float("inf")
    m = Moments.of(x)
    assert m.mean[1].isnan() and not torch.isfinite(m.m2[2])
    assert torch.isfinite(m.m2[0])


@pytest.mark.parametrize("value", [2.0, True, "2"])
def test_num_groups_of_a_wrong_type_raises_the_project_s_type_error(value):
    with pytest.raises(TypeError, match=r"Moments.of: num_groups must be a positive int"):
        Moments.of(torch.randn(4, 3), num_groups=value)


@pytest.mark.parametrize("value", [0, -2])
def test_num_groups_below_one_raises_value_error(value):
    with pytest.raises(ValueError, match=r"Moments.of: num_groups must be a positive int"):
        Moments.of(torch.randn(4, 3), num_groups=value)
