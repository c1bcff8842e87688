"""Datasets for the studies: MNIST-1D generated locally, CIFAR-10 pickles, folders of images.

Every loader returns a :class:`DataSplit` of float32 inputs normalized with the training set's
per-channel mean and std, and int64 labels. Nothing is ever downloaded.

- **MNIST-1D** (the default, :func:`load_mnist1d`): the ``mnist1d`` package's generator
  (``make_dataset`` with ``get_dataset_args()``), ``num_samples=10_000`` by default (8000 train,
  2000 validation; the package's 80/20 split), inputs ``(N, 1, 40)``, 10 classes. Generation is a
  Python loop of a few seconds, so the arrays are cached as ``.npz`` in ``cache_dir``. The
  generator seeds numpy's and Python's global RNGs; both are restored afterwards.
- **CIFAR-10** (:func:`load_cifar10`): a folder with the standard python version
  (``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, pickles of ``b"data"`` uint8
  ``(N, 3072)`` and ``b"labels"``); inputs ``(N, 3, 32, 32)``. The pickles are read by a
  restricted unpickler that builds only what a CIFAR batch holds (dicts, lists, bytes, str,
  numbers and numpy arrays): anything else is refused, naming the file, before it can run.
- **A folder of images per class** (:func:`load_image_folder`): ``root/<class>/<image>`` (or
  ``root/train/<class>/...`` with ``root/val/<class>/...``); any format PIL reads, all images of
  one size, converted to RGB. Without a train/val split, a seeded 20% of each class is held out.

A file that cannot be used (truncated, not a CIFAR batch, image and label counts that differ, an
unreadable image, a class with too few images) raises one ``ValueError`` naming the file and the
problem, before any training. :func:`data_fingerprint` hashes the files a folder's loader reads,
for the run cache's keys and the report.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..infra.cache import set_aside

__all__ = [
    "DataSplit",
    "check_data_spec",
    "data_fingerprint",
    "load_cifar10",
    "load_data",
    "load_image_folder",
    "load_mnist1d",
]

MNIST1D_SAMPLES = 10_000
MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DataSplit:
    """Training and validation tensors of one dataset.

    ``train_x`` / ``val_x``: float32 ``(N, C, L)`` or ``(N, C, H, W)``, normalized per channel
    with the training set's statistics; ``train_y`` / ``val_y``: int64 class indices.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def spatial_dims(self) -> int:
        """1 for sequences (MNIST-1D), 2 for images."""
        return self.train_x.dim() - 2

    def subset(self, num_train: int | None = None, num_val: int | None = None) -> DataSplit:
        """The first ``num_train`` training and ``num_val`` validation samples (quick mode)."""
        return DataSplit(
            name=self.name,
            train_x=self.train_x[:num_train],
            train_y=self.train_y[:num_train],
            val_x=self.val_x[:num_val],
            val_y=self.val_y[:num_val],
            num_classes=self.num_classes,
        )


def _normalized(name: str, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                num_classes: int) -> DataSplit:
    dims = [0] + list(range(2, train_x.dim()))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return DataSplit(
        name=name,
        train_x=((train_x - mean) / std).float().contiguous(),
        train_y=train_y.long(),
        val_x=((val_x - mean) / std).float().contiguous(),
        val_y=val_y.long(),
        num_classes=num_classes,
    )


def _generate_mnist1d(num_samples: int, seed: int,
                      corr_noise_scale: float | None = None) -> dict[str, Any]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    if corr_noise_scale is not None:
        args.corr_noise_scale = corr_noise_scale
    # make_dataset seeds numpy's and Python's global RNGs; nobody else's randomness may change.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(raw[k]) for k in MNIST1D_ARRAYS}


def _read_npz(path: Path) -> dict[str, Any] | None:
    """The MNIST-1D arrays cached in ``path``, or None when it cannot be read (it is then moved
    aside with a warning and the data are generated again)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in MNIST1D_ARRAYS}
    except Exception as err:  # noqa: BLE001 - truncated, junk, missing arrays: regenerate
        set_aside(path, err, "generating the data again")
        return None
    return arrays


def load_mnist1d(
    num_samples: int = MNIST1D_SAMPLES, seed: int = 42, cache_dir: Path | str | None = None,
    corr_noise_scale: float | None = None,
) -> DataSplit:
    """MNIST-1D from the ``mnist1d`` generator, run locally (never downloaded).

    ``num_samples`` are generated (80% train, 20% validation) with the generator's ``seed``;
    the arrays are cached as ``cache_dir/mnist1d-<num_samples>-<seed>.npz`` when given (a cached
    file that cannot be read is moved aside with a warning and generated again).
    ``corr_noise_scale``: the generator's correlated-noise scale (its default, 0.25, when None;
    larger is harder); a non-default value adds ``-corr<value>`` to the file name.
    """
    if num_samples < 20:
        raise ValueError(f"MNIST-1D needs num_samples >= 20 (2 per class), got {num_samples}")
    if corr_noise_scale is not None and not corr_noise_scale >= 0:
        raise ValueError(f"MNIST-1D: corr_noise_scale must be >= 0, got {corr_noise_scale}")
    tag = "" if corr_noise_scale is None else f"-corr{corr_noise_scale:g}"
    path = (None if cache_dir is None
            else Path(cache_dir) / f"mnist1d-{num_samples}-{seed}{tag}.npz")
    arrays = None if path is None or not path.exists() else _read_npz(path)
    if arrays is None:
        arrays = _generate_mnist1d(num_samples, seed, corr_noise_scale)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")  # one per process
            np.savez(tmp, **arrays)
            tmp.replace(path)
    return _normalized(
        "MNIST-1D",
        torch.from_numpy(arrays["x"]).float().unsqueeze(1),
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]).float().unsqueeze(1),
        torch.from_numpy(arrays["y_test"]),
        num_classes=10,
    )


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asks for something a CIFAR-10 batch never holds."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes (protocol < 3) call it: latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"refused _codecs.encode with encoding {encoding!r}: a CIFAR-10 "
                             "batch's bytes are latin-1 (the file was not unpickled further)")
    return codecs.encode(text, "latin1")


# What a CIFAR-10 batch's pickle may name (numpy 1 and 2 spellings), and what each name builds.
_CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core", "numpy._core"):
    _CIFAR_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
    _CIFAR_GLOBALS[(f"{_module}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
    _CIFAR_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, tuples, bytes, str, numbers and numpy arrays
    (numpy's own reconstruction functions) and refuses every other global, so that a crafted
    file cannot call anything."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "bytes, str, numbers and numpy arrays (the file was not unpickled further)")
        return found


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 batch: uint8 images ``(N, 3, 32, 32)`` scaled to [0, 1] and int64 labels;
    ``ValueError`` naming ``path`` for anything that is not one."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise ValueError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - truncated or damaged pickles raise many types
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle, truncated or damaged "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a CIFAR-10 batch (a dict with 'data' and 'labels'), "
                         f"got a {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: expected a CIFAR-10 pickle with 'data' and 'labels' keys")
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except Exception as err:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(f"{path}: 'data' and 'labels' must be arrays ({err})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} "
                         f"{tuple(data.shape)}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be a list of integers, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and not (0 <= labels.min() and labels.max() < 10):
        raise ValueError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return x.float() / 255.0, torch.from_numpy(labels.astype(np.int64))


def _cifar_files(root: Path) -> list[Path]:
    """The batches of a CIFAR-10 folder, training first; ``FileNotFoundError`` if absent."""
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").exists():
        raise FileNotFoundError(
            f"{root}: expected CIFAR-10's python files data_batch_1..5 and test_batch"
        )
    return [*train_files, root / "test_batch"]


def load_cifar10(root: Path | str) -> DataSplit:
    """CIFAR-10 from its python pickles in ``root`` (``data_batch_*`` and ``test_batch``), read
    without running code (see the module docstring). ``FileNotFoundError`` without them;
    ``ValueError`` naming the file for one that is not a CIFAR-10 batch, and for no images."""
    root = Path(root)
    *train_files, test_file = _cifar_files(root)
    parts = [_read_cifar_batch(p) for p in train_files]
    val_x, val_y = _read_cifar_batch(test_file)
    train_y = torch.cat([y for _, y in parts])
    if not len(train_y) or not len(val_y):
        empty = [str(p) for p, (_, y) in zip([*train_files, test_file], [*parts, (val_x, val_y)],
                                             strict=True) if not len(y)]
        raise ValueError(f"{root}: no training or no validation images ({', '.join(empty)} "
                         "hold none)")
    return _normalized(
        "CIFAR-10",
        torch.cat([x for x, _ in parts]),
        train_y,
        val_x,
        val_y,
        num_classes=10,
    )


def _read_images(folder: Path, classes: list[str]) -> tuple[list[Tensor], list[int]]:
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            raise ValueError(f"{folder / cls}: missing (every class of the training folder "
                             "needs a folder here)")
        for path in _image_files(folder / cls):
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            except Exception as err:  # noqa: BLE001 - PIL raises many types on a damaged file
                raise ValueError(f"{path}: cannot be read as an image ({type(err).__name__}: "
                                 f"{err})") from None
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return images, labels


def _image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def _check_class_counts(folder: Path, classes: list[str], labels: list[int], least: int,
                        why: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    for cls, n in zip(classes, counts, strict=True):
        if n < least:
            raise ValueError(f"{folder / cls}: {n} image{'s' if n != 1 else ''}; each class "
                             f"needs at least {least} {why}")


def _stack(images: list[Tensor], root: Path) -> Tensor:
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise ValueError(f"{root}: all images must have one size, found {sorted(sizes)}")
    return torch.stack(images)


def load_image_folder(root: Path | str, val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Images in ``root/<class>/`` (or ``root/train/<class>/`` and ``root/val/<class>/``)."""
    root = Path(root)
    split = (root / "train").is_dir() and (root / "val").is_dir()
    train_root = root / "train" if split else root
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{train_root}: expected one sub-folder per class (>= 2), got {classes}")
    images, labels = _read_images(train_root, classes)
    if not images:
        raise ValueError(f"{train_root}: no images with suffixes {IMAGE_SUFFIXES}")
    _check_class_counts(train_root, classes, labels, 1 if split else 2,
                        "to train on" if split else "without a train/val split (one to train "
                        "on, one held out for validation)")
    x, y = _stack(images, root), torch.tensor(labels)
    if split:
        val_images, val_labels = _read_images(root / "val", classes)
        if not val_images:
            raise ValueError(f"{root / 'val'}: no images with suffixes {IMAGE_SUFFIXES}")
        val_x, val_y = _stack(val_images, root), torch.tensor(val_labels)
        train_x, train_y = x, y
    else:
        gen = torch.Generator().manual_seed(seed)
        held_out = torch.zeros(len(y), dtype=torch.bool)
        for c in range(len(classes)):
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            held_out[idx[: max(1, round(val_fraction * len(idx)))]] = True
        train_x, train_y, val_x, val_y = x[~held_out], y[~held_out], x[held_out], y[held_out]
    return _normalized(root.name or "images", train_x, train_y, val_x, val_y, len(classes))


def check_data_spec(spec: str) -> int | None:
    """Check ``--data`` without loading anything: MNIST-1D's sample count for ``mnist1d`` /
    ``mnist1d:<num_samples>``, None for a folder; ``ValueError`` / ``FileNotFoundError``
    otherwise."""
    if spec == "mnist1d":
        return MNIST1D_SAMPLES
    if spec.startswith("mnist1d:"):
        text = spec.split(":", 1)[1]
        if not text.isdigit() or int(text) < 20:
            raise ValueError(f"--data {spec!r}: expected 'mnist1d:<num_samples>' with an integer "
                             f">= 20 (2 per class), got {text!r}")
        return int(text)
    if not Path(spec).is_dir():
        raise FileNotFoundError(
            f"--data {spec!r}: expected 'mnist1d', 'mnist1d:<num_samples>' or a folder"
        )
    return None


def _cifar_root(root: Path) -> Path | None:
    """The folder of CIFAR-10's batches in the ``--data`` folder ``root``, or None."""
    if (root / "test_batch").exists() or (root / "data_batch_1").exists():
        return root
    if (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    return None


def load_data(spec: str, cache_dir: Path | str | None = None) -> DataSplit:
    """The dataset named by ``--data``: ``mnist1d`` (default), ``mnist1d:<num_samples>``, or a
    folder holding CIFAR-10's python pickles or one sub-folder of images per class."""
    num = check_data_spec(spec)
    if num is not None:
        return load_mnist1d(num, cache_dir=cache_dir)
    cifar = _cifar_root(Path(spec))
    return load_image_folder(spec) if cifar is None else load_cifar10(cifar)


def data_fingerprint(spec: str) -> str | None:
    """The content fingerprint of the ``--data`` folder ``spec``: ``sha256:<16 hex digits>`` of
    the sorted relative names, sizes and contents (sha256) of the files its loader reads (the
    CIFAR-10 batches; the images under the folder, at any depth). None for ``mnist1d`` specs
    (generated data: the spec says it all). Reads every file once; ``ValueError`` naming a file
    that cannot be read."""
    if check_data_spec(spec) is not None:
        return None
    root = Path(spec)
    cifar = _cifar_root(root)
    if cifar is not None:
        files = _cifar_files(cifar)
    else:
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    total = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
        name = path.relative_to(root).as_posix()
        total.update(f"{name}\0{path.stat().st_size}\0{digest.hexdigest()}\n".encode())
    return f"sha256:{total.hexdigest()[:16]}"
