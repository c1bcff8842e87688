"""The BatchNorm layer family: one state base class, thin layers that say how a batch is used."""

from .._model import is_batchnorm
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

