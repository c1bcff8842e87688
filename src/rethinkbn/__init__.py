"""rethinkbn: make the *batch* in BatchNorm explicit and controllable.

After "Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021). The package is layered, and imports
point down this list only:

    stats         per-channel moments and their exact merge (the one source of truth)
    layers        GhostBatchNorm, FrozenBatchNorm, DomainBatchNorm (and the shared base)
    convert       reversible model surgery, fold_batchnorm
    population    precise_bn, statistics banks, mini-batch inference, FrozenBN schedules
    distributed   SyncBatchNorm, cross-device shuffle, virtual devices
    diagnosis     the paper's pitfalls measured on a user's model (`rethinkbn diagnose`)
    cli           the `rethinkbn` command

The reproduction of the paper's studies (`rethinkbn reproduce`) is a separate package beside this
one, `rethinkbn_studies` (its dependencies come with the `studies` extra): it uses only this
package's public API, and this package never imports it (the command imports it when it runs).
"""

from .convert import convert_batchnorm, fold_batchnorm, revert_batchnorm
from .diagnosis import Diagnosis, diagnose
from .distributed import (
    PerDeviceBatchNorm,
    ShuffledModule,
    ShufflePlan,
    SyncBatchNorm,
    to_sync_bn,
    virtual_devices,
)
from .layers import (
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
    use_domain,
)
from .population import (
    FreezeBNHook,
    PreciseBNHook,
    PreciseBNReport,
    StatsBank,
    batch_stats_inference,
    ema_report,
    freeze_with_precise_stats,
    precise_bn,
    recompute_stats,
)
from .stats import Moments, all_reduce_moments

__version__ = "0.1.0"

__all__ = ["Moments", "all_reduce_moments", "__version__", "Diagnosis", "diagnose"]
__all__ += ["convert_batchnorm", "fold_batchnorm", "revert_batchnorm"]
__all__ += [
    "PerDeviceBatchNorm",
    "ShuffledModule",
    "ShufflePlan",
    "SyncBatchNorm",
    "to_sync_bn",
    "virtual_devices",
]
__all__ += ["DomainBatchNorm", "FrozenBatchNorm", "GhostBatchNorm", "is_batchnorm", "use_domain"]
__all__ += [
    "FreezeBNHook",
    "PreciseBNHook",
    "PreciseBNReport",
    "StatsBank",
    "batch_stats_inference",
    "ema_report",
    "freeze_with_precise_stats",
    "precise_bn",
    "recompute_stats",
]
