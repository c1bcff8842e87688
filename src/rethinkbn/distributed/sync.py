"""SyncBatchNorm: normalize with the statistics of the batch of every rank in a process group.

The normalization batch is the union of the local batches of the ranks in the group (the whole
world by default, or consecutive groups of ``group_size`` ranks: the paper's way to choose a
normalization batch size between per-GPU and global). Per channel, over the ``N`` values of the
group::

    mean = (1/N) sum_i x_i          var = (1/N) sum_i (x_i - mean)^2
    y_i  = weight * (x_i - mean) / sqrt(var + eps) + bias

Communication is ONE ``all_reduce`` in the forward and ONE in the backward:

* forward: every rank's float64 moments ``(n, mean, m2)`` are summed as additive sums by
  :func:`rethinkbn.stats.all_reduce_moments`. Numerics, for channels whose mean is large compared
  with their spread: the local mean is summed around a pivot taken from the data, per sample in
  float32 and over samples in float64 (a float32 mean near 1e4 is off by up to 5e-4, which the merge
  would turn into variance; no float64 copy of the activation is made), ``m2`` is a second pass
  around it (no ``E[x^2] - E[x]^2``), and the moments are shifted by a value every rank shares (the
  group mean of the previous step, at first the running mean) before the sums are formed, so that
  the float64 cancellation ``m2 = S2 - N * mean^2`` stays small. Normalizing uses the float64 mean
  as two float32 numbers, so ``x - mean`` keeps the spread's digits: on values ``1e4 + 1e-2 z`` the
  output is exact to 1e-5 from the second step on, where torch's float32 BatchNorm is off by 5e-2.
* backward: the per-channel sums ``sum(dy)`` and ``sum(dy * (x - mean))`` over the group, which
  give the exact input gradient::

      dx_i = weight / sqrt(var + eps) * (dy_i - mean(dy) - xhat_i * mean(dy * xhat))

  The weight and bias gradients are the *local* sums ``sum(dy * xhat)`` and ``sum(dy)``, as in
  ``torch.nn.SyncBatchNorm``: DistributedDataParallel then averages them across ranks.

Unequal local batch sizes are exact, and a rank whose local batch is empty still joins both
collectives (it gets an empty output and zero gradients). In eval mode, and with world size 1 or
no initialized process group, no collective is made and the layer runs torch's BatchNorm kernel,
as torch's SyncBatchNorm does: outputs and gradients bit-identical to torch's BatchNorm, at its
cost (the running buffers still skip non-finite statistics; the float64 numerics above are the
synced path's). The same code runs on CPU tensors with gloo and on CUDA tensors with NCCL.

Second derivatives (``create_graph=True``: gradient penalties) are exact across ranks: the
backward is then built from differentiable operations and group sums (three all_reduces).

Failures. Ranks that disagree on the layer's channel count or compute dtype all raise
``ValueError`` naming the layer and what differs (a layout header rides in the forward
all_reduce; the first synced forward of each layer also checks it with one small all_gather).
Under gloo a rank that never joins a collective makes the others fail after the process group's
timeout with an error naming the layer. Under NCCL collectives are asynchronous: a missing rank
never raises at the all_reduce, the others wait until the NCCL watchdog aborts them
(``init_process_group(timeout=...)``), and an error raised on one rank only (a NaN there, say)
leaves the others in DistributedDataParallel's gradient all_reduce until then; the per-step
checks on device values (the layout header, more than one value per channel) are asynchronous
device assertions that surface, with their message, at the next synchronization, so a training
step makes no host-device synchronization.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_positive_int
from ..layers import functional as BF
from ..layers.base import BatchNormBase, layer_name
from ..stats import (
    Moments,
    all_reduce_moments,
    check_same_layout,
    compute_dtype,
    require,
    split_mean,
)
from ._sync_normalize import SyncNormalize, collective_failed

__all__ = ["SyncBatchNorm", "consecutive_group"]

# One subgroup per (world, group_size), created on first use: dist.new_subgroups is a collective
# over the whole world, so every layer creating its own would multiply groups (and connections).
# The world object is kept alive in the value so that its id cannot be reused by a later world.
_SUBGROUPS: dict[tuple[int, int], tuple[Any, dist.ProcessGroup]] = {}


def consecutive_group(group_size: int) -> dist.ProcessGroup:
    """This rank's group among the world's consecutive groups of ``group_size`` ranks.

    Ranks ``0..k-1`` form the first group, ``k..2k-1`` the second, and so on. The groups are
    created once per initialized world; the first call is a collective over the whole world (every
    rank must make it, in the same order relative to other group creations).
    """
    check_positive_int(group_size, "group_size", "consecutive_group")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"consecutive_group(group_size={group_size}) needs an initialized process group "
            "(call torch.distributed.init_process_group first)"
        )
    world = dist.group.WORLD
    world_size = dist.get_world_size()
    if world_size % group_size:
        raise ValueError(
            f"consecutive_group: group_size must be a positive divisor of the world size "
            f"{world_size}, got {group_size!r}"
        )
    key = (id(world), group_size)
    if key not in _SUBGROUPS:
        group, _ = dist.new_subgroups(group_size)
        _SUBGROUPS[key] = (world, group)
    return _SUBGROUPS[key][1]


class SyncBatchNorm(BatchNormBase):
    """BatchNorm whose training statistics are those of the whole process group's batch.

    ``process_group`` (default: the whole world) or ``group_size=k`` (this rank's group among the
    consecutive groups of ``k`` ranks, see :func:`consecutive_group`) choose the ranks whose
    batches are normalized together. Accepts inputs of rank 2 to 5 (``(N, C, ...)``), any local
    batch size including 0, and float16/bfloat16 inputs (statistics and running buffers stay in
    the parameters' dtype, the math runs in float32).

    Side effects of a training forward: the running buffers are updated with the group's mean
    and its *unbiased* variance ``m2 / (N - 1)`` (torch's rule), ``num_batches_tracked`` advances,
    and ``observer`` (when set, e.g. by :func:`rethinkbn.precise_bn`) receives the float64 moments
    of *this rank's* values: precise_bn sums every rank's observations in its own collective.

    Every rank of the group must call the layer in the same step (it makes one all_reduce in the
    forward and one in the backward); otherwise, under gloo, the others fail after the process
    group's timeout with an error naming the layer (under NCCL: see the module docstring).
    Integer inputs, and inputs of another dtype than the layer's (except float16/bfloat16 into
    float32), raise ``TypeError`` naming the layer, as torch's BatchNorm refuses them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        group_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if process_group is not None and group_size is not None:
            raise ValueError(
                f"SyncBatchNorm({num_features}): give process_group or group_size, not both "
                f"(got process_group={process_group!r}, group_size={group_size!r})"
            )
        check_positive_int(group_size, "group_size", f"SyncBatchNorm({num_features})",
                           allow_none=True)
        self.process_group = process_group
        self.group_size = group_size
        # The group's mean at the last synced forward: identical on every rank of the group (it
        # is the result of one all_reduce), so it can shift the next step's moments.
        self._shift: Tensor | None = None
        # Whether the ranks agreed on this layer's layout at its first synced forward.
        self._layout_checked = False
        if group_size is not None and dist.is_available() and dist.is_initialized():
            self.process_group = consecutive_group(group_size)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size is not None else ""
        return super().extra_repr() + extra

    # ------------------------------------------------------------------ the group
    def _sync_group(self) -> tuple[bool, dist.ProcessGroup | None]:
        """``(sync, group)``: whether this training forward communicates, and over which group."""
        if not dist.is_available() or not dist.is_initialized():
            return False, None
        if self.group_size is not None and self.process_group is None:
            self.process_group = consecutive_group(self.group_size)
        size = dist.get_world_size(self.process_group)
        if size < 1:
            raise ValueError(
                f"{layer_name(self)}: rank {dist.get_rank()} is not a member of its "
                f"process_group {self.process_group!r}; expected a group containing this rank"
            )
        return size > 1, self.process_group

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._uses_batch_stats():
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )
        # Eval without running buffers normalizes each rank's batch alone, as torch does.
        sync, group = self._sync_group() if self.training else (False, None)
        if not sync and self.observer is None:
            return self._local_forward(x)
        local, moments = self._group_moments(x, sync, group)
        name = layer_name(self)
        # The local count is a host number; the group's is on the device (read only on CPU, see
        # rethinkbn.stats.require: no host sync per layer per step on an accelerator).
        count: int | None = x.numel() // max(x.size(1), 1)
        if sync:
            on_host = moments.count.device.type == "cpu"
            count = int(moments.count[0]) if on_host else None
        where = "group" if sync else "local batch"
        if count is not None and count <= 1:
            raise ValueError(
                f"{name}: expected more than 1 value per channel when training, got "
                f"{count} over the {where} (local input shape {tuple(x.shape)})"
            )
        if count is None:
            require(moments.count[:1] > 1, f"{name}: expected more than 1 value per channel "
                    f"over the {where} when training (local input shape {tuple(x.shape)})")
        # precise_bn merges what every rank observed in its own collective: observing the group's
        # moments would count each value once per rank.
        self._observe(local)
        if self._updates_running_stats():
            self._update_running_stats(moments.mean, moments.var(unbiased=True))
        dtype = compute_dtype(x)
        mean, mean_lo = split_mean(moments.mean, dtype)
        invstd = (moments.var() + self.eps).rsqrt().to(dtype)
        return SyncNormalize.apply(
            x, mean, mean_lo, invstd, self.weight, self.bias, moments.count, self.eps, group,
            sync, name,
        )

    def _local_forward(self, x: Tensor) -> Tensor:
        """Nothing to sync (no process group, a group of one rank, eval without buffers): torch's
        kernel on the local batch, the running buffers blended under the family's NaN policy.

        The statistics are torch's (float32 for float32 and half inputs), as for torch's
        SyncBatchNorm, which falls back to ``F.batch_norm`` here too; with an ``observer``
        (precise_bn) the float64 moments of the synced path are used instead.
        """
        count = x.numel() // max(x.size(1), 1)
        if count <= 1:
            raise ValueError(
                f"{layer_name(self)}: expected more than 1 value per channel when training, got "
                f"{count} over the local batch (local input shape {tuple(x.shape)})"
            )
        if not self._updates_running_stats():
            if self.weight is None and x.dtype != compute_dtype(x):
                # no float32 tensor for torch's kernel to follow: it would compute in half
                return BF.native_batch_norm(x, None, None, self.eps)[0]
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self._kernel_updates_buffers(x):
            rm, rv = self.running_mean, self.running_var
            before = torch.stack([rm, rv])  # type: ignore[list-item]
            y = F.batch_norm(x, rm, rv, self.weight, self.bias, True, self.momentum or 0.0,
                             self.eps)
            self._check_kernel_update(before, lambda: BF.native_batch_norm(
                x.detach(), None, None, self.eps)[1:])
            return y
        y, mean, var = BF.native_batch_norm(x, self.weight, self.bias, self.eps)
        self._update_running_stats(mean, var)
        return y

    def _group_moments(
        self, x: Tensor, sync: bool, group: dist.ProcessGroup | None
    ) -> tuple[Moments, Moments]:
        """Float64 per-channel moments of this rank's batch and of the group's (ONE all_reduce).

        The all_reduce carries the layer's channel count and compute dtype (the dtype of the
        backward's all_reduce): ranks that disagree fail, every one of them, with an error naming
        the layer. Channel counts that differ also give buffers of different lengths, which no
        all_reduce can compare: the first synced forward of each layer checks them first with one
        small all_gather (:func:`rethinkbn.stats.check_same_layout`).
        """
        # Moments.of: two passes around a float64 mean (the ranks' means merge without losing
        # the spread's digits); an empty local batch gives count 0.
        local = Moments.of(x)
        if not sync:
            return local, local
        # The moments of x - shift, for a shift every rank shares, keep S2 - N * mean^2 free of
        # cancellation when the shift is near the batch mean: the last step's group mean, else
        # the running mean.
        shift = self._shift
        if shift is None or shift.device != local.mean.device or shift.shape != local.mean.shape:
            shift = (
                torch.zeros_like(local.mean)
                if self.running_mean is None
                else self.running_mean.detach().to(local.mean.dtype)
            )
        # A non-finite batch must not poison the steps after it.
        shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
        shifted = Moments(local.count, local.mean - shift, local.m2)
        name = layer_name(self)
        tag = (x.size(1), _DTYPE_CODES.get(compute_dtype(x), 0))
        tag_names = ("channels", "dtype code")
        try:
            if not self._layout_checked:
                check_same_layout([shifted], group, what=name, tag=tag, tag_names=tag_names)
                self._layout_checked = True
            (reduced,) = all_reduce_moments([shifted], group, what=name, tag=tag,
                                            tag_names=tag_names)
        except RuntimeError as exc:
            raise collective_failed("batch-moments", name, group, exc) from exc
        group_moments = Moments(reduced.count, reduced.mean + shift, reduced.m2)
        self._shift = group_moments.mean
        return local, group_moments

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None, **kwargs: Any
    ) -> torch.nn.Module:
        """torch's spelling of :func:`rethinkbn.to_sync_bn`: ``to_sync_bn(module, process_group,
        **kwargs)``, for code written for ``nn.SyncBatchNorm.convert_sync_batchnorm``.

        Every BatchNorm of ``module`` becomes a rethinkbn :class:`SyncBatchNorm` holding the same
        Parameter and buffer objects (``revert_batchnorm`` turns them back); ``process_group``
        (default: the world), or ``group_size=`` and the selection keywords of
        :func:`rethinkbn.convert.convert_batchnorm`, as for ``to_sync_bn``. Changes ``module`` in
        place and returns it (the new layer when ``module`` itself is a BatchNorm). Unlike torch's,
        a BatchNorm subclass that adds behaviour is left alone with a warning (timm's norm-act
        layers convert with their activation) rather than rebuilt without it.
        """
        from ..convert import convert_batchnorm  # below this package: no import circle

        if process_group is not None:
            kwargs["process_group"] = process_group
        return convert_batchnorm(module, "sync", **kwargs)


# Codes for the dtypes a layer computes in, carried in the forward all_reduce (see above).
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
