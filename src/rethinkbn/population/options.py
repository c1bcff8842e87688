"""The options of a statistics pass, defined once for every entry point.

:func:`~rethinkbn.population.precise_bn`, :func:`~rethinkbn.population.recompute_stats`,
:func:`~rethinkbn.population.ema_report`, :func:`~rethinkbn.population.freeze_with_precise_stats`,
the plain-loop hooks and the Lightning callbacks all take the fields of :class:`PreciseBNOptions`,
either as keywords (``precise_bn(model, data, num_samples=2000)``) or as one object
(``precise_bn(model, data, options=opts)``; keywords then override its fields). Every field is
checked when the options are built, before anything runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_positive_int

__all__ = ["ForwardFn", "PreciseBNOptions", "options_from", "with_options"]

ForwardFn = Callable[[nn.Module, Any], Any]

DEFAULT_NUM_SAMPLES = 10_000

OPTIONS_DOC = """\
    Options (the fields of :class:`~rethinkbn.population.PreciseBNOptions`, as keywords or as
    ``options=``; keywords override the object's fields):
        num_samples / num_batches: the budget (at most one of them; default 10^4 samples). Whole
            batches are consumed until at least ``num_samples`` samples (or exactly
            ``num_batches`` batches) were seen. A shorter ``data`` warns, or raises with
            ``strict=True``. Empty batches (N=0) count as batches and contribute nothing.
        forward: ``forward(model, batch)`` runs one batch (default: ``model(x)`` with ``x`` the
            batch, its first element, or ``batch[input_key]``).
        input_key: which entry of a mapping batch is the model input.
        device: batches are moved there when given.
        pass_norm_batch_size: GhostBatchNorm (and the other grouping layers) normalize the
            pass's batches in groups of this many samples (None: the whole batch). ValueError
            when no layer of the pass can group.
        include_frozen: also estimate FrozenBatchNorm layers (they keep normalizing with their
            old statistics during the pass).
        keep_modes: leave non-BatchNorm modules in their current mode (default: eval, dropout
            off).
        strict: a ``data`` shorter than the budget raises instead of warning.
        progress: a tqdm bar (default: when stderr is a terminal).
        process_group: when torch.distributed is initialized, the group whose ranks' moments are
            merged (default: world).
        timeout: seconds (or a ``timedelta``) every rank waits for the others at the end of the
            pass (default 300). When a rank raises during the pass, the others raise
            RuntimeError at once, naming it; when one never arrives (stuck, or not calling the
            function), the others raise TimeoutError after ``timeout`` instead of the process
            group's timeout; a rank whose process died makes the backend fail the exchange, and
            the others raise RuntimeError as soon as it does.
"""


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"PreciseBNOptions: {name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class PreciseBNOptions:
    """How a statistics pass runs: budget, forward, devices, layers, modes and ranks.

    Frozen; build a variant with :func:`dataclasses.replace`. The fields are documented below
    (the same text every entry point's docstring carries).
    """

    num_samples: int | None = None
    num_batches: int | None = None
    forward: ForwardFn | None = None
    input_key: Any = None
    device: torch.device | str | None = None
    pass_norm_batch_size: int | None = None
    include_frozen: bool = False
    keep_modes: bool = False
    strict: bool = False
    progress: bool | None = None
    process_group: dist.ProcessGroup | None = None
    timeout: float | datetime.timedelta = 300.0

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_batches is not None:
            raise ValueError(
                f"PreciseBNOptions: pass num_samples (got {self.num_samples!r}) or num_batches "
                f"(got {self.num_batches!r}), not both"
            )
        for name in ("num_samples", "num_batches", "pass_norm_batch_size"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(value, name, "PreciseBNOptions")
        for name in ("include_frozen", "keep_modes", "strict"):
            _check_flag(getattr(self, name), name)
        if self.progress is not None:
            _check_flag(self.progress, "progress")
        if self.forward is not None and not callable(self.forward):
            raise TypeError(
                f"PreciseBNOptions: forward must be callable as forward(model, batch), got "
                f"{type(self.forward).__name__}"
            )
        seconds = self.timeout_seconds
        if not seconds > 0:
            raise ValueError(f"PreciseBNOptions: timeout must be > 0 seconds, got {self.timeout!r}")

    @property
    def timeout_seconds(self) -> float:
        timeout = self.timeout
        if isinstance(timeout, datetime.timedelta):
            return timeout.total_seconds()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(
                f"PreciseBNOptions: timeout must be seconds (a number) or a timedelta, got "
                f"{type(timeout).__name__}"
            )
        return float(timeout)

    @property
    def budget(self) -> tuple[str, int]:
        """``("batches", n)`` or ``("samples", n)``; 10^4 samples when neither was given."""
        if self.num_batches is not None:
            return "batches", self.num_batches
        return "samples", DEFAULT_NUM_SAMPLES if self.num_samples is None else self.num_samples


PreciseBNOptions.__doc__ = f"{PreciseBNOptions.__doc__}\n{OPTIONS_DOC}"

OPTION_NAMES = frozenset(f.name for f in fields(PreciseBNOptions))


def options_from(
    options: PreciseBNOptions | None, overrides: Mapping[str, Any]
) -> PreciseBNOptions:
    """``options`` (default: all defaults) with ``overrides`` applied, checked.

    Raises TypeError for an ``options`` that is not a PreciseBNOptions or a keyword that is not
    one of its fields (the entry point adds its name, :func:`rethinkbn._checks.in_context`).
    """
    if options is not None and not isinstance(options, PreciseBNOptions):
        raise TypeError(f"options must be a PreciseBNOptions, got {type(options).__name__}")
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"unknown arguments {unknown}; expected PreciseBNOptions fields {sorted(OPTION_NAMES)}"
        )
    base = options or PreciseBNOptions()
    if "num_samples" in overrides and "num_batches" not in overrides:
        overrides = {**overrides, "num_batches": None}  # a keyword budget replaces the other
    elif "num_batches" in overrides and "num_samples" not in overrides:
        overrides = {**overrides, "num_samples": None}
    return dataclasses.replace(base, **overrides) if overrides else base


F = TypeVar("F", bound=Callable[..., Any])


def with_options(*, other_keywords: bool = False) -> Callable[[F], F]:
    """Show ``func(..., options=None, **kwargs)`` as taking every option as a keyword.

    The signature (for ``help`` and IDEs) lists the fields of :class:`PreciseBNOptions` before
    ``**kwargs``, which stays in it only with ``other_keywords=True`` (the function's
    ``**kwargs`` also takes keywords that are not options, named in its docstring); their
    documentation is appended to the docstring. The calls still go through ``**kwargs``,
    checked by :func:`options_from`. Side effect: sets ``func.__signature__`` and
    ``func.__doc__``; returns ``func`` itself.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        var_keyword = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
        params += [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=f.type)
            for f in fields(PreciseBNOptions)
        ]
        if other_keywords:
            params += var_keyword
        func.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        func.__doc__ = f"{func.__doc__ or ''}\n{OPTIONS_DOC}"
        return func

    return decorate
