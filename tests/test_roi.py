"""The RoI task: images, the sampler's foreground fraction and labels, determinism, crops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rethinkbn_studies.toolkit.roi import (
    BACKGROUND,
    RoiTaskConfig,
    crop,
    make_images,
    sample_rois,
)


def iou(a: int, b: int, w: int) -> float:
    inter = max(0, w - abs(a - b))
    return inter / (2 * w - inter)


def task(n=6, seed=0, **kw):
    cfg = RoiTaskConfig(**kw)
    images = make_images(n, cfg, torch.Generator().manual_seed(seed))
    rois = sample_rois(images, cfg, torch.Generator().manual_seed(seed + 100))
    return cfg, images, rois


@settings(max_examples=15, deadline=None)
@given(rois_per_image=st.integers(1, 20), fg_fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_every_image_gets_the_fixed_foreground_fraction(rois_per_image, fg_fraction):
    cfg, images, rois = task(n=4, rois_per_image=rois_per_image, fg_fraction=fg_fraction)
    labels = rois.labels.view(4, rois_per_image)
    per_image_fg = (labels != BACKGROUND).sum(1)
    assert torch.all(per_image_fg == round(fg_fraction * rois_per_image))


def test_rois_of_one_image_are_contiguous_rows():
    cfg, images, rois = task()
    expected = torch.arange(len(images)).repeat_interleave(cfg.rois_per_image)
    assert torch.equal(rois.image, expected)


def test_foreground_rois_overlap_an_object_of_their_class():
    cfg, images, rois = task(n=8)
    rows = zip(rois.image.tolist(), rois.starts.tolist(), rois.labels.tolist(), strict=True)
    for i, s, y in rows:
        if y == BACKGROUND:
            continue
        objects = zip(images.starts[i].tolist(), images.labels[i].tolist(), strict=True)
        assert any(iou(s, o, cfg.window) >= 0.5 and c == y for o, c in objects)


def test_background_rois_overlap_no_object():
    cfg, images, rois = task(n=8)
    rows = zip(rois.image.tolist(), rois.starts.tolist(), rois.labels.tolist(), strict=True)
    for i, s, y in rows:
        if y == BACKGROUND:
            assert all(iou(s, o, cfg.window) < 0.3 for o in images.starts[i].tolist())


def test_objects_do_not_overlap_and_fit_in_the_image():
    cfg, images, _ = task(n=20)
    for row in images.starts.tolist():
        row = sorted(row)
        assert row[0] >= 0 and row[-1] + cfg.window <= cfg.image_length
        assert all(b - a >= cfg.window for a, b in zip(row, row[1:], strict=False))


def test_same_seeds_give_the_same_images_and_rois():
    _, im_a, roi_a = task(seed=3)
    _, im_b, roi_b = task(seed=3)
    assert torch.equal(im_a.images, im_b.images) and torch.equal(im_a.labels, im_b.labels)
    assert torch.equal(roi_a.starts, roi_b.starts) and torch.equal(roi_a.labels, roi_b.labels)


def test_different_seeds_give_different_images():
    _, im_a, _ = task(seed=3)
    _, im_b, _ = task(seed=4)
    assert not torch.equal(im_a.images, im_b.images)


def test_crop_equals_slicing_each_roi():
    cfg, images, rois = task(n=3)
    feats = torch.randn(3, 4, cfg.image_length)
    out = crop(feats, rois, cfg.window)
    for r in range(len(rois)):
        i, s = int(rois.image[r]), int(rois.starts[r])
        assert torch.equal(out[r], feats[i, :, s: s + cfg.window])


def test_too_short_an_image_is_rejected_with_the_length_needed():
    with pytest.raises(ValueError, match="image_length 40 is too short.*expected >= 80"):
        RoiTaskConfig(image_length=40, window=16, objects_per_image=2)
