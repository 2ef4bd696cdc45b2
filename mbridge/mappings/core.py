"""``Mapping``: a pair of pure functions between an HF tree and an mcore tree, and the
combinators that build mappings out of mappings (in the spirit of optax's ``chain``).

A tree is a flat ``dict[str, Tensor]``. A mapping declares the keys it reads and writes on
each side and, for every key, the ``Layout`` that says how it splits over tensor-parallel
ranks. The layouts are chosen so that mapping and sharding commute::

    to_mcore(shard_tree(t, hf_layouts, tp, r)) == shard_tree(to_mcore(t), mcore_layouts, tp, r)

which lets each rank read only its own slices of the HF tensors and convert them locally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass

from mbridge.sharding.layout import REPLICATED, Layout, Tree


@dataclass(frozen=True)
class Mapping:
    """Keys and layouts on both sides plus ``to_mcore``/``to_hf``, inverse pure functions."""

    hf_layouts: AbcMapping[str, Layout]
    mcore_layouts: AbcMapping[str, Layout]
    to_mcore: Callable[[Tree], Tree]
    to_hf: Callable[[Tree], Tree]

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return tuple(self.hf_layouts)

    @property
    def mcore_keys(self) -> tuple[str, ...]:
        return tuple(self.mcore_layouts)


def _pick(tree: Tree, keys: Iterable[str]) -> Tree:
    return {k: tree[k] for k in keys}


def rename(hf_key: str, mcore_key: str, layout: Layout = REPLICATED) -> Mapping:
    """One tensor, same values, two names."""
    return Mapping(
        hf_layouts={hf_key: layout},
        mcore_layouts={mcore_key: layout},
        to_mcore=lambda t: {mcore_key: t[hf_key]},
        to_hf=lambda t: {hf_key: t[mcore_key]},
    )


def fuse(hf_keys: tuple[str, ...], mcore_key: str, *, fuse_fn, split_fn,
         hf_layout: Layout, mcore_layout: Layout) -> Mapping:
    """Several HF tensors become one mcore tensor: ``fuse_fn(*hf) -> mcore`` and
    ``split_fn(mcore) -> tuple(hf)`` must be inverses."""
    return Mapping(
        hf_layouts={k: hf_layout for k in hf_keys},
        mcore_layouts={mcore_key: mcore_layout},
        to_mcore=lambda t: {mcore_key: fuse_fn(*(t[k] for k in hf_keys))},
        to_hf=lambda t: dict(zip(hf_keys, split_fn(t[mcore_key]), strict=True)),
    )


def chain(*mappings: Mapping) -> Mapping:
    """Side-by-side union of mappings over disjoint keys."""
    hf_layouts: dict[str, Layout] = {}
    mcore_layouts: dict[str, Layout] = {}
    for m in mappings:
        for side, layouts in ((hf_layouts, m.hf_layouts), (mcore_layouts, m.mcore_layouts)):
            clash = side.keys() & layouts.keys()
            if clash:
                raise ValueError(f"mappings overlap on keys {sorted(clash)}")
            side.update(layouts)

    def to_mcore(tree: Tree) -> Tree:
        return {k: v for m in mappings for k, v in m.to_mcore(_pick(tree, m.hf_keys)).items()}

    def to_hf(tree: Tree) -> Tree:
        return {k: v for m in mappings for k, v in m.to_hf(_pick(tree, m.mcore_keys)).items()}

    return Mapping(hf_layouts, mcore_layouts, to_mcore, to_hf)


def at(mapping: Mapping, **slots: int) -> Mapping:
    """Fill the ``{i}``/``{e}`` slots of a template mapping's keys.

    ``at(rename("model.layers.{i}.x", "decoder.layers.{i}.x"), i=3)`` maps layer 3.
    """
    hf = {k: k.format(**slots) for k in mapping.hf_layouts}
    mc = {k: k.format(**slots) for k in mapping.mcore_layouts}
    hf_back = {v: k for k, v in hf.items()}
    mc_back = {v: k for k, v in mc.items()}

    def to_mcore(tree: Tree) -> Tree:
        out = mapping.to_mcore({hf_back[k]: v for k, v in tree.items()})
        return {mc[k]: v for k, v in out.items()}

    def to_hf(tree: Tree) -> Tree:
        out = mapping.to_hf({mc_back[k]: v for k, v in tree.items()})
        return {hf[k]: v for k, v in out.items()}

    return Mapping(
        {hf[k]: v for k, v in mapping.hf_layouts.items()},
        {mc[k]: v for k, v in mapping.mcore_layouts.items()},
        to_mcore,
        to_hf,
    )


def rekey(mapping: Mapping, *, hf: Callable[[str], str] = str,
          mcore: Callable[[str], str] = str) -> Mapping:
    """The same mapping under other names: ``hf``/``mcore`` rename each side's keys
    (injective). ``rekey(rename("model.norm.weight", k), hf=swap_prefix("model.",
    "language_model.model."))`` reads ``language_model.model.norm.weight``."""
    hf_names = {k: hf(k) for k in mapping.hf_layouts}
    mc_names = {k: mcore(k) for k in mapping.mcore_layouts}
    hf_back = {v: k for k, v in hf_names.items()}
    mc_back = {v: k for k, v in mc_names.items()}

    def to_mcore(tree: Tree) -> Tree:
        out = mapping.to_mcore({hf_back[k]: v for k, v in tree.items()})
        return {mc_names[k]: v for k, v in out.items()}

    def to_hf(tree: Tree) -> Tree:
        out = mapping.to_hf({mc_back[k]: v for k, v in tree.items()})
        return {hf_names[k]: v for k, v in out.items()}

    return Mapping({hf_names[k]: v for k, v in mapping.hf_layouts.items()},
                   {mc_names[k]: v for k, v in mapping.mcore_layouts.items()}, to_mcore, to_hf)


def swap_prefix(old: str, new: str) -> Callable[[str], str]:
    """``swap_prefix("model.", "m.")("model.x") == "m.x"``; keys without ``old`` unchanged."""
    return lambda key: new + key[len(old):] if key.startswith(old) else key


def per_layer(template: Mapping, num_layers: int) -> tuple[Mapping, ...]:
    """One mapping per layer from a template written with ``{i}``."""
    return tuple(at(template, i=i) for i in range(num_layers))
