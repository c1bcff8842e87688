"""Population statistics: PreciseBN, statistics banks, mini-batch inference, FrozenBN schedules."""

from .bank import Snapshot, StatsBank, capture_stats, install_stats
from .inference import batch_stats_inference
from .mechanism import (
    INCONSISTENCY_THRESHOLD,
    LayerVariance,
    between_sample_share,
    expected_variance_ratio,
    group_variance_ratio,
    variance_decomposition,
)
from .options import PreciseBNOptions
from .precise import LayerReport, PreciseBNReport, markdown_table, precise_bn, recompute_stats
from .report import EMALayerReport, EMAReport, ema_report
from .schedule import (
    FreezeBNHook,
    PreciseBNHook,
    freeze_epoch_for,
    freeze_with_precise_stats,
)

__all__ = [
    "INCONSISTENCY_THRESHOLD",
    "LayerVariance",
    "between_sample_share",
    "expected_variance_ratio",
    "group_variance_ratio",
    "variance_decomposition",
    "FreezeBNHook",
    "PreciseBNHook",
    "freeze_epoch_for",
    "freeze_with_precise_stats",
    "batch_stats_inference",
    "EMALayerReport",
    "EMAReport",
    "ema_report",
    "LayerReport",
    "PreciseBNOptions",
    "PreciseBNReport",
    "Snapshot",
    "StatsBank",
    "capture_stats",
    "install_stats",
    "markdown_table",
    "precise_bn",
    "recompute_stats",
]
