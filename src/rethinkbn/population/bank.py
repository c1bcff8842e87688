"""Named snapshots of BatchNorm statistics, and switching a model between them.

A *snapshot* is a plain dict ``{layer qualified name: {"running_mean": t, "running_var": t}}``:
the population statistics of every BatchNorm layer of one model (the paper's Sec. 5.1 keeps one per
test domain). A :class:`StatsBank` holds several under names such as ``"source"`` and
``"contrast"``, saves them to one ``torch.save`` file, and switches a model between them in
place: O(number of BatchNorm layers) tensor copies, no copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import in_context
from .._model import STAT_BUFFERS, unwrap
from ._state import stat_layers

__all__ = ["Snapshot", "StatsBank", "capture_stats", "install_stats"]

Snapshot = dict[str, dict[str, Tensor]]
_FORMAT = "rethinkbn.StatsBank/1"


def _stat_layers(model: nn.Module) -> dict[str, nn.Module]:
    return dict(stat_layers(unwrap(model)))


def capture_stats(model: nn.Module) -> Snapshot:
    """A snapshot (copies) of the running statistics of every BatchNorm layer of ``model``."""
    return {
        name: {key: getattr(layer, key).detach().clone() for key in STAT_BUFFERS}
        for name, layer in _stat_layers(model).items()
    }


def _check_layout(value: Tensor, where: str) -> None:
    """A statistic is a dense (strided) floating-point tensor; anything else cannot be copied
    into a running buffer exactly (a sparse tensor fails half-way, an integer one truncates)."""
    if value.layout != torch.strided:
        raise ValueError(f"{where}: expected a dense (strided) tensor, got layout {value.layout}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{where}: expected a floating-point tensor, got dtype {value.dtype}")
    if value.is_meta:
        raise ValueError(f"{where}: expected a tensor with data, got one on the meta device")


def _check_snapshot(layers: Mapping[str, nn.Module], stats: Mapping[str, Mapping[str, Tensor]],
                    partial: bool = False) -> None:
    """Raise ValueError unless ``stats`` covers ``layers`` (a subset with ``partial``) with
    dense floating-point tensors of the buffers' shapes (the entry point adds its name)."""
    missing = [] if partial else sorted(set(layers) - set(stats))
    unknown = sorted(set(stats) - set(layers))
    if missing or unknown:
        raise ValueError(
            "the snapshot does not match the model's BatchNorm layers; missing "
            f"{missing or 'none'}, not in the model {unknown or 'none'}"
        )
    for name in stats:
        layer = layers[name]
        for key in STAT_BUFFERS:
            got = stats[name].get(key)
            want = getattr(layer, key)
            if not isinstance(got, Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, Tensor) else got
                raise ValueError(
                    f"layer '{name}' ({layer.__class__.__name__}) expects {key} of shape "
                    f"{tuple(want.shape)}, the snapshot has {shape}"
                )
            _check_layout(got, f"layer '{name}' ({layer.__class__.__name__}) {key}")


@in_context("install_stats")
def install_stats(
    model: nn.Module, stats: Mapping[str, Mapping[str, Tensor]], *, partial: bool = False
) -> None:
    """Copy a snapshot into the model's running buffers, in place (same tensor objects).

    The snapshot must cover every BatchNorm layer with running statistics, or, with
    ``partial=True``, a subset of them. Every layer name and shape is checked before anything is
    written; a mismatch raises and the model is unchanged. ``num_batches_tracked``, parameters
    and modes are not touched.
    """
    layers = _stat_layers(model)
    _check_snapshot(layers, stats, partial)
    _copy_into(layers, stats)


def _saved(layers: Mapping[str, nn.Module], names: Iterable[str]) -> Snapshot:
    return {name: {key: getattr(layers[name], key).clone() for key in STAT_BUFFERS}
            for name in names}


def _copy_into(layers: Mapping[str, nn.Module], stats: Mapping[str, Mapping[str, Tensor]],
               saved: Snapshot | None = None) -> None:
    """Copy every statistic, all or nothing: a copy that fails puts back those already made
    (from ``saved``, the current values, copied here when the caller has none)."""
    if saved is None:
        saved = _saved(layers, stats)
    done: list[str] = []
    with torch.no_grad():
        try:
            for name in stats:
                done.append(name)
                for key in STAT_BUFFERS:
                    getattr(layers[name], key).copy_(stats[name][key])
        except BaseException:
            for name in done:
                for key in STAT_BUFFERS:
                    getattr(layers[name], key).copy_(saved[name][key])
            raise


class StatsBank:
    """Named snapshots of a model's BatchNorm statistics.

    ::

        bank = StatsBank()
        bank["source"] = capture_stats(model)
        bank["contrast"] = recompute_stats(model, contrast_loader)
        with bank.use(model, "contrast"):
            evaluate(model, contrast_test_loader)      # normalizes with contrast statistics
        bank.save("stats.pt"); bank = StatsBank.load("stats.pt")

    Switching copies the snapshot into the model's buffers (2 tensor copies per layer) and, on
    leaving ``use``, copies the previous values back: the restore is bit-identical.
    """

    def __init__(self, snapshots: Mapping[str, Snapshot] | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        for name, snapshot in (snapshots or {}).items():
            self[name] = snapshot

    # ------------------------------------------------------------------ mapping
    def __setitem__(self, name: str, snapshot: Mapping[str, Mapping[str, Tensor]]) -> None:
        if not isinstance(name, str):
            raise TypeError(f"snapshot names are strings, got {type(name).__name__}")
        for layer, value in snapshot.items():
            if not all(isinstance(value.get(key), Tensor) for key in STAT_BUFFERS):
                missing = any(key not in value for key in STAT_BUFFERS)
                raise (ValueError if missing else TypeError)(
                    f"StatsBank[{name!r}]: layer {layer!r} needs tensors {list(STAT_BUFFERS)}, "
                    f"got {sorted(value)}"
                )
            for key in STAT_BUFFERS:
                _check_layout(value[key], f"StatsBank[{name!r}]: layer {layer!r} {key}")
        self._snapshots[name] = {
            layer: {key: value[key].detach().clone() for key in STAT_BUFFERS}
            for layer, value in snapshot.items()
        }

    def __getitem__(self, name: str) -> Snapshot:
        if name not in self._snapshots:
            raise KeyError(f"no snapshot named {name!r}; the bank holds {self.names}")
        return self._snapshots[name]

    def __delitem__(self, name: str) -> None:
        self[name]  # noqa: B018 - raises the helpful KeyError
        del self._snapshots[name]

    def __contains__(self, name: object) -> bool:
        return name in self._snapshots

    def __len__(self) -> int:
        return len(self._snapshots)

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshots)

    @property
    def names(self) -> list[str]:
        return list(self._snapshots)

    def capture(self, model: nn.Module, name: str) -> None:
        """Store (a copy of) the model's current statistics under ``name``.

        The model comes first, then the name, as in :meth:`install` and :meth:`use`.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"StatsBank.capture(model, name): model must be an nn.Module, got "
                f"{type(model).__name__} (the model comes first, then the name)"
            )
        self[name] = capture_stats(model)

    # ------------------------------------------------------------------ switching
    def install(self, model: nn.Module, name: str) -> None:
        """Copy snapshot ``name`` into the model for good (see :func:`install_stats`)."""
        install_stats(model, self[name])

    @contextmanager
    def use(self, model: nn.Module, name: str) -> Iterator[nn.Module]:
        """Within the block the model normalizes with snapshot ``name``; then exactly as before.

        Side effect: the model's running buffers are overwritten in place for the block and
        restored on exit, also on an exception.
        """
        snapshot = self[name]
        layers = _stat_layers(model)
        with in_context(f"StatsBank.use({name!r})"):
            _check_snapshot(layers, snapshot)
        saved = _saved(layers, layers)
        try:
            _copy_into(layers, snapshot, saved)
            yield model
        finally:
            _copy_into(layers, saved, saved)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        """Write every snapshot to one file (``torch.save`` of a plain dict of tensors)."""
        torch.save({"format": _FORMAT, "snapshots": self._snapshots}, path)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = None) -> StatsBank:
        """Read a file written by :meth:`save` (loaded with ``weights_only=True``).

        Raises ValueError naming the file when it is not a StatsBank file (empty, truncated,
        junk, or a ``torch.save`` of something else); a missing file raises FileNotFoundError, an
        unreadable one the usual OSError.
        """
        def not_a_bank(why: str) -> ValueError:
            return ValueError(
                f"{path}: not a StatsBank file ({why}); expected a file written by "
                f"StatsBank.save (format {_FORMAT})"
            )

        try:
            blob = torch.load(path, map_location=map_location, weights_only=True)
        except OSError:
            raise
        except Exception as error:  # torch/pickle raise many types on a damaged file
            why = ("the file is empty" if Path(path).stat().st_size == 0 else
                   f"torch.load cannot read it, it is truncated or damaged: "
                   f"{type(error).__name__} {str(error)[:80]}")
            raise not_a_bank(why) from error
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise not_a_bank(f"it holds a {type(blob).__name__} without that format tag")
        snapshots = blob.get("snapshots")
        if not isinstance(snapshots, dict) or not all(
            isinstance(name, str) and isinstance(snapshot, dict)
            and all(isinstance(layer, str) and isinstance(value, dict)
                    for layer, value in snapshot.items())
            for name, snapshot in snapshots.items()
        ):
            raise not_a_bank("its snapshots are not {name: {layer: {buffer: tensor}}}")
        try:
            return cls(snapshots)
        except (TypeError, ValueError) as error:
            raise not_a_bank(str(error)) from error

    def __repr__(self) -> str:
        return f"StatsBank({self.names})"
