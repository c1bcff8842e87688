"""The reproduction harness behind ``rethinkbn reproduce``: a package of its own beside the
``rethinkbn`` library, using only the library's public API (the library never imports it; its
dependencies come with the ``studies`` extra).

Shared pieces: :mod:`.base` (the study contract and registry), :mod:`.data` (MNIST-1D and image
folders), :mod:`.models` (1-D and 2-D ResNets), :mod:`.train` (the SGD loop), :mod:`.cache` (the
on-disk run cache), :mod:`.paper` (the paper's numbers), :mod:`.report` (report.md, results.json)
and :mod:`.harness` (runs the selected studies); :mod:`.processes` starts processes (torchrun)
and sets threads, for the harness, the tests and the benchmarks. Each study lives in its own
module, listed in ``STUDY_MODULES`` in the order the report shows them.
"""

from __future__ import annotations

import importlib

__all__ = ["STUDY_MODULES", "load_studies"]

# Studies register themselves on import; this list is the registry's table of contents.
STUDY_MODULES: tuple[str, ...] = (
    "ema_vs_precise",
    "precise_batch",
    "nbs",
    "domain_shift",
    "multi_domain",
    "leakage",
)


def load_studies() -> None:
    """Import every study module that exists (a part still being written is skipped)."""
    for name in STUDY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
