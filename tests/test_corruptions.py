"""The corruption families: shape, dtype, severity monotonicity, determinism, and references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rethinkbn_studies.toolkit.corruptions import (
    CORRUPTIONS,
    PER_SAMPLE_AFFINE,
    SEVERITIES,
    affine_residual,
    corrupt,
)


def signals(n: int = 64, length: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth random signals with a nonzero mean, like standardized MNIST-1D samples."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length)
    freq = torch.rand(n, 1, generator=g) * 6 + 1
    phase = torch.rand(n, 1, generator=g) * 6.28
    x = torch.sin(freq * 6.28 * t + phase) + 0.3 * torch.randn(n, length, generator=g)
    return (x + 0.5).unsqueeze(1)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(CORRUPTIONS)),
    severity=st.sampled_from(SEVERITIES),
    shape=st.sampled_from([(3, 40), (2, 1, 40), (2, 3, 17), (2, 2, 6, 5)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_corruption_preserves_shape_and_dtype(name, severity, shape, dtype):
    x = torch.randn(shape).to(dtype)
    y = corrupt(x, name, severity, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_distance_from_clean_grows_with_severity(name):
    x = signals()
    dist = []
    for s in SEVERITIES:
        y = corrupt(x, name, s, generator=torch.Generator().manual_seed(1))
        dist.append(float((y - x).square().mean().sqrt()))
    assert all(a < b for a, b in zip(dist, dist[1:], strict=False)), dist


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_same_generator_seed_gives_the_same_corruption(name):
    x = signals()
    a = corrupt(x, name, 3, generator=torch.Generator().manual_seed(7))
    b = corrupt(x, name, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_different_seeds_give_different_noise():
    x = signals()
    a = corrupt(x, "gaussian_noise", 3, generator=torch.Generator().manual_seed(1))
    b = corrupt(x, "gaussian_noise", 3, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_input_is_not_modified(name):
    x = signals()
    before = x.clone()
    corrupt(x, name, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


def test_contrast_keeps_each_sample_mean_and_scales_its_spread():
    x = signals().double()
    y = corrupt(x, "contrast", 2)
    torch.testing.assert_close(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)))
    ratio = y.std(dim=(1, 2)) / x.std(dim=(1, 2))
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    assert ratio[0] < 1


def test_blur_matches_a_loop_with_reflected_borders():
    x = torch.randn(2, 1, 23, dtype=torch.float64)
    y = corrupt(x, "blur", 2)
    width = 1.0  # severity 2
    radius = int(round(3 * width))
    w = [math.exp(-0.5 * (t / width) ** 2) for t in range(-radius, radius + 1)]
    w = [v / sum(w) for v in w]
    length = x.size(-1)
    for n in range(2):
        for i in range(length):
            acc = 0.0
            for t, wt in zip(range(-radius, radius + 1), w, strict=True):
                j = i + t
                j = -j if j < 0 else (2 * (length - 1) - j if j >= length else j)
                acc += wt * x[n, 0, j].item()
            assert abs(acc - y[n, 0, i].item()) < 1e-12


def test_quantization_matches_rounding_each_sample_to_its_levels():
    x = torch.randn(3, 1, 30, dtype=torch.float64)
    levels = 5  # severity 3
    y = corrupt(x, "quantization", 3)
    for n in range(3):
        lo, hi = x[n].min().item(), x[n].max().item()
        grid = [lo + k * (hi - lo) / (levels - 1) for k in range(levels)]
        for v, q in zip(x[n].flatten().tolist(), y[n].flatten().tolist(), strict=True):
            assert abs(q - min(grid, key=lambda g: abs(g - v))) < 1e-9


def test_unknown_corruption_and_bad_severity_are_named_in_the_error():
    x = signals(2)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of .* got 6"):
        corrupt(x, "blur", 6)
    with pytest.raises(TypeError, match="floating-point"):
        corrupt(torch.ones(2, 5, dtype=torch.long), "blur", 1)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 5])
def test_declared_per_sample_affine_corruptions_are_exactly_those_measured_affine(name,
                                                                                  severity):
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = corrupt(x, name, severity, generator=torch.Generator().manual_seed(1))
    residual = affine_residual(x, y)
    if name in PER_SAMPLE_AFFINE:
        assert residual < 1e-9
    else:
        assert residual > 1e-2


def test_affine_residual_is_about_one_for_unrelated_signals_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    assert affine_residual(torch.randn(8, 500, generator=g), torch.randn(8, 500, generator=g)) > 0.9
    with pytest.raises(ValueError, match="same shape"):
        affine_residual(torch.zeros(2, 3), torch.zeros(2, 4))
