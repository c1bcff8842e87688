"""Shuffle samples across devices, so that per-device BatchNorm sees a random subset of the batch.

The paper's Fig. 9 and MoCo's "shuffle BN": when the samples of one device are correlated (the
crops of one image, the queries of one sequence), per-device statistics leak that correlation.
Shuffling the global batch across devices before the head with per-device BN, and putting the
results back afterwards, removes it.

A :class:`ShufflePlan` is a random permutation ``perm`` of the global batch (the concatenation of
the devices' local batches, in device order). Position ``p`` of the shuffled global batch holds
sample ``perm[p]``, and the shuffled global batch is split into the devices with the same local
sizes as before. The permutation comes from a seed and a step counter that every rank shares, so
no rank broadcasts anything; only the local batch sizes are exchanged (one small all_gather) when
they are not given.

Across processes the samples move with ONE ``all_to_all_single`` per direction: every rank sends
only the samples that leave it and receives only those that arrive, ``O(local batch)`` bytes, not
the ``O(world x batch)`` of gathering the whole batch everywhere. The backward of a shuffle is the
reverse exchange (the unshuffle of the gradient), so autograd flows through both.

*Virtual devices* (one process): the same permutation over ``k`` devices simulated as ``k``
contiguous chunks of one batch; shuffling is then plain indexing, and per-device BN is
:class:`~rethinkbn.distributed.virtual.PerDeviceBatchNorm`. The plan of ``k`` virtual devices
moves every sample exactly where the plan of ``k`` ranks moves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._checks import check_positive_int
from ..layers.base import layer_name

__all__ = ["ShufflePlan", "ShuffledModule", "shuffle_permutation"]


def shuffle_permutation(batch_size: int, seed: int, step: int) -> Tensor:
    """The permutation of a global batch of ``batch_size`` samples at ``step`` (CPU, int64).

    A pure function of its arguments: every rank computes the same one without communicating.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randperm(batch_size, generator=generator)


@dataclass(frozen=True, eq=False)
class _Route:
    """One direction of an exchange: gather ``send_index``, all_to_all, gather ``recv_index``.

    ``send_counts[d]`` rows go to rank ``d``; ``recv_counts[s]`` rows come from rank ``s``.
    """

    send_index: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_index: Tensor

    def to(self, device: torch.device) -> _Route:
        return _Route(self.send_index.to(device), self.send_counts, self.recv_counts,
                      self.recv_index.to(device))

    def reversed(self) -> _Route:
        return _Route(
            torch.argsort(self.recv_index), self.recv_counts, self.send_counts,
            torch.argsort(self.send_index),
        )

    def apply(self, x: Tensor, process_group: dist.ProcessGroup | None) -> Tensor:
        send = x.index_select(0, self.send_index.to(x.device)).contiguous()
        recv = x.new_empty((sum(self.recv_counts), *x.shape[1:]))
        dist.all_to_all_single(recv, send, self.recv_counts, self.send_counts, group=process_group)
        return recv.index_select(0, self.recv_index.to(x.device))


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, route: _Route, process_group: dist.ProcessGroup | None
    ) -> Tensor:
        ctx.route, ctx.process_group = route, process_group
        return route.apply(x, process_group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # The reverse exchange, itself differentiable: second derivatives (create_graph=True)
        # flow through it too.
        back = _Exchange.apply(grad.contiguous(), ctx.route.reversed(), ctx.process_group)
        return back, None, None


@dataclass(frozen=True, eq=False)
class ShufflePlan:
    """Where every sample of a global batch goes: build with :meth:`across_ranks` / :meth:`virtual`.

    ``sizes[d]`` is device ``d``'s local batch size (before and after shuffling), ``perm`` the
    permutation of the global batch (see the module docstring). ``rank`` is this process's device,
    ``None`` for virtual devices (this process holds the whole batch).
    """

    sizes: tuple[int, ...]
    perm: Tensor
    rank: int | None = None
    process_group: dist.ProcessGroup | None = None
    route: _Route | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def virtual(cls, batch_size: int, num_devices: int, seed: int, step: int) -> ShufflePlan:
        """The plan over ``num_devices`` virtual devices, each a contiguous chunk of the batch.

        ``batch_size`` must split into ``num_devices`` equal chunks.
        """
        check_positive_int(num_devices, "num_devices", "ShufflePlan.virtual")
        if batch_size % num_devices:
            raise ValueError(
                f"ShufflePlan.virtual: a batch of {batch_size} samples does not split into "
                f"{num_devices} equal virtual devices; expected a multiple of {num_devices}"
            )
        sizes = (batch_size // num_devices,) * num_devices
        return cls(sizes, shuffle_permutation(batch_size, seed, step))

    @classmethod
    def across_ranks(
        cls,
        local_batch_size: int,
        seed: int,
        step: int,
        process_group: dist.ProcessGroup | None = None,
        sizes: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> ShufflePlan:
        """This rank's plan for the global batch of the ranks of ``process_group`` (default: world).

        Without ``sizes`` (every rank's local batch size, in rank order) they are exchanged in
        one small all_gather, and read once on the host (the all_to_all needs them there). The
        exchange runs on the CPU when the group's backend takes CPU tensors (gloo; no device
        synchronization at all), else on ``device`` (default: the current CUDA device, which
        NCCL requires). Give ``sizes`` (e.g. equal local batches) to skip the exchange. The
        plan's index tensors are moved to ``device`` once, here. Without an initialized process
        group the plan is the single-device one: a permutation of the local batch.
        """
        if not dist.is_available() or not dist.is_initialized():
            return cls((local_batch_size,), shuffle_permutation(local_batch_size, seed, step), 0)
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if sizes is None:
            where = _exchange_device(process_group, device)
            mine = torch.full((1,), local_batch_size, dtype=torch.long, device=where)
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine, group=process_group)
            sizes = torch.cat(gathered).tolist()  # one read, not one per rank
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != world or sizes[rank] != local_batch_size or min(sizes) < 0:
            raise ValueError(
                f"ShufflePlan.across_ranks: sizes {list(sizes)} must give the local batch size "
                f"of each of the {world} ranks (this rank {rank} has {local_batch_size})"
            )
        perm = shuffle_permutation(sum(sizes), seed, step)
        route = _route(sizes, perm, rank)
        if device is not None and torch.device(device).type != "cpu":
            route = route.to(torch.device(device))
        return cls(sizes, perm, rank, process_group, route)

    # ------------------------------------------------------------------ use
    @property
    def num_devices(self) -> int:
        """The number of devices (ranks, or virtual devices) the plan shuffles across."""
        return len(self.sizes)

    def shuffle(self, x: Tensor) -> Tensor:
        """The shuffled batch along dim 0 (this rank's share, or the whole batch if virtual)."""
        self._check(x)
        if self.route is None:
            return x.index_select(0, self.perm.to(x.device))
        return _Exchange.apply(x, self.route, self.process_group)

    def unshuffle(self, y: Tensor) -> Tensor:
        """The inverse of :meth:`shuffle`: row ``i`` of the result belongs to input sample ``i``."""
        self._check(y)
        if self.route is None:
            return y.index_select(0, torch.argsort(self.perm).to(y.device))
        return _Exchange.apply(y, self.route.reversed(), self.process_group)

    def _check(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` holds this plan's batch (as shuffle and unshuffle take)."""
        expected = sum(self.sizes) if self.rank is None else self.sizes[self.rank]
        if x.dim() == 0 or x.size(0) != expected:
            raise ValueError(
                f"ShufflePlan: expected {expected} samples in dim 0 (device sizes "
                f"{list(self.sizes)}), got shape {tuple(x.shape)}"
            )


def _exchange_device(
    process_group: dist.ProcessGroup | None, device: torch.device | str | None
) -> torch.device:
    """CPU when the group's backend takes CPU tensors (gloo), else ``device`` or the GPU's.

    A pure NCCL group refuses CPU tensors; a gloo group (or ``"cpu:gloo,cuda:nccl"``) takes them
    without any host-device traffic.
    """
    backend = str(dist.get_backend(process_group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    if device is not None and torch.device(device).type != "cpu":
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device())


def _route(sizes: tuple[int, ...], perm: Tensor, rank: int) -> _Route:
    """The exchange that takes rank ``rank``'s samples to their shuffled positions.

    Rank ``r`` holds global samples and shuffled positions ``offset[r] .. offset[r] + sizes[r]``.
    It sends its samples sorted by destination position (so grouped by destination rank) and
    receives, from each source rank in turn, the samples of its positions sorted by position.
    """
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    world = len(sizes)

    def owner(index: Tensor) -> Tensor:
        return torch.bucketize(index, bounds[1:], right=True)

    dest = torch.argsort(perm)[start:stop]  # shuffled position of each local sample
    send_index = torch.argsort(dest)
    send_counts = torch.bincount(owner(dest), minlength=world).tolist()
    positions = torch.arange(start, stop)
    source = owner(perm[start:stop])  # rank that holds the sample of each local position
    arrival = torch.argsort(source * max(sum(sizes), 1) + positions)
    recv_counts = torch.bincount(source, minlength=world).tolist()
    return _Route(send_index, send_counts, recv_counts, torch.argsort(arrival))


class ShuffledModule(nn.Module):
    """``unshuffle(inner(shuffle(x)))`` in training; ``inner(x)`` in eval.

    The head ``inner`` (with per-device BatchNorm) sees, on each device, a random subset of the
    global batch instead of the device's own samples; the outputs come back in the input order,
    so the wrapper is a drop-in replacement. Each training forward that returns advances ``step``
    (a plain attribute, not saved in the state dict; a forward that raises leaves it) and uses
    the permutation of ``(seed, step)``, the same on every rank.

    * Across ranks (``num_devices=None``): the plan of ``process_group`` (default: world);
      every rank must call the wrapper in the same step. Each step makes one small all_gather of
      the local batch sizes and one all_to_all per direction. Without an initialized process
      group the batch is shuffled within the process.
    * ``num_devices=k`` (one process): the batch is ``k`` contiguous virtual devices; use
      :func:`~rethinkbn.distributed.virtual.virtual_devices` on ``inner`` for per-device BN.

    ``inner`` must return one tensor with the batch in dim 0.
    """

    def __init__(
        self,
        inner: nn.Module,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        num_devices: int | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_devices, "num_devices", "ShuffledModule", allow_none=True)
        if num_devices is not None and process_group is not None:
            raise ValueError("ShuffledModule: give process_group or num_devices, not both")
        self.inner = inner
        self.seed = seed
        self.process_group = process_group
        self.num_devices = num_devices
        self.step = 0

    def extra_repr(self) -> str:
        return f"seed={self.seed}, num_devices={self.num_devices}"

    def plan(self, x: Tensor) -> ShufflePlan:
        """The plan of this step for the batch ``x`` (does not advance ``step``)."""
        if self.num_devices is not None:
            return ShufflePlan.virtual(x.size(0), self.num_devices, self.seed, self.step)
        return ShufflePlan.across_ranks(
            x.size(0), self.seed, self.step, self.process_group, device=x.device
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Training: ``unshuffle(inner(shuffle(x), *args, **kwargs))`` with this step's plan,
        then the step counter advances (only after a step that went through); ``TypeError``
        when ``inner`` does not return one tensor with ``x``'s samples in dim 0. Eval:
        ``inner(x, *args, **kwargs)``."""
        if not self.training:
            return self.inner(x, *args, **kwargs)
        plan = self.plan(x)
        y = self.inner(plan.shuffle(x), *args, **kwargs)
        if not isinstance(y, Tensor) or y.dim() == 0 or y.size(0) != x.size(0):
            raise TypeError(
                f"ShuffledModule around {layer_name(self.inner)}: expected the inner module to "
                f"return one tensor with {x.size(0)} samples in dim 0, got "
                f"{type(y).__name__}{'' if not isinstance(y, Tensor) else tuple(y.shape)}"
            )
        out = plan.unshuffle(y)
        # Only a step that went through advances: after an error (caught and retried, say) every
        # rank must still agree on the step's permutation.
        self.step += 1
        return out
