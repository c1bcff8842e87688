"""The top level offers every public name of the library's subpackages (one rule, no exceptions
but the commented ones below)."""

import importlib

import pytest

import rethinkbn

PUBLIC_SUBPACKAGES = ["stats", "layers", "convert", "population", "distributed"]

# Building blocks for writing a new layer or collective: they stay in rethinkbn.stats, a user
# of the layers never needs them.
NOT_AT_TOP_LEVEL = {
    "stats": {"centered", "channel_view", "check_same_layout", "compute_dtype", "reduce_dims",
              "require", "segment_var_mean", "split_mean"},
}


@pytest.mark.parametrize("name", PUBLIC_SUBPACKAGES)
def test_every_public_name_of_a_subpackage_is_reachable_from_the_top_level(name):
    module = importlib.import_module(f"rethinkbn.{name}")
    excluded = NOT_AT_TOP_LEVEL.get(name, set())
    assert excluded <= set(module.__all__), "an exclusion names nothing: remove it"
    for attr in sorted(set(module.__all__) - excluded):
        assert getattr(rethinkbn, attr) is getattr(module, attr), attr
        assert attr in rethinkbn.__all__, attr


def test_the_top_level_all_names_only_what_it_offers():
    assert len(rethinkbn.__all__) == len(set(rethinkbn.__all__))
    for attr in rethinkbn.__all__:
        assert hasattr(rethinkbn, attr), attr
