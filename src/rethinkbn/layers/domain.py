"""Domain-specific BatchNorm: which statistics and affine parameters each domain uses.

The paper's Sec. 5 (Table 5): when one module sees inputs from several domains (e.g. a detection
head shared by all FPN levels), BatchNorm must decide, independently, which statistics SGD training
normalizes with, which population statistics inference uses and whether the affine transform is
shared. It works only when training and population statistics follow one paradigm.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from ..stats import Moments, compute_dtype
from . import functional as BF
from ._segments import group_by_domain, masked_domain_norm, segment_batch_norm
from .base import BatchNormBase, layer_name

__all__ = ["DomainBatchNorm", "use_domain"]

STATS_CHOICES = ("domain", "shared")
AFFINE_CHOICES = ("shared", "domain")

Domain = int | Tensor


class DomainBatchNorm(BatchNormBase):
    """BatchNorm over inputs from ``num_domains`` domains, with per-domain or shared statistics.

    Three independent choices (the six rows of the paper's Table 5):

    * ``train_stats``: ``"domain"`` normalizes every domain in a training batch with its own batch
      statistics; ``"shared"`` normalizes the whole batch together.
    * ``population_stats``: ``"domain"`` keeps running buffers of shape ``(num_domains, C)``
      (and ``num_batches_tracked`` of shape ``(num_domains,)``), updated from each domain's batch
      statistics (only domains present in the batch move) and used per domain at eval;
      ``"shared"`` keeps torch's ``(C,)`` buffers, updated from the whole batch's statistics
      and used for every domain at eval.
    * ``affine``: ``"shared"`` (or ``True``) one weight/bias of shape ``(C,)``; ``"domain"``
      weight/bias of shape ``(num_domains, C)``; ``False`` no affine transform.

    The domain is always explicit: ``forward(x, domain)`` with an int (the whole batch is one
    domain) or a LongTensor of one id per sample (every domain present is normalized with its own
    statistics); without it, the domain set by :func:`use_domain`.

    ``validate`` (default True) checks per-sample ids: in range, and at least 2 values per channel
    for every domain present. It reads the ids on the host: one host-device synchronization per
    layer per step on a GPU. Knowing the domains' sizes, a training step then sorts the samples
    by domain (no copy when the ids already come in blocks) and runs torch's BatchNorm kernel on
    each domain's samples: bit-identical to one torch BatchNorm per domain, at about the cost of
    writing that loop by hand. Under ``torch.compile``, and with ``validate=False``, nothing is
    read back: every domain is normalized in one vectorized pass of static shapes
    (:func:`~rethinkbn.layers._segments.masked_domain_norm`, plain autograd), so a compiled
    model has no graph break and does not recompile when the domains' sizes change from step
    to step (a domain absent included). Compiled, validation becomes device assertions
    (``torch._assert_async``: a RuntimeError naming the layer; asynchronous on a GPU). With
    ``validate=False`` ids out of range fail inside the indexing kernel (a device-side assert
    on CUDA, without the layer's name), and a domain with a single value per channel is
    normalized with a variance of 0. Ids are moved to the input's device.

    ``state_dict`` keys are torch's. A torch BatchNorm checkpoint (``(C,)`` tensors) loads into
    per-domain parameters and buffers by copying it to every domain. With ``num_domains == 1`` and
    everything shared, the layer equals torch's BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        train_stats: str = "domain",
        population_stats: str = "domain",
        affine: str | bool = "shared",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        validate: bool = True,
    ) -> None:
        check_positive_int(num_domains, "num_domains", "DomainBatchNorm")
        for name, value in (("train_stats", train_stats), ("population_stats", population_stats)):
            if value not in STATS_CHOICES:
                raise ValueError(
                    f"DomainBatchNorm: {name} must be one of {STATS_CHOICES}, got {value!r}"
                )
        affine_mode: object = "shared" if affine is True else None if affine is False else affine
        if affine_mode not in (*AFFINE_CHOICES, None):
            raise ValueError(
                f"DomainBatchNorm: affine must be one of {AFFINE_CHOICES}, True or False, got "
                f"{affine!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine_mode is not None, track_running_stats, device,
            dtype,
        )
        self.num_domains = num_domains
        self.validate = validate
        self.train_stats = train_stats
        self.population_stats = population_stats
        self.affine_mode: str | None = affine_mode  # checked above
        self.current_domain: Domain | None = None
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        shape = (num_domains, num_features)
        if affine_mode == "domain":
            self.weight = nn.Parameter(torch.ones(shape, **factory))
            self.bias = nn.Parameter(torch.zeros(shape, **factory))
        if track_running_stats and population_stats == "domain":
            self.running_mean = torch.zeros(shape, **factory)
            self.running_var = torch.ones(shape, **factory)
            self.num_batches_tracked = torch.zeros(num_domains, dtype=torch.long, device=device)
            self._init_nonfinite_count()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_domains={self.num_domains}, "
            f"train_stats={self.train_stats!r}, population_stats={self.population_stats!r}, "
            f"affine={self.affine_mode!r}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )

    # ------------------------------------------------------------------ domains
    def check_domain(
        self, domain: object, batch_size: int | None = None, device: torch.device | None = None
    ) -> Domain:
        """Return ``domain`` as an int or a LongTensor of ids (on ``device`` when given), or
        raise a clear error. Ids are range-checked only with ``validate`` (a host sync)."""
        return self._resolve_domain(domain, batch_size, device)[0]

    def _resolve_domain(
        self, domain: object, batch_size: int | None, device: torch.device | None
    ) -> tuple[Domain, Tensor | None]:
        """:meth:`check_domain`, and the number of samples of each domain when ``validate``
        counted them (the range check of per-sample ids), else None."""
        if isinstance(domain, Tensor) and domain.dim() == 0 and not domain.is_floating_point():
            if self._reads_ids() or batch_size is None:
                domain = int(domain)  # a host sync: range-checked here
            else:
                # Without validation, the same domain as per-sample ids: nothing is read back.
                domain = domain.reshape(1).expand(batch_size)
        if isinstance(domain, int) and not isinstance(domain, bool):
            if not 0 <= domain < self.num_domains:
                raise ValueError(
                    f"{layer_name(self)}: domain must be in [0, {self.num_domains}), got {domain}"
                )
            return domain, None
        if isinstance(domain, Tensor):
            if domain.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                    torch.uint8) or domain.dim() != 1:
                raise TypeError(
                    f"{layer_name(self)}: per-sample domain ids must be a 1-D integer tensor, "
                    f"got dtype {domain.dtype} and shape {tuple(domain.shape)}"
                )
            if batch_size is not None and domain.numel() != batch_size:
                raise ValueError(
                    f"{layer_name(self)}: expected one domain id per sample ({batch_size}), got "
                    f"{domain.numel()}"
                )
            counts = self._count_ids(domain) if self._reads_ids() else None
            if self.validate and counts is None:
                in_range = ((domain >= 0) & (domain < self.num_domains)).all()
                torch._assert_async(in_range, f"{layer_name(self)}: domain ids must be in [0, "
                                    f"{self.num_domains}) (checked on the device)")
            return domain.to(device=device, dtype=torch.long), counts
        if domain is None:
            raise ValueError(
                f"{layer_name(self)}: no domain given: call the layer as layer(x, domain=...) "
                "with an int or per-sample ids, or run it inside use_domain(model, domain)"
            )
        raise TypeError(
            f"{layer_name(self)}: domain must be an int or a 1-D integer tensor, got "
            f"{type(domain).__name__}"
        )

    def _reads_ids(self) -> bool:
        """Whether validation reads the ids on the host: in eager mode. Under ``torch.compile``
        the same checks are device assertions (``torch._assert_async``: no graph break; a
        RuntimeError with the layer's name when they fail, after the step on a GPU)."""
        return self.validate and not torch.compiler.is_compiling()

    def _count_ids(self, ids: Tensor) -> Tensor:
        """The number of samples of each domain (``bincount``), raising unless every id is in
        ``[0, num_domains)``."""
        try:
            counts = torch.bincount(ids.long(), minlength=self.num_domains)
        except RuntimeError:  # a negative id
            counts = None
        if counts is None or counts.numel() > self.num_domains:
            raise ValueError(
                f"{layer_name(self)}: domain ids must be in [0, {self.num_domains}), got "
                f"values from {int(ids.min())} to {int(ids.max())}"
            )
        return counts

    def _pick(self, t: Tensor | None, domain: Domain, per_domain: bool) -> Tensor | None:
        """The rows of a per-domain tensor that ``domain`` selects; shared tensors unchanged."""
        if t is None or not per_domain:
            return t
        return t[domain]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, domain: Domain | None = None) -> Tensor:
        self._check_input(x)
        dom, counts = self._resolve_domain(self.current_domain if domain is None else domain,
                                           x.size(0), x.device)
        ids = dom if isinstance(dom, Tensor) else None
        train_domains = self._uses_batch_stats() and self.train_stats == "domain"
        if ids is None and self._uses_batch_stats() or counts is not None and train_domains:
            return self._per_domain_forward(x, dom, counts)
        weight = self._pick(self.weight, dom, self.affine_mode == "domain")
        bias = self._pick(self.bias, dom, self.affine_mode == "domain")
        if not self._uses_batch_stats():
            per_domain = self.population_stats == "domain"
            mean = self._pick(self.running_mean, dom, per_domain)
            var = self._pick(self.running_var, dom, per_domain)
            return BF.affine_normalize(x, mean, var, weight, bias, self.eps)  # type: ignore[arg-type]
        assert ids is not None
        self._check_values_per_channel(x, ids)
        if self.train_stats == "domain":
            y, mean, var, count = masked_domain_norm(x, ids, self.num_domains, self.weight,
                                                     self.bias, self.eps)
            domain_moments = Moments.from_var_mean(count[:, None], mean, var)
            shared = domain_moments.total()
            batch_mean, batch_var = shared.mean, shared.var(unbiased=True)
        else:
            per_sample_affine = weight is not None and weight.dim() == 2
            y, batch_mean, batch_var = BF.native_batch_norm(
                x, None if per_sample_affine else weight, None if per_sample_affine else bias,
                self.eps,
            )
            if per_sample_affine:
                y = BF.apply_affine(y, weight, bias)
            domain_moments = None
        needs_domain_moments = self.observer is not None or (
            self._updates_running_stats() and self.population_stats == "domain"
        )
        if needs_domain_moments and domain_moments is None:
            domain_moments = self._domain_moments(x, dom, batch_mean, batch_var)
        if self._updates_running_stats():
            if self.population_stats == "shared":
                self._update_running_stats(batch_mean, batch_var)
            else:
                assert domain_moments is not None
                self._update_running_stats(
                    domain_moments.mean, domain_moments.var(unbiased=True),
                    present=domain_moments.count[:, 0] > 0,
                )
        if self.observer is not None:
            self._observe(domain_moments)  # type: ignore[arg-type]
        return y

    def _per_domain_forward(self, x: Tensor, domain: Domain, counts: Tensor | None) -> Tensor:
        """Training forward with one torch BatchNorm call per domain present in the batch.

        An int domain (the whole batch), or validated per-sample ids with per-domain training
        statistics: the ids are read on the host (validation already reads them), the samples
        are grouped by domain (no copy for one domain or ids already sorted), each group is
        normalized by torch's kernel with its domain's statistics and affine parameters, and the
        output is put back in the samples' order. Outputs, gradients and statistics are torch's
        BatchNorm on each domain's samples. With per-sample ids on CPU the kernel also blends
        each domain's running buffers, checked after (:meth:`_check_kernel_update`).
        """
        ids = domain if isinstance(domain, Tensor) else None
        spatial = x.numel() // max(x.size(0) * x.size(1), 1)
        BF.require_two_values(x.size(0) * spatial, x, lambda: layer_name(self))
        if ids is None:
            assert isinstance(domain, int)
            present = torch.arange(self.num_domains, device=x.device) == domain
            counts, domains = present * x.size(0), [domain]
        else:
            assert counts is not None
            counts = counts.to(x.device)
            sizes = counts.tolist()
            single = [d for d, n in enumerate(sizes) if 0 < n * spatial < 2]
            if single:
                BF.require_two_values(1, x, layer_name(self), " for every domain in the batch",
                                      f", domain(s) {single}")
            present = counts > 0
            domains = [d for d, n in enumerate(sizes) if n]
        kernel = (ids is not None and self.population_stats == "domain"
                  and self.observer is None and self._kernel_updates_buffers(x))
        if kernel:
            rm, rv, momentum = self.running_mean, self.running_var, self.momentum
            assert rm is not None and rv is not None and momentum is not None
            before, (mean, var) = torch.stack([rm, rv]), (rm, rv)
        else:
            # Every domain's statistics, (num_domains, C) each, written by torch's kernel
            # (momentum 1) into a throw-away buffer; absent domains keep ones.
            (mean, var), momentum = self._stats_buffer(x), 1.0
        per_domain = self.affine_mode == "domain"
        if len(domains) == 1:
            d, xs, parts = domains[0], x, [x.size(0)]
            y = F.batch_norm(x, mean[d], var[d], self._pick(self.weight, d, per_domain),
                             self._pick(self.bias, d, per_domain), True, momentum, self.eps)
        else:
            assert ids is not None
            xs, regroup = group_by_domain(x, ids)
            parts = [sizes[d] for d in domains]
            y = regroup(segment_batch_norm(xs, self.weight, self.bias, mean, var, parts,
                                           domains, per_domain, momentum, self.eps))
        if kernel:
            self._check_kernel_update(before, lambda: self._batch_stats(xs, parts, domains),
                                      present)
        else:
            self._use_batch_stats(mean, var, counts * spatial, present)
        return y

    def _stats_buffer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Two ``(num_domains, C)`` buffers of ones (one allocation) for torch's kernel to write
        means and variances into, in the dtype it wants (the parameters', else the compute
        dtype)."""
        like = self.weight if self.weight is not None else self.running_mean
        dtype = like.dtype if like is not None else compute_dtype(x)
        stats = torch.ones(2, self.num_domains, x.size(1), dtype=dtype, device=x.device)
        return stats[0], stats[1]

    @torch.no_grad()
    def _batch_stats(
        self, xs: Tensor, sizes: list[int], domains: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Each domain's batch mean and unbiased variance, ``(num_domains, C)`` (ones where
        absent), recomputed by torch's kernel from ``xs``, whose consecutive segments of
        ``sizes`` samples are the samples of ``domains``."""
        mean, var = self._stats_buffer(xs)
        for part, d in zip(xs.split(sizes), domains, strict=True):
            F.batch_norm(part, mean[d], var[d], None, None, True, 1.0, self.eps)
        return mean, var

    def _use_batch_stats(self, mean: Tensor, var: Tensor, count: Tensor, present: Tensor) -> None:
        """Blend each domain's batch statistics (``var`` unbiased, ``count`` values per channel)
        into the running buffers and give them to the observer."""
        moments = None
        if self.observer is not None or self.population_stats == "shared":
            moments = Moments.from_var_mean(count[:, None], mean, var, unbiased=True)
            keep = present[:, None]  # absent domains: count 0, mean and m2 0
            moments = Moments(moments.count, moments.mean.where(keep, 0), moments.m2.where(keep, 0))
        if self._updates_running_stats():
            if self.population_stats == "domain":
                self._update_running_stats(mean, var, present=present)
            else:
                assert moments is not None
                shared = moments.total()
                self._update_running_stats(shared.mean, shared.var(unbiased=True))
        if moments is not None:
            self._observe(moments)

    def _check_values_per_channel(self, x: Tensor, ids: Tensor | None) -> None:
        """Every set of values that gets a variance must have at least 2 per channel."""
        spatial = x.numel() // max(x.size(0) * x.size(1), 1)
        separate = ids is not None and (
            self.train_stats == "domain"
            or (self._updates_running_stats() and self.population_stats == "domain")
        )
        BF.require_two_values(x.size(0) * spatial, x, lambda: layer_name(self))
        if not separate or not self.validate or spatial >= 2:  # reading the ids is a host sync
            return
        assert ids is not None
        if not self._reads_ids():
            counts = (ids[None] == torch.arange(self.num_domains, device=ids.device)[:, None])
            torch._assert_async(
                (counts.sum(1) != 1).all(), f"{layer_name(self)}: expected more than 1 value per "
                "channel for every domain in the batch (checked on the device)")
            return
        counts = torch.bincount(ids, minlength=self.num_domains) * spatial
        single = ((counts > 0) & (counts < 2)).nonzero().flatten().tolist()
        if single:
            BF.require_two_values(1, x, layer_name(self), " for every domain in the batch",
                                  f", domain(s) {single}")

    def _domain_moments(
        self, x: Tensor, domain: Domain, batch_mean: Tensor, batch_var: Tensor
    ) -> Moments:
        """Float64 moments of every domain in the batch, shape ``(num_domains, C)``.

        With one domain for the whole batch they come from the batch's own (unbiased) statistics
        instead of another pass over ``x``.
        """
        if isinstance(domain, int):
            n = x.numel() // x.size(1)
            whole = Moments.from_var_mean(n, batch_mean, batch_var, unbiased=True)
            rows = Moments(whole.count[None], whole.mean[None], whole.m2[None])
            index = torch.full((1,), domain, device=x.device)
        else:
            if x.size(0) == 0:
                return Moments.zeros((self.num_domains, x.size(1)), device=x.device)
            rows, index = Moments.of(x, num_groups=x.size(0)), domain
        return rows.segment_merge(index, self.num_domains)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A torch BatchNorm checkpoint (shared tensors) initializes every domain with its values.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key, own = prefix + name, getattr(self, name)
            if key in state_dict and own is not None:
                value = state_dict[key]
                if value.dim() == own.dim() - 1 and own.dim() >= 1 and (
                    value.shape == own.shape[1:]
                ):
                    state_dict[key] = value.expand_as(own).clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@contextmanager
def use_domain(model: nn.Module, domain: Domain) -> Iterator[nn.Module]:
    """Set the current domain of every :class:`DomainBatchNorm` in ``model`` for a block.

    Side effects: sets ``current_domain`` on each DomainBatchNorm (after checking ``domain`` is
    valid for all of them, so nothing changes on error) and restores the previous values on exit,
    also when the block raises. A model without DomainBatchNorm gets a warning. Yields ``model``.
    """
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm)]
    if not layers:
        warnings.warn(
            f"use_domain: {model.__class__.__name__} has no DomainBatchNorm layer; the domain "
            f"{domain!r} is not used", stacklevel=3,
        )
    checked = [m.check_domain(domain) for m in layers]
    previous = [m.current_domain for m in layers]
    try:
        for m, d in zip(layers, checked, strict=True):
            m.current_domain = d
        yield model
    finally:
        for m, before in zip(layers, previous, strict=True):
            m.current_domain = before
