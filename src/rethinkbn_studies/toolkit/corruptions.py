"""1-D analogs of the ImageNet-C corruption families, at severities 1 to 5.

Each corruption maps a batch ``x`` of shape ``(N, L)`` or ``(N, C, *spatial)`` to a corrupted batch
of the same shape and dtype. Strengths are stated relative to each sample's own spread, so the
same severity means the same thing for standardized MNIST-1D signals and for images in [0, 1]::

    s(x)       = standard deviation of one sample (over every non-batch dim)
    m(x)       = mean of one sample

    gaussian_noise   x + sigma_k * s(x) * z,            z ~ N(0, 1) drawn from ``generator``
    contrast         m(x) + c_k * (x - m(x))             (ImageNet-C's contrast, c_k < 1)
    brightness       x + b_k * s(x)                     (a shift of the whole sample)
    blur             x convolved with a Gaussian of width w_k along each spatial dim
    quantization     x rounded to q_k levels over the sample's [min, max] (a lossy-coding
                     analog of ImageNet-C's JPEG / posterize)

The severity tables below grow monotonically, so the distance from the clean sample grows with
severity (on average over a batch for blur and quantization; for every sample for the others).
Only ``gaussian_noise`` is random; it draws from the given ``torch.Generator`` so a seed fixes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "PER_SAMPLE_AFFINE",
    "affine_residual",
    "SEVERITIES",
    "blur",
    "brightness",
    "contrast",
    "corrupt",
    "gaussian_noise",
    "quantization",
]

SEVERITIES = (1, 2, 3, 4, 5)

# One strength per severity 1..5 (index severity - 1).
_NOISE_SIGMA = (0.15, 0.3, 0.5, 0.8, 1.2)
_CONTRAST_FACTOR = (0.6, 0.45, 0.3, 0.2, 0.1)
_BRIGHTNESS_SHIFT = (0.25, 0.5, 0.75, 1.0, 1.5)
_BLUR_WIDTH = (0.5, 1.0, 1.5, 2.0, 3.0)
_QUANT_LEVELS = (16, 8, 5, 3, 2)


def _check(name: str, x: Tensor, severity: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected a batch of shape (N, L) or (N, C, *spatial), got shape "
            f"{tuple(x.shape)}"
        )
    if severity not in SEVERITIES:
        raise ValueError(f"{name}: severity must be one of {SEVERITIES}, got {severity!r}")


def _work(x: Tensor) -> Tensor:
    # Half-precision inputs are corrupted in float32 and cast back, so rounding does not
    # swamp the small severities.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _sample_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def _sample_std_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    std, mean = torch.std_mean(x, dim=_sample_dims(x), correction=0, keepdim=True)
    return std, mean


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Additive Gaussian noise: ``x + sigma_k * s(x) * z`` with ``z`` drawn from ``generator``."""
    _check("gaussian_noise", x, severity)
    w = _work(x)
    std, _ = _sample_std_mean(w)
    z = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
    return (w + _NOISE_SIGMA[severity - 1] * std * z).to(x.dtype)


def contrast(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Contrast reduction towards each sample's mean: ``m(x) + c_k * (x - m(x))``."""
    _check("contrast", x, severity)
    w = _work(x)
    _, mean = _sample_std_mean(w)
    return (mean + _CONTRAST_FACTOR[severity - 1] * (w - mean)).to(x.dtype)


def brightness(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """A shift of the whole sample by ``b_k`` of its own standard deviation: ``x + b_k * s(x)``."""
    _check("brightness", x, severity)
    w = _work(x)
    std, _ = _sample_std_mean(w)
    return (w + _BRIGHTNESS_SHIFT[severity - 1] * std).to(x.dtype)


def _gaussian_kernel(width: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, int(round(3 * width)))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / width) ** 2)
    return k / k.sum()


def blur(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur of width ``w_k`` samples along every spatial dim (reflect padding).

    For ``(N, L)`` the spatial dim is ``L``; for ``(N, C, *spatial)`` each dim from 2 on is blurred
    in turn (a separable blur), channel by channel.
    """
    _check("blur", x, severity)
    w = _work(x)
    kernel = _gaussian_kernel(_BLUR_WIDTH[severity - 1], w.dtype, w.device)
    spatial = (1,) if w.dim() == 2 else tuple(range(2, w.dim()))
    out = w
    for dim in spatial:
        moved = out.movedim(dim, -1)
        rows = moved.reshape(-1, 1, moved.size(-1))
        pad = min(kernel.numel() // 2, rows.size(-1) - 1)
        # Reflect padding needs pad < length; a longer kernel is cut to what the signal allows.
        k = kernel[kernel.numel() // 2 - pad: kernel.numel() // 2 + pad + 1]
        k = k / k.sum()
        padded = F.pad(rows, (pad, pad), mode="reflect") if pad > 0 else rows
        blurred = F.conv1d(padded, k.view(1, 1, -1))
        out = blurred.reshape(moved.shape).movedim(-1, dim)
    return out.to(x.dtype)


def quantization(x: Tensor, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform quantization to ``q_k`` levels spanning each sample's ``[min, max]``.

    ``step = (max - min) / (q_k - 1)``; ``x -> min + round((x - min) / step) * step``.
    """
    _check("quantization", x, severity)
    w = _work(x)
    dims = _sample_dims(w)
    lo = w.amin(dim=dims, keepdim=True)
    hi = w.amax(dim=dims, keepdim=True)
    step = (hi - lo) / (_QUANT_LEVELS[severity - 1] - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = lo + torch.round((w - lo) / safe) * safe
    return torch.where(step > 0, q, w).to(x.dtype)


Corruption = Callable[..., Tensor]

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "contrast": contrast,
    "brightness": brightness,
    "blur": blur,
    "quantization": quantization,
}


def corrupt(
    x: Tensor, name: str, severity: int, generator: torch.Generator | None = None
) -> Tensor:
    """Apply the corruption ``name`` (a key of :data:`CORRUPTIONS`) at ``severity`` (1-5).

    Returns a new tensor of the same shape and dtype; ``x`` is not modified.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](x, severity, generator=generator)


# The corruptions that are per-sample affine maps ``x -> a_i * x + b_i`` (one scalar gain and
# offset per sample): a network whose first layer is followed by BatchNorm with statistics of the
# corrupted domain undoes them almost by construction. ``affine_residual`` measures it.
PER_SAMPLE_AFFINE = frozenset({"contrast", "brightness"})


def affine_residual(x: Tensor, y: Tensor) -> float:
    """How far ``y`` is from a per-sample affine map of ``x``: the largest, over samples, of the
    least-squares residual of ``y_i ~ a_i * x_i + b_i`` relative to the spread of ``y_i``
    (0 for an exact affine map, about 1 when ``y_i`` has nothing affine in common with ``x_i``).
    Computed in float64 over every non-batch dim."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"affine_residual: expected two batches of the same shape (N, ...), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    a, b = x.double().flatten(1), y.double().flatten(1)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    slope = (ac * bc).sum(1, keepdim=True) / (ac * ac).sum(1, keepdim=True).clamp_min(1e-300)
    resid = (bc - slope * ac).norm(dim=1)
    return float((resid / bc.norm(dim=1).clamp_min(1e-300)).max())
