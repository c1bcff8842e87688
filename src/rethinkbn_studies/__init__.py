"""The reproduction harness behind ``rethinkbn reproduce``: a package of its own beside the
``rethinkbn`` library, using only the library's public API (the library never imports it; its
dependencies come with the ``studies`` extra).

Its folders are its roles:

- :mod:`.contract`: what a study is and what it hands back: ``base`` (the study contract and
  registry), ``verdicts`` (verdicts with their noise), ``paper`` (the paper's numbers),
  ``report`` (report.md and results.json);
- :mod:`.infra`: what runs them: ``harness`` (runs the selected studies and writes the report),
  ``tasks`` (a study's training runs, cached, here or in a process pool), ``cache`` (the on-disk
  run cache), ``processes`` (starts processes, re-exported from the library);
- :mod:`.toolkit`: what studies build with: ``data`` (MNIST-1D and image folders), ``models``
  (1-D and 2-D ResNets), ``train`` (the SGD loop), ``corruptions``, ``bn`` (population
  statistics the studies' way), ``roi`` (the toy detection heads), ``common`` (scales, seeds,
  plots);
- :mod:`.studies`: the studies themselves, one module each, listed in ``STUDY_MODULES`` in the
  order the report shows them (each registers itself on import).

The studies are on top: they import the toolkit, the contract and the run cache, and nothing
imports them but this package's registry (:func:`load_studies`), through which the harness
reaches them. The toolkit imports the contract; the contract imports the run loop
(``infra.tasks``) and the cache; no module import circle (``tests/test_package_boundaries.py``).
Beside the folders, the package's commands: :mod:`.cli` (``rethinkbn reproduce`` / ``rethinkbn
studies``, through the entry point group ``rethinkbn.commands``) and :mod:`.readme` (``python -m
rethinkbn_studies.readme``: the README's summary tables).
"""

from __future__ import annotations

import importlib

__all__ = ["STUDY_MODULES", "load_studies"]

# Studies register themselves on import; this list is the registry's table of contents: the
# modules of rethinkbn_studies.studies, in report order.
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
        module = f"{__name__}.studies.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
