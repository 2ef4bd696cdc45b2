"""``mbridge.testing`` itself: its checks fail on broken mappings, naming the group and key,
and its strategies draw what they promise."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.mappings import Mapping, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, split_gate_up
from mbridge.sharding import COLUMN, GATED_COLUMN, ROW
from mbridge.testing import (
    assert_trees_equal,
    check_commutes_with_sharding,
    check_declared_keys,
    check_mapping,
    check_mcore_round_trip,
    check_round_trip,
    groups_of,
    hf_shapes,
    hf_trees,
    mcore_shapes,
    mcore_trees,
    model_specs,
    moe_specs,
    random_tree,
    trees_equal,
)


def transposing(hf_layout=COLUMN, mcore_layout=ROW, back=lambda t: t.T) -> Mapping:
    """``a`` [m, n] <-> ``b`` = a.T [n, m]; ``back`` undoes it (or, broken, does not)."""
    return Mapping({"a": hf_layout}, {"b": mcore_layout},
                   lambda t: {"b": t["a"].T.contiguous()}, lambda t: {"a": back(t["b"])})


TREE = {"a": torch.arange(24.0).reshape(4, 6)}
GOOD = transposing()


def test_a_correct_mapping_passes_every_law():
    check_mapping(GOOD, TREE, tp_sizes=(1, 2))
    assert trees_equal(GOOD.to_hf(GOOD.to_mcore(TREE)), TREE)


def test_round_trip_fails_when_to_hf_transposes_wrongly():
    square = {"a": torch.arange(16.0).reshape(4, 4)}
    wrong = transposing(back=lambda t: t.clone())  # forgets to transpose back
    with pytest.raises(AssertionError, match=r"HF -> mcore -> HF breaks in group 0 \(a\): a: "
                                             "values differ"):
        check_round_trip(wrong, square)
    with pytest.raises(AssertionError, match=r"a: shape \[6, 4\] != \[4, 6\]"):
        check_mapping(wrong, TREE)


def test_round_trips_fail_on_a_changed_dtype():
    lossy = transposing(back=lambda t: t.T.double())
    with pytest.raises(AssertionError, match="a: dtype torch.float64 != torch.float32"):
        check_round_trip(lossy, TREE)
    with pytest.raises(AssertionError, match="mcore -> HF -> mcore breaks"):
        check_mcore_round_trip(lossy, {"b": TREE["a"].T.contiguous()})


def test_sharding_check_fails_on_a_wrong_layout():
    wrong = transposing(mcore_layout=COLUMN)  # a.T splits along its columns, not its rows
    with pytest.raises(AssertionError, match=r"does not commute with sharding over tp=2.*b: "
                                             "shape"):
        check_commutes_with_sharding(wrong, TREE, tp=2)
    check_commutes_with_sharding(wrong, TREE, tp=1)  # nothing splits at TP=1


def test_sharding_check_fails_on_a_gated_tensor_split_as_a_plain_one():
    mc = "fc1"
    hf = {"gate": torch.randn(4, 3), "up": torch.randn(4, 3)}
    plain = fuse(("gate", "up"), mc, fuse_fn=fuse_gate_up, split_fn=split_gate_up,
                 hf_layout=COLUMN, mcore_layout=COLUMN)
    with pytest.raises(AssertionError, match="rank tp=0 etp=0 in group 0 \\(gate \\+1 more\\)"):
        check_commutes_with_sharding(plain, hf, tp=2)
    gated = fuse(("gate", "up"), mc, fuse_fn=fuse_gate_up, split_fn=split_gate_up,
                 hf_layout=COLUMN, mcore_layout=GATED_COLUMN)
    check_commutes_with_sharding(gated, hf, tp=2)


def test_declared_keys_check_names_the_broken_key():
    extra = Mapping({"a": COLUMN}, {"b": ROW}, lambda t: {"b": t["a"].T, "c": t["a"]},
                    GOOD.to_hf)
    with pytest.raises(AssertionError, match=r"to_mcore writes \['c'\] beyond"):
        check_declared_keys(extra, TREE)
    sneaky = Mapping({"a": COLUMN}, {"b": ROW}, lambda t: {"b": t["a"].T + t["z"]}, GOOD.to_hf)
    with pytest.raises(AssertionError, match="to_mcore reads 'z', a key the group does not"):
        check_declared_keys(sneaky, TREE)
    with pytest.raises(AssertionError, match="hf key a is declared by group 0 .* and by group 1"):
        check_declared_keys([GOOD, rename("a", "other")], TREE)
    with pytest.raises(AssertionError, match="HF key stray is read by no group"):
        check_declared_keys(GOOD, {**TREE, "stray": torch.ones(1)})
    with pytest.raises(AssertionError, match="declares a, which the tree lacks"):
        check_declared_keys(GOOD, {})
    unordered = chain(rename("x", "mx"), rename("y", "my"))
    flipped = Mapping(unordered.hf_layouts, unordered.mcore_layouts,
                      lambda t: dict(reversed(unordered.to_mcore(t).items())), unordered.to_hf)
    with pytest.raises(AssertionError, match="another order"):
        check_declared_keys(flipped, {"x": torch.ones(1), "y": torch.zeros(1)})


def test_tree_comparison_names_the_difference():
    t = torch.ones(3)
    with pytest.raises(AssertionError, match=r"ctx: x: values differ \(1 elements, first at"):
        assert_trees_equal({"x": t}, {"x": torch.tensor([1.0, 2.0, 1.0])}, "ctx")
    with pytest.raises(AssertionError, match="only in the first \\['y'\\]"):
        assert_trees_equal({"x": t, "y": t}, {"x": t})
    assert not trees_equal({"x": t}, {"x": t.bfloat16()})
    assert trees_equal(random_tree({"x": (2, 3)}, 7), random_tree({"x": (2, 3)}, 7))


@settings(max_examples=20, deadline=None)
@given(st.data(), model_specs() | moe_specs())
def test_trees_have_the_declared_keys_and_derived_shapes(data, spec):
    groups = groups_of(spec)
    hf, mcore = data.draw(hf_trees(spec)), data.draw(mcore_trees(spec))
    assert list(hf) == [k for g in groups for k in g.hf_keys]
    assert list(mcore) == [k for g in groups for k in g.mcore_keys]
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_shapes(spec)
    assert {k: tuple(v.shape) for k, v in mcore.items()} == mcore_shapes(spec)
    assert len({v.dtype for v in hf.values()}) == 1


@settings(max_examples=5, deadline=None)
@given(st.data(), model_specs("LlamaForCausalLM"))
def test_shapes_override_covers_keys_no_architecture_has(data, spec):
    tree = data.draw(hf_trees(spec, GOOD, shapes={"b": (6, 4)}))
    assert list(tree) == ["a"] and tree["a"].shape == (4, 6)
