"""The BatchNorm layer family: one state base class, thin layers that say how a batch is used."""

from torch import nn

from .base import BatchNormBase, layer_name, nonfinite_report, set_nonfinite
from .domain import DomainBatchNorm, use_domain
from .frozen import FrozenBatchNorm
from .ghost import GhostBatchNorm

__all__ = [
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


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's BatchNorm layers (``_BatchNorm`` subclasses, SyncBatchNorm included) and
    for every layer of rethinkbn's family (:class:`BatchNormBase` subclasses)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormBase))
