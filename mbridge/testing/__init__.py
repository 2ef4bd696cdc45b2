"""Property testing for mbridge mappings: hypothesis strategies and the laws every mapping
obeys, for the project's own tests and for yours.

Needs the test extra: ``pip install mbridge[test]`` (hypothesis, pytest).

Strategies (``mbridge.testing.strategies``): ``model_specs`` (dense architectures),
``moe_specs``, ``layouts`` (``ParallelSpec``s that fit a spec), ``tp_sizes``, ``hf_trees`` and
``mcore_trees`` (random trees shaped as the architecture implies, drawn from a seed).

Laws (``mbridge.testing.laws``), plain functions raising ``AssertionError`` that names the
group and key that broke: ``check_round_trip``, ``check_mcore_round_trip``,
``check_declared_keys``, ``check_commutes_with_sharding``, and ``check_mapping`` running them
all; ``trees_equal``/``assert_trees_equal`` compare trees bit for bit, dtypes included.

Example::

    from hypothesis import given, strategies as st
    from mbridge.testing import check_mapping, groups_of, hf_trees, model_specs, tp_sizes

    @given(st.data())
    def test_registry_mapping(data):
        spec = data.draw(model_specs())
        tree = data.draw(hf_trees(spec))
        check_mapping(groups_of(spec), tree, tp_sizes=(1, data.draw(tp_sizes(spec))))

``examples/property_test_mapping.py`` tests a hand-built mapping the same way.
"""

from mbridge.testing.laws import (
    as_groups,
    assert_trees_equal,
    check_commutes_with_sharding,
    check_declared_keys,
    check_mapping,
    check_mcore_round_trip,
    check_round_trip,
    tree_difference,
    trees_equal,
)
from mbridge.testing.strategies import (
    DENSE_ARCHITECTURES,
    MOE_ARCHITECTURES,
    groups_of,
    hf_shapes,
    hf_trees,
    layouts,
    mcore_shapes,
    mcore_trees,
    model_specs,
    moe_specs,
    random_tree,
    tp_sizes,
)

__all__ = ["DENSE_ARCHITECTURES", "MOE_ARCHITECTURES", "as_groups", "assert_trees_equal",
           "check_commutes_with_sharding", "check_declared_keys", "check_mapping",
           "check_mcore_round_trip", "check_round_trip", "groups_of", "hf_shapes", "hf_trees",
           "layouts", "mcore_shapes", "mcore_trees", "model_specs", "moe_specs", "random_tree",
           "tp_sizes", "tree_difference", "trees_equal"]
