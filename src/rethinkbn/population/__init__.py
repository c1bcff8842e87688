"""Population statistics: PreciseBN, statistics banks, mini-batch inference, FrozenBN schedules."""

from .bank import Snapshot, StatsBank, capture_stats, install_stats
from .precise import LayerReport, PreciseBNReport, precise_bn, recompute_stats

__all__ = [
    "LayerReport",
    "PreciseBNReport",
    "Snapshot",
    "StatsBank",
    "capture_stats",
    "install_stats",
    "precise_bn",
    "recompute_stats",
]
