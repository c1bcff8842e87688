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
package's public API, and this package never imports it (its commands reach ``rethinkbn`` through
the entry point group ``rethinkbn.commands``).

The top level offers the names a user of the layers needs (``__all__``, listed in
``tests/test_exports.py``): the layers, the conversions, the statistics pass and its banks,
the cross-device tools and ``diagnose``. Everything else stays importable from its subpackage
(``rethinkbn.population.markdown_table``, ``rethinkbn.stats.all_reduce_moments``, ...).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version

from .convert import (
    convert_batchnorm,
    fold_batchnorm,
    freeze_bn,
    revert_batchnorm,
    to_domain_bn,
    to_ghost_bn,
    unfreeze_bn,
)
from .diagnosis import Diagnosis, diagnose
from .distributed import ShuffledModule, SyncBatchNorm, to_sync_bn, virtual_devices
from .layers import DomainBatchNorm, FrozenBatchNorm, GhostBatchNorm, is_batchnorm, use_domain
from .population import (
    PreciseBNOptions,
    StatsBank,
    batch_stats_inference,
    ema_report,
    freeze_with_precise_stats,
    precise_bn,
    recompute_stats,
)
from .stats import Moments

try:
    __version__ = _metadata_version("rethinkbn")  # one place: pyproject.toml's version
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    # layers
    "GhostBatchNorm",
    "FrozenBatchNorm",
    "DomainBatchNorm",
    "SyncBatchNorm",
    "use_domain",
    "is_batchnorm",
    # model surgery
    "to_ghost_bn",
    "freeze_bn",
    "unfreeze_bn",
    "to_domain_bn",
    "to_sync_bn",
    "convert_batchnorm",
    "revert_batchnorm",
    "fold_batchnorm",
    # population statistics
    "precise_bn",
    "recompute_stats",
    "PreciseBNOptions",
    "StatsBank",
    "batch_stats_inference",
    "ema_report",
    "freeze_with_precise_stats",
    # across devices
    "ShuffledModule",
    "virtual_devices",
    # the pitfalls measured on a model
    "diagnose",
    "Diagnosis",
    # per-channel moments
    "Moments",
]
