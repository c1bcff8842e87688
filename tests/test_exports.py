"""The top level is curated: the names a user of the layers needs, stated here once. Every other
public name stays importable from its subpackage, and the top level re-exports, never copies."""

import importlib

import pytest

import rethinkbn

PUBLIC_SUBPACKAGES = ["stats", "layers", "convert", "population", "distributed", "diagnosis"]

# The top level, by role (the order of rethinkbn.__all__).
CURATED = [
    "__version__",
    # layers
    "GhostBatchNorm", "FrozenBatchNorm", "DomainBatchNorm", "SyncBatchNorm", "use_domain",
    "is_batchnorm",
    # model surgery
    "to_ghost_bn", "freeze_bn", "unfreeze_bn", "to_domain_bn", "to_sync_bn", "convert_batchnorm",
    "revert_batchnorm", "fold_batchnorm",
    # population statistics
    "precise_bn", "recompute_stats", "PreciseBNOptions", "StatsBank", "batch_stats_inference",
    "ema_report", "freeze_with_precise_stats",
    # across devices
    "ShuffledModule", "virtual_devices",
    # the pitfalls measured on a model
    "diagnose", "Diagnosis",
    # per-channel moments
    "Moments",
]


def test_the_top_level_offers_the_curated_names_and_only_them():
    assert rethinkbn.__all__ == CURATED
    assert len(CURATED) == len(set(CURATED))
    for attr in CURATED:
        assert hasattr(rethinkbn, attr), attr


def test_every_top_level_name_is_its_subpackages_object():
    owners = [importlib.import_module(f"rethinkbn.{name}") for name in PUBLIC_SUBPACKAGES]
    for attr in CURATED[1:]:
        found = [m for m in owners if attr in getattr(m, "__all__", ())]
        assert found, f"{attr} is in no subpackage's __all__"
        assert all(getattr(rethinkbn, attr) is getattr(m, attr) for m in found), attr


@pytest.mark.parametrize("name", PUBLIC_SUBPACKAGES)
def test_every_public_name_of_a_subpackage_still_imports(name):
    module = importlib.import_module(f"rethinkbn.{name}")
    names = getattr(module, "__all__", None)
    if names is None:  # a module without __all__: its top-level public names
        names = [n for n in vars(module) if not n.startswith("_")]
    assert len(names) == len(set(names)), f"rethinkbn.{name}.__all__ repeats a name"
    for attr in names:
        assert getattr(module, attr, None) is not None, f"rethinkbn.{name}.{attr}"


def test_markdown_table_left_the_top_level_for_rethinkbn_population():
    from rethinkbn.population import markdown_table

    assert callable(markdown_table)
    assert not hasattr(rethinkbn, "markdown_table")
