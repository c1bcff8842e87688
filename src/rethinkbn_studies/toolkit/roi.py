"""A detection-like 1-D task: images with a few objects, and a RoI sampler with correlated crops.

Each *image* is a signal of length ``image_length`` holding ``objects_per_image`` objects on a
textured background. An object is an MNIST-1D digit template (10 classes) stretched to
``window`` samples, with its own amplitude. Two things make the RoIs of one image correlated, as
the regions of one photograph are:

- **illumination**: the whole image is ``gain * signal + offset`` with a per-image gain and
  offset (every RoI of the image shares them);
- **co-occurrence**: with probability ``same_class_prob`` every object of an image has the same
  class (a street scene holds cars, a kitchen holds cups).

The RoI sampler (:func:`sample_rois`) yields, per image, ``rois_per_image`` windows of width
``window``: ``round(fg_fraction * rois_per_image)`` foreground windows around objects (offset by at
most ``window // 4``, so IoU >= 0.6) labelled with the object's class, and background windows
(IoU < 0.3 with every object) labelled ``num_classes`` (= 10, "background"). The RoIs of image
``i`` are rows ``i * rois_per_image .. (i + 1) * rois_per_image - 1``: contiguous, so a group of
contiguous RoIs is the set of RoIs of a group of images, which is how devices see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKGROUND",
    "NUM_OBJECT_CLASSES",
    "RoiBatch",
    "RoiImages",
    "RoiTaskConfig",
    "crop",
    "make_images",
    "sample_rois",
]

NUM_OBJECT_CLASSES = 10
BACKGROUND = NUM_OBJECT_CLASSES


@dataclass(frozen=True)
class RoiTaskConfig:
    """The generator's knobs; the defaults are the ones the leakage study uses."""

    image_length: int = 96
    window: int = 16
    objects_per_image: int = 2
    rois_per_image: int = 16
    fg_fraction: float = 0.5
    same_class_prob: float = 0.8
    gain_range: tuple[float, float] = (0.5, 2.0)
    offset_std: float = 0.7
    background_std: float = 0.35
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        needed = (2 * self.objects_per_image + 1) * self.window
        if self.image_length < needed:
            raise ValueError(
                f"RoiTaskConfig: image_length {self.image_length} is too short for "
                f"{self.objects_per_image} objects of width {self.window} with room for "
                f"background windows; expected >= {needed}"
            )
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(
                f"RoiTaskConfig: fg_fraction must be in [0, 1], got {self.fg_fraction}"
            )
        if self.rois_per_image < 1:
            raise ValueError(
                f"RoiTaskConfig: rois_per_image must be >= 1, got {self.rois_per_image}"
            )

    @property
    def num_foreground(self) -> int:
        """Foreground RoIs per image: ``round(fg_fraction * rois_per_image)``."""
        return int(round(self.fg_fraction * self.rois_per_image))


@dataclass(frozen=True)
class RoiImages:
    """``images (N, 1, L)``; ``starts (N, K)`` object start positions; ``labels (N, K)`` classes."""

    images: Tensor
    starts: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.size(0)


@dataclass(frozen=True)
class RoiBatch:
    """RoIs of a set of images, image by image: ``image (R,)``, ``starts (R,)``, ``labels (R,)``.

    ``image`` indexes the images the RoIs were sampled from (in the order they were passed).
    """

    image: Tensor
    starts: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.image.numel()


def _templates(window: int) -> Tensor:
    """The 10 MNIST-1D digit templates, stretched to ``window`` samples, unit peak amplitude."""
    from mnist1d.data import get_templates

    t = torch.tensor(get_templates()["x"], dtype=torch.float32)  # (10, 12)
    t = F.interpolate(t.unsqueeze(1), size=window, mode="linear", align_corners=True).squeeze(1)
    return t / t.abs().amax(dim=1, keepdim=True)


def _place(k: int, length: int, width: int, g: torch.Generator) -> list[int]:
    """``k`` start positions of non-overlapping width-``width`` objects, by rejection."""
    while True:
        starts = torch.randint(0, length - width + 1, (k,), generator=g).sort().values
        gaps = starts[1:] - starts[:-1]
        if k == 1 or bool((gaps >= width).all()):
            return starts.tolist()


def make_images(n: int, config: RoiTaskConfig, generator: torch.Generator) -> RoiImages:
    """``n`` images of the task, deterministic given ``generator``'s state."""
    g, c = generator, config
    L, w, k = c.image_length, c.window, c.objects_per_image
    templates = _templates(w)
    # Smooth background texture: white noise through a short moving average.
    white = torch.randn(n, 1, L + 8, generator=g)
    texture = F.avg_pool1d(white, kernel_size=9, stride=1) * 3.0 * c.background_std
    images = texture + c.noise_std * torch.randn(n, 1, L, generator=g)
    starts = torch.empty(n, k, dtype=torch.long)
    labels = torch.empty(n, k, dtype=torch.long)
    for i in range(n):
        main = int(torch.randint(0, NUM_OBJECT_CLASSES, (1,), generator=g))
        same = torch.rand(k, generator=g) < c.same_class_prob
        other = torch.randint(0, NUM_OBJECT_CLASSES, (k,), generator=g)
        labels[i] = torch.where(same, torch.full_like(other, main), other)
        starts[i] = torch.tensor(_place(k, L, w, g))
        amp = 1.0 + 0.6 * torch.rand(k, generator=g)
        for j in range(k):
            s = int(starts[i, j])
            images[i, 0, s: s + w] += amp[j] * templates[labels[i, j]]
    lo, hi = c.gain_range
    gain = torch.exp(
        torch.empty(n, 1, 1).uniform_(float(torch.log(torch.tensor(lo))),
                                      float(torch.log(torch.tensor(hi))), generator=g)
    )
    offset = c.offset_std * torch.randn(n, 1, 1, generator=g)
    return RoiImages(images=gain * images + offset, starts=starts, labels=labels)


def _iou(a: Tensor, b: Tensor, width: int) -> Tensor:
    """IoU of equal-width 1-D windows starting at ``a`` and ``b`` (broadcast)."""
    inter = (width - (a - b).abs()).clamp_min(0)
    return inter / (2 * width - inter)


def sample_rois(images: RoiImages, config: RoiTaskConfig, generator: torch.Generator) -> RoiBatch:
    """``config.rois_per_image`` RoIs per image, ``config.num_foreground`` of them foreground.

    Foreground: a uniformly chosen object, start offset uniformly in ``[-window//4, window//4]``
    (clamped to the image), labelled with its class. Background: a start drawn uniformly among
    the positions whose IoU with every object is < 0.3, labelled :data:`BACKGROUND`. Each image's
    RoIs are contiguous, foreground first (the head sees them as a set; order carries nothing).
    """
    c, g = config, generator
    n, k = images.starts.shape
    w, L = c.window, images.images.size(-1)
    positions = torch.arange(L - w + 1)
    nfg, nbg = c.num_foreground, c.rois_per_image - c.num_foreground
    jitter = w // 4
    all_starts, all_labels = [], []
    for i in range(n):
        obj = torch.randint(0, k, (nfg,), generator=g)
        shift = torch.randint(-jitter, jitter + 1, (nfg,), generator=g)
        fg_starts = (images.starts[i, obj] + shift).clamp(0, L - w)
        free = positions[(_iou(positions[:, None], images.starts[i][None, :], w) < 0.3).all(1)]
        if free.numel() == 0 and nbg > 0:
            raise ValueError(f"sample_rois: image {i} has no background position for window {w}")
        bg_starts = free[torch.randint(0, max(free.numel(), 1), (nbg,), generator=g)]
        all_starts += [fg_starts, bg_starts]
        all_labels += [images.labels[i, obj], torch.full((nbg,), BACKGROUND, dtype=torch.long)]
    image = torch.arange(n).repeat_interleave(c.rois_per_image)
    return RoiBatch(image=image, starts=torch.cat(all_starts), labels=torch.cat(all_labels))


def crop(features: Tensor, rois: RoiBatch, window: int) -> Tensor:
    """The ``(R, C, window)`` crops ``features[rois.image[r], :, s_r : s_r + window]``.

    ``features`` is ``(N, C, L)`` (an image batch or a stride-1 feature map of it); a gather, so
    gradients flow back to ``features``.
    """
    offsets = rois.starts[:, None] + torch.arange(window, device=features.device)  # (R, window)
    rows = features[rois.image.to(features.device)]  # (R, C, L)
    index = offsets[:, None, :].expand(-1, features.size(1), -1).to(features.device)
    return rows.gather(2, index)
