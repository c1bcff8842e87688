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
            pass (default 300). When a rank raises during the pass, the others raise at once,
            naming it; when one never arrives (dead, stuck, or not calling the function), the
            others raise RuntimeError after ``timeout`` instead of the process group's timeout.
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
    options: PreciseBNOptions | None, overrides: Mapping[str, Any], caller: str
) -> PreciseBNOptions:
    """``options`` (default: all defaults) with ``overrides`` applied, checked.

    Raises TypeError naming ``caller`` for an ``options`` that is not a PreciseBNOptions or a
    keyword that is not one of its fields.
    """
    if options is not None and not isinstance(options, PreciseBNOptions):
        raise TypeError(
            f"{caller}: options must be a PreciseBNOptions, got {type(options).__name__}"
        )
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(
            f"{caller}: unknown arguments {unknown}; expected PreciseBNOptions fields "
            f"{sorted(OPTION_NAMES)}"
        )
    base = options or PreciseBNOptions()
    if "num_samples" in overrides and "num_batches" not in overrides:
        overrides = {**overrides, "num_batches": None}  # a keyword budget replaces the other
    elif "num_batches" in overrides and "num_samples" not in overrides:
        overrides = {**overrides, "num_samples": None}
    return dataclasses.replace(base, **overrides) if overrides else base


F = TypeVar("F", bound=Callable[..., Any])
# entry points whose **kwargs also take other keywords (FrozenBatchNorm's)
_MORE_KEYWORDS = {"freeze_with_precise_stats"}


def with_options(func: F) -> F:
    """Show ``func(..., options=None, **kwargs)`` as taking every option as a keyword.

    The signature (for ``help`` and IDEs) lists the fields of :class:`PreciseBNOptions` before
    ``**kwargs`` (kept only when ``func`` takes other keywords too, named in its docstring), and
    their documentation is appended to the docstring. The calls still go through ``**kwargs``,
    checked by :func:`options_from`.
    """
    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    var_keyword = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=f.type)
        for f in fields(PreciseBNOptions)
    ]
    if getattr(func, "__name__", "") in _MORE_KEYWORDS:
        params += var_keyword
    func.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    func.__doc__ = f"{func.__doc__ or ''}\n{OPTIONS_DOC}"
    return func
