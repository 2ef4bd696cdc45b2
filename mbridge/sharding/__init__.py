"""Pure sharding: per-key layouts, shard/unshard per TP rank, pipeline placement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mbridge.sharding.layout import (
    COLUMN,
    GATED_COLUMN,
    REPLICATED,
    ROW,
    Layout,
    Tree,
    padded_vocab_size,
    shard,
    shard_ranges,
    unshard,
    vocab_layout,
)
from mbridge.sharding.plan import key_placement, layer_placement, stage_layer_counts


def shard_tree(tree: Tree, layouts: Mapping[str, Layout], tp: int, rank: int) -> Tree:
    """Each tensor's slice for TP ``rank``."""
    return {k: shard(v, layouts[k], tp, rank) for k, v in tree.items()}


def unshard_tree(trees: Sequence[Tree], layouts: Mapping[str, Layout]) -> Tree:
    """Inverse of ``shard_tree`` given every rank's tree, in rank order."""
    return {k: unshard([t[k] for t in trees], layouts[k]) for k in trees[0]}


__all__ = ["COLUMN", "GATED_COLUMN", "REPLICATED", "ROW", "Layout", "key_placement",
           "layer_placement", "padded_vocab_size", "shard", "shard_ranges", "shard_tree",
           "stage_layer_counts", "unshard", "unshard_tree", "vocab_layout"]
