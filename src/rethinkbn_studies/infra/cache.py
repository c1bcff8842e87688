"""The on-disk run cache: every finished training run survives Ctrl-C and crashes.

A run is keyed by its full configuration (a JSON-serializable dict that must include the seed and
everything that changes the result) and stored as one file ``<root>/<sha256 of the key>.pt``
written atomically (temporary file, then rename), so an interrupted run leaves no half file and a
rerun of ``rethinkbn reproduce`` reuses every finished run and resumes with the first missing one.

The files cannot carry code (:func:`save_result` / :func:`load_result`): despite the historical
suffix, an entry is a numpy ``.npz`` archive read with ``allow_pickle=False``, holding the
result's nested structure as JSON text (dicts, lists, tuples, numbers, strings, None) and its
tensors and numpy arrays as raw bytes with their dtype and shape. Nothing is unpickled. A file
that does not read under these rules (truncated by a full disk, a ``torch.save`` file of an older
version, a crafted pickle) is a miss: it is moved aside with a warning that names it
(:func:`set_aside`) and the run is done again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["RunCache", "config_key", "load_result", "save_result", "set_aside"]

T = TypeVar("T")
_MISSING = object()
_FORMAT = "rethinkbn-run-cache/2"


class UnsafeFileError(ValueError):
    """A file that does not read under the rules of :func:`load_result` (never unpickled)."""


def _encode(value: Any, arrays: list[np.ndarray]) -> Any:
    """``value`` as JSON-ready data; its tensors and arrays go to ``arrays`` as raw bytes."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):  # before float: np.float64 is a float
        if value.dtype.hasobject or value.dtype.fields is not None:
            raise TypeError(f"a cached result cannot hold a numpy {value.dtype} scalar")
        return {"numpy": value.dtype.str, "value": value.item()}
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, arrays) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, arrays) for k, v in value.items()}}
        return {"items": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"a cached result holds only dense tensors, got {value.layout}")
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.zeros(0, dtype=torch.uint8)
        arrays.append(raw.numpy().copy())
        return {"tensor": len(arrays) - 1, "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.fields is not None:
            raise TypeError(f"a cached result cannot hold a numpy array of dtype {value.dtype}")
        arrays.append(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())
        return {"ndarray": len(arrays) - 1, "dtype": value.dtype.str, "shape": list(value.shape)}
    raise TypeError(f"a cached result holds dicts, lists, tuples, numbers, strings, None, "
                    f"tensors and numpy arrays, got a {type(value).__module__}."
                    f"{type(value).__qualname__}")


def _shape(spec: Any, raw: np.ndarray, itemsize: int) -> tuple[int, ...]:
    if not (isinstance(spec, list) and all(type(n) is int and n >= 0 for n in spec)):
        raise UnsafeFileError(f"bad shape {spec!r}")
    if math.prod(spec) * itemsize != raw.size:
        raise UnsafeFileError(f"shape {spec} does not match {raw.size} bytes")
    return tuple(spec)


def _decode(data: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The inverse of :func:`_encode`; ``UnsafeFileError`` for anything it does not write."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, arrays) for v in data]
    if not isinstance(data, dict) or len(data) not in (1, 2, 3):
        raise UnsafeFileError(f"unexpected entry {str(data)[:80]!r}")
    if set(data) == {"tuple"} and isinstance(data["tuple"], list):
        return tuple(_decode(v, arrays) for v in data["tuple"])
    if set(data) == {"dict"} and isinstance(data["dict"], dict):
        return {k: _decode(v, arrays) for k, v in data["dict"].items()}
    if set(data) == {"items"} and isinstance(data["items"], list):
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in data["items"]):
            raise UnsafeFileError("bad dict items")
        return {_decode(k, arrays): _decode(v, arrays) for k, v in data["items"]}
    if set(data) == {"numpy", "value"}:
        dtype = np.dtype(str(data["numpy"]))
        if dtype.hasobject or dtype.fields is not None:
            raise UnsafeFileError(f"numpy scalar of dtype {dtype}")
        return dtype.type(data["value"])
    if set(data) == {"tensor", "dtype", "shape"}:
        kind = getattr(torch, str(data["dtype"]), None)
        if not isinstance(kind, torch.dtype):
            raise UnsafeFileError(f"unknown tensor dtype {data['dtype']!r}")
        raw = arrays.get(f"a{data['tensor']}")
        if raw is None:
            raise UnsafeFileError(f"missing tensor {data['tensor']!r}")
        shape = _shape(data["shape"], raw, kind.itemsize)
        if raw.size == 0:
            return torch.zeros(shape, dtype=kind)
        return torch.from_numpy(raw.copy()).view(kind).reshape(shape)
    if set(data) == {"ndarray", "dtype", "shape"}:
        dtype = np.dtype(str(data["dtype"]))
        raw = arrays.get(f"a{data['ndarray']}")
        if raw is None or dtype.hasobject or dtype.fields is not None:
            raise UnsafeFileError(f"bad array {data['ndarray']!r} of dtype {dtype}")
        return raw.view(dtype).reshape(_shape(data["shape"], raw, dtype.itemsize)).copy()
    raise UnsafeFileError(f"unexpected entry {str(data)[:80]!r}")


def save_result(path: Path | str, value: Any, meta: dict[str, Any] | None = None) -> None:
    """Write ``value`` to ``path`` in the cache's code-free format (see the module docstring);
    ``meta``: JSON data stored beside it (the run's config). ``TypeError`` for a value that
    holds anything but dicts, lists, tuples, numbers, strings, None, dense tensors and numpy
    arrays (nothing is written then, and a file already at ``path`` may be half-written: write
    to a temporary name and rename, as :meth:`RunCache.put` does)."""
    arrays: list[np.ndarray] = []
    text = json.dumps({"format": _FORMAT, "meta": meta, "value": _encode(value, arrays)})
    members: dict[str, Any] = {f"a{i}": a for i, a in enumerate(arrays)}
    with open(path, "wb") as f:
        np.savez(f, structure=np.frombuffer(text.encode(), dtype=np.uint8), **members)


def load_result(path: Path | str) -> tuple[Any, Any]:
    """``(value, meta)`` written by :func:`save_result`. The file is a zip of raw ``.npy``
    arrays read with ``allow_pickle=False`` and JSON text: nothing in it can run code.
    ``UnsafeFileError`` (a ``ValueError``) or ``OSError`` for a file that is not one."""
    with np.load(path, allow_pickle=False) as stored:
        if not isinstance(stored, np.lib.npyio.NpzFile) or "structure" not in stored.files:
            raise UnsafeFileError("not a rethinkbn result file (an older torch.save file, or "
                                  "not this format)")
        arrays = {name: stored[name] for name in stored.files}
    if any(a.dtype != np.uint8 or a.ndim != 1 for a in arrays.values()):
        raise UnsafeFileError("its members must be raw bytes")
    blob = json.loads(arrays.pop("structure").tobytes().decode())
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT or "value" not in blob:
        raise UnsafeFileError(f"not a {_FORMAT} file")
    return _decode(blob["value"], arrays), blob.get("meta")


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
    what it returns (what :func:`save_result` writes: dicts, lists, tuples, numbers, strings,
    None, tensors, numpy arrays; state dicts included) and returns it. ``hits`` and ``misses``
    count what happened, for the report and the tests. ``root=None`` gives a cache that keeps
    nothing (every call runs). ``data_fingerprint``: the content fingerprint of a ``--data``
    folder (:func:`rethinkbn_studies.toolkit.data.data_fingerprint`), part of every key when
    given, so that changed data never reads old results (None: keys are the configs' alone).
    """

    def __init__(self, root: Path | str | None, data_fingerprint: str | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.data_fingerprint = data_fingerprint
        self.hits = 0
        self.misses = 0

    def _keyed(self, config: dict[str, Any]) -> dict[str, Any]:
        if self.data_fingerprint is None:
            return config
        return {"run": config, "data_fingerprint": self.data_fingerprint}

    def path(self, config: dict[str, Any]) -> Path | None:
        """Where the result of ``config`` is stored (None without a root)."""
        if self.root is None:
            return None
        return self.root / f"{config_key(self._keyed(config))}.pt"

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
            result, stored = load_result(path)
            want = json.dumps(self._keyed(config), sort_keys=True)
            if json.dumps(stored, sort_keys=True) != want:
                raise UnsafeFileError("it holds the result of another configuration")
        except Exception as err:  # noqa: BLE001 - unreadable for any reason: run it again
            set_aside(path, err, "running it again")
            return _MISSING
        return result

    def put(self, config: dict[str, Any], result: Any) -> None:
        """Store ``result`` under ``config`` atomically (nothing is stored if saving fails)."""
        path = self.path(config)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            save_result(tmp, result, meta=self._keyed(config))
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
