"""The BatchNorm layer family: one state base class, thin layers that say how a batch is used."""

from .base import BatchNormBase, layer_name

__all__ = ["BatchNormBase", "layer_name"]
