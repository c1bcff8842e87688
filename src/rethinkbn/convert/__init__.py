"""Model surgery: convert every BatchNorm of a model to another kind and back, and fold BatchNorm.

    convert_batchnorm(model, "ghost", norm_batch_size=32)   # or to_ghost_bn(model, 32)
    freeze_bn(model); unfreeze_bn(model)
    to_domain_bn(model, num_domains=2)
    revert_batchnorm(model, domain=0)                      # back to torch's BatchNorm1d/2d/3d
    fold_batchnorm(model)                                  # an eval-mode copy, BN folded into conv

timm's BatchNormAct2d / SyncBatchNormAct (BatchNorm + drop + act) convert to every kind and back
(``rethinkbn.convert.norm_act``); ``register_norm_act`` adds another library's.

Layout, imports pointing down: ``state`` (BatchNormState, reading a layer) -> ``registry`` (the
tables of kinds, readers, source converters, norm-act variants) -> ``norm_act`` and ``kinds``
(the factories: norm-act classes, ``register_converter`` and the builders) -> ``surgery`` and
``fold`` (the engines).
"""

from .fold import FoldedLinear, fold_batchnorm
from .kinds import register_converter
from .norm_act import register_norm_act
from .state import BatchNormState
from .surgery import (
    convert_batchnorm,
    freeze_bn,
    revert_batchnorm,
    swap_modules,
    to_domain_bn,
    to_ghost_bn,
    unfreeze_bn,
)

__all__ = [
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
