"""The paper's published numbers (Wu & Johnson 2021, arXiv 2105.07576), for the report.

Copied from the paper's figures and tables; values read off a plot (about +-0.2) are marked
``approx=True`` where they are used. ImageNet numbers are ResNet-50 top-1 error (%), lower is
better; detection numbers are COCO AP, higher is better. "pop" = population statistics,
"mu_B" = mini-batch statistics, NBS = normalization batch size.
"""

from __future__ import annotations

__all__ = [
    "FIG3_NOTES",
    "FIG5_NBS",
    "TABLE2",
    "TABLE2_COLUMNS",
    "TABLE3",
    "TABLE4",
    "TABLE4_CLEAN",
    "TABLE5",
    "TABLE6",
]

# Sec. 3, Fig. 2-3: described in words (curves, not tables).
FIG3_NOTES = (
    "ResNet-50, 100 epochs, LR drops at epochs 30 and 60: EMA validation error is noisy and worse "
    "than PreciseBN until ~epoch 30; the curves meet near the end. With SGD batch 8192, EMA is "
    "extremely noisy (~55-67% error in epochs 5-30 vs ~45% for PreciseBN) and ends slightly worse "
    "than PreciseBN. Fig. 2: EMA often falls outside the distribution of 100 per-batch means, most "
    "of all early in training. About 10^3-10^4 samples are enough for PreciseBN."
)

# Table 2: population statistics from N = 10^4 samples in PreciseBN batches of size B
# (100 epochs, SGD batch 256). Top-1 error (%).
TABLE2_COLUMNS = ("EMA", "B=2", "B=10", "B=10^2", "B=10^3", "B=N")
TABLE2: dict[int, tuple[float, ...]] = {
    32: (23.7, 28.8, 24.0, 23.5, 23.5, 23.5),
    2: (35.5, 34.4, 32.3, 32.0, 32.0, 32.0),
}

# Sec. 4, Fig. 5 and 6 (read off the plots, ~+-0.2): NBS -> error (%), SGD batch 1024.
FIG5_NBS: dict[str, dict[int, float]] = {
    "val_pop": {1024: 23.7, 512: 23.7, 256: 23.6, 128: 23.4, 64: 23.2, 32: 23.4, 16: 23.5,
                8: 24.3, 4: 26.4, 2: 32.5},
    "train_mub": {1024: 8.5, 512: 8.5, 256: 8.9, 128: 9.2, 64: 9.8, 32: 10.8, 16: 12.0,
                  8: 13.5, 4: 15.1, 2: 16.5},
    "val_mub": {1024: 24.8, 512: 24.8, 256: 24.7, 128: 24.7, 64: 24.7, 32: 24.5, 16: 24.7,
                8: 25.1, 4: 25.5, 2: 26.0},
    "val_pop_frozen": {1024: 24.5, 512: 24.4, 256: 24.4, 128: 24.4, 64: 24.2, 32: 24.3,
                       16: 23.9, 8: 24.2, 4: 24.3, 2: 25.2},
}

# Table 3: Mask R-CNN R50-FPN, BN in the heads, one test image at a time (AP box, AP mask).
TABLE3: list[tuple[str, str, tuple[float, float]]] = [
    ("2", "pop", (40.1, 36.2)),
    ("2", "mu_B of 1 image", (41.3, 37.0)),
    ("1", "pop", (30.7, 27.9)),
    ("1", "mu_B of 1 image", (41.5, 37.0)),
    ("no norm", "-", (41.1, 36.9)),
    ("GroupNorm", "-", (41.4, 37.7)),
]

# Table 4: ImageNet-C, population statistics from ImageNet vs from 1000 images of the domain.
TABLE4: dict[str, tuple[float, float]] = {
    "contrast": (40.8, 33.1),
    "gaussian noise": (64.4, 52.5),
    "jpeg": (40.4, 36.7),
}
# Clean ImageNet val with statistics from: train-augmented ImageNet, un-augmented val, contrast.
TABLE4_CLEAN: dict[str, float] = {"train-augmented": 23.4, "un-augmented": 23.8, "contrast": 39.7}

# Table 5: RetinaNet head shared by FPN levels: (SGD training stats, population stats, affine)
# -> AP.
TABLE5: list[tuple[str, str, str, float]] = [
    ("shared", "shared", "shared", 39.1),
    ("shared", "domain-specific", "shared", 2.1),
    ("domain-specific", "shared", "shared", 34.1),
    ("domain-specific", "domain-specific", "shared", 39.1),
    ("domain-specific", "shared", "domain-specific", 35.5),
    ("domain-specific", "domain-specific", "domain-specific", 39.2),
    ("GroupNorm", "-", "-", 39.5),
    ("no norm", "-", "-", 38.7),
]

# Table 6: Mask R-CNN heads: (head normalization, images per GPU, inference stats) -> AP box/mask.
TABLE6: list[tuple[str, str, str, tuple[float, float]]] = [
    ("per-GPU BN", "1", "pop", (30.7, 27.9)),
    ("per-GPU BN", "2", "pop", (40.1, 36.2)),
    ("per-GPU BN", "2", "mu_B", (41.3, 37.0)),
    ("per-GPU BN + shuffle", "1", "pop", (41.7, 37.7)),
    ("per-GPU BN + shuffle", "2", "pop", (41.6, 37.6)),
    ("SyncBN", "-", "pop", (41.7, 37.7)),
    ("no norm", "2", "-", (41.1, 36.9)),
]
