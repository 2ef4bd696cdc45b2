"""The laws every mbridge mapping obeys, as plain checks over real tensors.

Each ``check_*`` returns None when the law holds and raises ``AssertionError`` naming the law,
the group (its index and first keys) and the key that broke it otherwise, so they work in
pytest, under hypothesis (which then shrinks to the smallest failing tree) or in a script.

- ``check_round_trip``: ``to_hf(to_mcore(t)) == t`` bit for bit, dtypes included;
- ``check_mcore_round_trip``: ``to_mcore(to_hf(m)) == m`` likewise;
- ``check_declared_keys``: ``to_mcore`` writes exactly ``mcore_keys`` and ``to_hf`` exactly
  ``hf_keys``, and every key of the tree is read by exactly one group;
- ``check_commutes_with_sharding``: shard/unshard invert, and converting one rank's slices
  equals slicing the converted tree, ``to_mcore(shard(t)) == shard(to_mcore(t))`` on every
  rank (expert layouts split over expert-TP);
- ``check_mapping``: all of them, what to call on your own mapping.

Example::

    from mbridge.mappings import rename
    from mbridge.testing import check_mapping
    check_mapping(rename("a", "b"), {"a": torch.ones(4)}, tp_sizes=(1, 2))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import product

import torch

from mbridge.mappings.core import Mapping
from mbridge.sharding import shard, unshard
from mbridge.sharding.expert import split_of
from mbridge.sharding.layout import Layout
from mbridge.specs import ParallelSpec, RankSpec

Tree = dict[str, torch.Tensor]
Groups = Mapping | Iterable[Mapping]


def tree_difference(a: Tree, b: Tree) -> str | None:
    """What tells tree ``a`` from ``b`` (keys, then shape, dtype, values), or None when they
    are equal bit for bit. ``tree_difference({"x": t}, {"x": t.double()})`` names the dtypes."""
    if a.keys() != b.keys():
        return (f"keys differ: only in the first {sorted(a.keys() - b.keys())}, only in the "
                f"second {sorted(b.keys() - a.keys())}")
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return f"{k}: shape {list(x.shape)} != {list(y.shape)}"
        if x.dtype != y.dtype:
            return f"{k}: dtype {x.dtype} != {y.dtype}"
        if not torch.equal(x, y):
            where = (x != y).nonzero()
            at = tuple(where[0].tolist()) if len(where) else "(NaN)"
            return f"{k}: values differ ({len(where)} elements, first at {at})"
    return None


def trees_equal(a: Tree, b: Tree) -> bool:
    """Same keys, shapes, dtypes and bits. ``trees_equal({"x": t}, {"x": t.clone()})``."""
    return tree_difference(a, b) is None


def assert_trees_equal(a: Tree, b: Tree, context: str = "trees differ") -> None:
    """AssertionError ``"<context>: <difference>"`` unless ``trees_equal(a, b)``."""
    diff = tree_difference(a, b)
    if diff is not None:
        raise AssertionError(f"{context}: {diff}")


def as_groups(mapping_or_groups: Groups) -> tuple[Mapping, ...]:
    """One mapping or many, as a tuple of groups."""
    if isinstance(mapping_or_groups, Mapping):
        return (mapping_or_groups,)
    return tuple(mapping_or_groups)


def group_name(index: int, group: Mapping) -> str:
    """``"group 2 (model.layers.0.input_layernorm.weight +8 more)"``."""
    keys = group.hf_keys or group.mcore_keys
    first = keys[0] if keys else "no keys"
    return f"group {index} ({first}{f' +{len(keys) - 1} more' if len(keys) > 1 else ''})"


def _pick(tree: Tree, keys: Sequence[str], where: str) -> Tree:
    missing = [k for k in keys if k not in tree]
    if missing:
        raise AssertionError(f"{where} declares {missing[0]}, which the tree lacks"
                             f" ({len(missing)} missing)")
    return {k: tree[k] for k in keys}


def _run(fn, tree: Tree, where: str, direction: str) -> Tree:
    try:
        return fn(tree)
    except KeyError as e:
        raise AssertionError(f"{where}: {direction} reads {e.args[0]!r}, a key the group does "
                             "not declare") from e


def check_round_trip(groups: Groups, hf_tree: Tree) -> None:
    """``to_hf(to_mcore(t)) == t`` bit for bit (dtypes too) for every group.

    ``check_round_trip(get(spec.architecture).mapping(spec), tree)``
    """
    for i, group in enumerate(as_groups(groups)):
        where = group_name(i, group)
        hf = _pick(hf_tree, group.hf_keys, where)
        back = _run(group.to_hf, _run(group.to_mcore, hf, where, "to_mcore"), where, "to_hf")
        assert_trees_equal(back, hf, f"round trip HF -> mcore -> HF breaks in {where}")


def check_mcore_round_trip(groups: Groups, mcore_tree: Tree) -> None:
    """``to_mcore(to_hf(m)) == m`` bit for bit for every group.

    ``check_mcore_round_trip(groups, {"decoder.final_layernorm.weight": torch.ones(8)})``
    """
    for i, group in enumerate(as_groups(groups)):
        where = group_name(i, group)
        mc = _pick(mcore_tree, group.mcore_keys, where)
        back = _run(group.to_mcore, _run(group.to_hf, mc, where, "to_hf"), where, "to_mcore")
        assert_trees_equal(back, mc, f"round trip mcore -> HF -> mcore breaks in {where}")


def _written(out: Tree, declared: tuple[str, ...], where: str, direction: str) -> None:
    got = tuple(out)
    if set(got) != set(declared):
        raise AssertionError(
            f"{where}: {direction} writes {sorted(set(got) - set(declared))} beyond its declared"
            f" keys and leaves out {sorted(set(declared) - set(got))}")
    if got != declared:
        raise AssertionError(f"{where}: {direction} writes its keys in another order than it "
                             f"declares them: {list(got)} != {list(declared)}")


def _read_once(groups: tuple[Mapping, ...], side: str) -> dict[str, int]:
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        for k in getattr(group, f"{side}_keys"):
            if k in owner:
                first = group_name(owner[k], groups[owner[k]])
                raise AssertionError(f"{side} key {k} is declared by {first} and by "
                                     f"{group_name(i, group)}: every key is read once")
            owner[k] = i
    return owner


def check_declared_keys(groups: Groups, hf_tree: Tree) -> None:
    """``to_mcore`` writes exactly ``mcore_keys``, ``to_hf`` exactly ``hf_keys`` (in declared
    order), no key is declared by two groups and every key of ``hf_tree`` is read by one.

    ``check_declared_keys(rename("a", "b"), {"a": torch.ones(2)})``
    """
    groups = as_groups(groups)
    owner = _read_once(groups, "hf")
    _read_once(groups, "mcore")
    unread = sorted(hf_tree.keys() - owner.keys())
    if unread:
        raise AssertionError(f"HF key {unread[0]} is read by no group ({len(unread)} unread)")
    for i, group in enumerate(groups):
        where = group_name(i, group)
        mcore = _run(group.to_mcore, _pick(hf_tree, group.hf_keys, where), where, "to_mcore")
        _written(mcore, group.mcore_keys, where, "to_mcore")
        _written(_run(group.to_hf, mcore, where, "to_hf"), group.hf_keys, where, "to_hf")


def _local(tree: Tree, layouts, parallel: ParallelSpec, rank: RankSpec) -> Tree:
    return {k: shard(v, layouts[k], *split_of(layouts[k], parallel, rank)) for k, v in tree.items()}


def _check_unshard(tree: Tree, layouts, parallel: ParallelSpec, where: str) -> None:
    for k, v in tree.items():
        layout: Layout = layouts[k]
        size = parallel.etp if layout.expert else parallel.tp
        back = unshard([shard(v, layout, size, r) for r in range(size)], layout)
        assert_trees_equal({k: back}, {k: v}, f"unshard does not invert shard over {size} "
                                              f"ranks in {where}")


def check_commutes_with_sharding(groups: Groups, hf_tree: Tree, tp: int,
                                 etp: int | None = None) -> None:
    """Shard/unshard invert on both sides, and on every (TP rank, expert-TP rank)
    ``to_mcore(shard(t, hf_layouts)) == shard(to_mcore(t), mcore_layouts)``: each rank can read
    only its slices of the HF tensors and convert them locally. ``etp`` defaults to ``tp``.

    ``check_commutes_with_sharding(groups, tree, tp=2)``; a ValueError if a tensor does not
    split into ``tp`` parts (draw sizes that fit: ``mbridge.testing.tp_sizes``).
    """
    parallel = ParallelSpec(tp=tp, etp=tp if etp is None else etp)
    for i, group in enumerate(as_groups(groups)):
        where = group_name(i, group)
        hf = _pick(hf_tree, group.hf_keys, where)
        mcore = _run(group.to_mcore, hf, where, "to_mcore")
        _check_unshard(hf, group.hf_layouts, parallel, where)
        _check_unshard(mcore, group.mcore_layouts, parallel, where)
        for r, e in product(range(parallel.tp), range(parallel.etp)):
            rank = RankSpec(tp=r, etp=e)
            local_hf = _local(hf, group.hf_layouts, parallel, rank)
            local = _run(group.to_mcore, local_hf, where, "to_mcore")
            assert_trees_equal(local, _local(mcore, group.mcore_layouts, parallel, rank),
                               f"to_mcore does not commute with sharding over tp={tp}, "
                               f"etp={parallel.etp} on rank tp={r} etp={e} in {where}")


def check_mapping(mapping_or_groups: Groups, hf_tree: Tree, tp_sizes: Sequence[int] = (1, 2),
                  mcore_tree: Tree | None = None) -> None:
    """Every law on one mapping (or a model's groups) and one HF tree: declared keys, both
    round trips (the mcore one on ``mcore_tree``, default ``to_mcore(hf_tree)``) and sharding
    commuting for each size in ``tp_sizes`` (expert-TP of the same size).

    ``check_mapping(my_mapping, {"a.weight": torch.randn(4, 2)}, tp_sizes=(1, 2))``
    """
    groups = as_groups(mapping_or_groups)
    check_declared_keys(groups, hf_tree)
    check_round_trip(groups, hf_tree)
    if mcore_tree is None:
        mcore_tree = {k: v for g in groups for k, v in g.to_mcore(
            {k: hf_tree[k] for k in g.hf_keys}).items()}
    check_mcore_round_trip(groups, mcore_tree)
    for tp in tp_sizes:
        check_commutes_with_sharding(groups, hf_tree, tp)
