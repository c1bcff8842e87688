"""rethinkbn: make the *batch* in BatchNorm explicit and controllable.

After "Rethinking 'Batch' in BatchNorm" (Wu & Johnson, 2021). The package is layered, and imports
point down this list only:

    stats         per-channel moments and their exact merge (the one source of truth)
    layers        GhostBatchNorm, FrozenBatchNorm, DomainBatchNorm (and the shared base)
    convert       reversible model surgery, fold_batchnorm
    population    precise_bn, statistics banks, mini-batch inference, FrozenBN schedules
    distributed   SyncBatchNorm, cross-device shuffle, virtual devices
    cli           the `rethinkbn` command

The reproduction of the paper's studies (`rethinkbn reproduce`) is a separate package beside this
one, `rethinkbn_studies` (its dependencies come with the `studies` extra): it uses only this
package's public API, and this package never imports it (the command imports it when it runs).

The top level offers every name of the ``__all__`` of ``layers``, ``convert``, ``population`` and
``distributed``, and of ``stats`` the moments and their collectives; ``stats``' building blocks
for writing a layer stay there (``tests/test_exports.py`` holds the rule and its exclusions).
"""

from .convert import (
    BatchNormState,
    FoldedLinear,
    convert_batchnorm,
    fold_batchnorm,
    freeze_bn,
    register_converter,
    register_norm_act,
    revert_batchnorm,
    swap_modules,
    to_domain_bn,
    to_ghost_bn,
    unfreeze_bn,
)
from .distributed import (
    PerDeviceBatchNorm,
    ShuffledModule,
    ShufflePlan,
    SyncBatchNorm,
    consecutive_group,
    shuffle_permutation,
    to_sync_bn,
    virtual_devices,
)
from .layers import (
    BatchNormBase,
    DomainBatchNorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    is_batchnorm,
    layer_name,
    nonfinite_report,
    set_nonfinite,
    use_domain,
)
from .population import (
    EMALayerReport,
    EMAReport,
    FreezeBNHook,
    LayerReport,
    PreciseBNHook,
    PreciseBNOptions,
    PreciseBNReport,
    Snapshot,
    StatsBank,
    batch_stats_inference,
    capture_stats,
    ema_report,
    freeze_epoch_for,
    freeze_with_precise_stats,
    install_stats,
    precise_bn,
    recompute_stats,
)
from .stats import Moments, all_gather_moments, all_reduce_moments

__version__ = "0.1.0"

__all__ = ["Moments", "all_gather_moments", "all_reduce_moments", "__version__"]
__all__ += [
    "BatchNormState",
    "FoldedLinear",
    "convert_batchnorm",
    "fold_batchnorm",
    "freeze_bn",
    "register_converter",
    "register_norm_act",
    "revert_batchnorm",
    "swap_modules",
    "to_domain_bn",
    "to_ghost_bn",
    "unfreeze_bn",
]
__all__ += [
    "PerDeviceBatchNorm",
    "ShuffledModule",
    "ShufflePlan",
    "SyncBatchNorm",
    "consecutive_group",
    "shuffle_permutation",
    "to_sync_bn",
    "virtual_devices",
]
__all__ += [
    "BatchNormBase",
    "DomainBatchNorm",
    "FrozenBatchNorm",
    "GhostBatchNorm",
    "is_batchnorm",
    "layer_name",
    "nonfinite_report",
    "set_nonfinite",
    "use_domain",
]
__all__ += [
    "EMALayerReport",
    "EMAReport",
    "FreezeBNHook",
    "LayerReport",
    "PreciseBNHook",
    "PreciseBNOptions",
    "PreciseBNReport",
    "Snapshot",
    "StatsBank",
    "batch_stats_inference",
    "capture_stats",
    "ema_report",
    "freeze_epoch_for",
    "freeze_with_precise_stats",
    "install_stats",
    "precise_bn",
    "recompute_stats",
]
