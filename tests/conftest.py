"""Fixtures shared by the tests of the reproduction harness and its studies."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

from rethinkbn_studies.toolkit.data import load_mnist1d

# Property-based tests draw the same examples on every run (CI must not flake on a new draw);
# HYPOTHESIS_PROFILE=explore draws fresh ones, to hunt for new failing inputs locally.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# The dataset spec the tiny end-to-end runs use; `data_file` generates exactly this file.
TINY_SAMPLES = 1000


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-1D with 1000 samples, generated once per test session (``--data mnist1d:1000``)."""
    root = tmp_path_factory.mktemp("mnist1d")
    load_mnist1d(TINY_SAMPLES, cache_dir=root)
    return root / f"mnist1d-{TINY_SAMPLES}-42.npz"


@pytest.fixture(scope="session")
def tiny_data() -> str:
    """The ``--data`` value whose file :func:`data_file` holds."""
    return f"mnist1d:{TINY_SAMPLES}"


@pytest.fixture
def tiny_out(tmp_path: Path, data_file: Path) -> Path:
    """An output directory whose run cache already holds the tiny dataset (no regeneration)."""
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    shutil.copy(data_file, out / "cache")
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Several threads on a busy 2-core machine are many times slower for these tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def quiet() -> Callable[..., Any]:
    """A progress factory that draws nothing."""
    return lambda iterable=None, **kwargs: iterable


@pytest.fixture
def labels() -> Callable[[list[Any]], list[str]]:
    """``labels(summary_rows)``: their verdict labels ("agrees" / "disagrees")."""
    return lambda rows: [r.verdict.label for r in rows]
