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

The top level offers every name of the ``__all__`` of ``layers``, ``convert``, ``population`` and
``distributed``, and of ``stats`` the moments and their collectives; ``stats``' building blocks
for writing a layer stay there (``tests/test_exports.py`` holds the rule and its exclusions).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version

from . import convert, distributed, layers, population
from .convert import *  # noqa: F403 - the names of convert.__all__
from .diagnosis import Diagnosis, diagnose
from .distributed import *  # noqa: F403
from .layers import *  # noqa: F403
from .population import *  # noqa: F403
from .stats import Moments, all_gather_moments, all_reduce_moments

try:
    __version__ = _metadata_version("rethinkbn")  # one place: pyproject.toml's version
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Moments",
    "all_gather_moments",
    "all_reduce_moments",
    "__version__",
    "Diagnosis",
    "diagnose",
    *convert.__all__,
    *distributed.__all__,
    *layers.__all__,
    *population.__all__,
]
