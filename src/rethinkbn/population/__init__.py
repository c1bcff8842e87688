"""Population statistics: PreciseBN, statistics banks, mini-batch inference, FrozenBN schedules."""

from .bank import Snapshot, StatsBank, capture_stats, install_stats
from .precise import LayerReport, PreciseBNReport, precise_bn, recompute_stats
from .report import EMALayerReport, EMAReport, ema_report

__all__ = [
    "EMALayerReport",
    "EMAReport",
    "ema_report",
    "LayerReport",
    "PreciseBNReport",
    "Snapshot",
    "StatsBank",
    "capture_stats",
    "install_stats",
    "precise_bn",
    "recompute_stats",
]
