"""The on-disk run cache: every finished training run survives Ctrl-C and crashes.

A run is keyed by its full configuration (a JSON-serializable dict that must include the seed and
everything that changes the result) and stored as one file ``<root>/<sha256 of the key>.pt``
written atomically (temporary file, then rename), so an interrupted run leaves no half file and a
rerun of ``rethinkbn reproduce`` reuses every finished run and resumes with the first missing one.
A file that cannot be read (truncated by a full disk, say) is a miss: it is moved aside with a
warning that names it (:func:`set_aside`) and the run is done again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["RunCache", "config_key", "set_aside"]

T = TypeVar("T")
_MISSING = object()


def set_aside(path: Path, err: BaseException, then: str) -> Path:
    """Rename the unreadable file ``path`` to ``<name>.corrupt`` (``.corrupt1``, ... if taken),
    warn with its name and why it failed (``err``) and what happens ``then``; the new path."""
    aside = path.with_name(path.name + ".corrupt")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, aside)
    warnings.warn(f"{path} cannot be read ({type(err).__name__}: {err}); moved to {aside.name}, "
                  f"{then}", RuntimeWarning, stacklevel=3)
    return aside


def config_key(config: dict[str, Any]) -> str:
    """A stable key of ``config``: sha256 of its canonical JSON (sorted keys)."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(f"a run's config must be JSON-serializable, got {config!r}: {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RunCache:
    """Results of finished runs on disk, keyed by configuration.

    ``get_or_run(config, fn)`` returns the stored result of ``config`` or calls ``fn()``, stores
    what it returns (anything ``torch.save`` can write: numbers, lists, tensors, state dicts) and
    returns it. ``hits`` and ``misses`` count what happened, for the report and the tests.
    ``root=None`` gives a cache that keeps nothing (every call runs).
    """

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, config: dict[str, Any]) -> Path | None:
        return None if self.root is None else self.root / f"{config_key(config)}.pt"

    def get(self, config: dict[str, Any]) -> Any | None:
        """The stored result of ``config``, or None when it has not finished yet (or its file
        cannot be read: it is then moved aside, see :func:`set_aside`)."""
        result = self._read(config)
        return None if result is _MISSING else result

    def _read(self, config: dict[str, Any]) -> Any:
        path = self.path(config)
        if path is None or not path.exists():
            return _MISSING
        try:
            return torch.load(path, map_location="cpu", weights_only=False)["result"]
        except Exception as err:  # noqa: BLE001 - unreadable for any reason: run it again
            set_aside(path, err, "running it again")
            return _MISSING

    def put(self, config: dict[str, Any], result: Any) -> None:
        """Store ``result`` under ``config`` atomically (nothing is stored if saving fails)."""
        path = self.path(config)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save({"config": config, "result": result}, tmp)
            os.replace(tmp, path)
        finally:  # a save that fails (or is interrupted) leaves no partial file behind
            tmp.unlink(missing_ok=True)

    def get_or_run(self, config: dict[str, Any], fn: Callable[[], T]) -> T:
        """The cached result of ``config``, else ``fn()`` (stored before it is returned)."""
        stored = self._read(config)
        if stored is not _MISSING:
            self.hits += 1
            return stored
        self.misses += 1
        result = fn()
        self.put(config, result)
        return result
