"""Adapter trees between Megatron-Core and Hugging Face peft (pure): which linears an
``AdapterSpec`` adapts, the mcore and peft keys of their tensors with the layouts they split
by, the ``Mapping`` groups between them (one per layer, so pipeline placement and streaming
work as for the weights), and their shapes.

Tensors, per adapter: mcore ``linear_in.weight`` = peft ``lora_A.weight`` ``[dim, in]``,
``linear_out.weight`` = ``lora_B.weight`` ``[out, dim]``, DoRA's ``magnitude`` =
``lora_magnitude_vector`` ``[out]``. Layouts follow the base linear: a column-parallel base
splits B and the magnitude by rows and replicates A; a row-parallel base splits A by
columns and replicates B and the magnitude. Sharding commutes with these mappings as it does
with the weights' (``check_commutes_with_sharding``).

How fused linears meet peft's per-projection adapters:

- canonical variant (``linear_q``... targets): one adapter per part, renamed one to one;
  the shell joins the parts' outputs with the same op pair as the weights;
- fused variant: one adapter over the whole linear. To peft: A is copied to every part and B
  (and the magnitude) split with the weights' op (``split_qkv``), an exact, equivalent
  adapter. From peft: only an adapter whose parts share one A (this variant's own export);
  peft's own adapters (different A per projection) load into the canonical variant.

Experts: each routed expert's ``linear_fc1``/``linear_fc2`` is a site of its own (``Adapted.
expert``), with the layouts above along the expert-tensor-parallel group (``Layout.expert``)
and peft's per-expert names ``model.layers.{i}.mlp.experts.{e}.gate_proj`` (``site.py``);
one mapping group per expert, as for the weights.
"""

from __future__ import annotations

import msgspec
import torch

from mbridge import keys
from mbridge.adapters.site import (
    Site,
    fuse_fn,
    hf_module,
    module_name,
    part_name,
    sites,
    split_fn,
)
from mbridge.adapters.spec import AdapterSpec
from mbridge.architectures import registry
from mbridge.mappings.core import Mapping, chain, rename
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, REPLICATED, ROW, Layout, Tree
from mbridge.specs import ModelSpec, Spec

# (mcore tensor, peft tensor) of one adapter; DoRA adds the magnitude
TENSORS = (("linear_in.weight", "lora_A.weight"), ("linear_out.weight", "lora_B.weight"))
MAGNITUDE = ("magnitude", "lora_magnitude_vector")


class Adapted(Spec, frozen=True, kw_only=True):
    """One adapted linear: layer, site, the indices of its adapted parts, whether each
    part has its own adapter (``split``; always for a one-part site), and the global index
    of its expert (None off experts)."""

    layer: int
    site: Site
    parts: tuple[int, ...]
    split: bool
    expert: int | None = None

    @property
    def module(self) -> str:
        return module_name(self.layer, self.site, self.expert)

    def hf(self, j: int) -> str:
        """The HF module of part ``j``: ``"model.layers.3.mlp.experts.5.up_proj"``."""
        return hf_module(self.layer, self.site, j, self.expert)

    def part(self, j: int) -> str | None:
        """The mcore key level of part ``j``: its canonical name, None when one adapter
        covers the linear."""
        return self.site.parts[j] if self.split and len(self.site.parts) > 1 else None


def selection(adapter: AdapterSpec, spec: ModelSpec) -> tuple[Adapted, ...]:
    """Every linear ``adapter`` adapts in ``spec``, layer by layer; ValueError if none."""
    out = []
    for i in range(spec.num_layers):
        for site in sites(spec, i):
            for e in range(spec.moe.num_experts) if site.expert else (None,):
                if adapter.canonical and len(site.parts) > 1:
                    parts = tuple(j for j, p in enumerate(site.parts)
                                  if adapter.selects(part_name(i, site, p, e)))
                    split = True
                else:
                    parts = tuple(range(len(site.parts))) if adapter.selects(
                        module_name(i, site, e)) else ()
                    split = len(site.parts) == 1
                if parts:
                    out.append(Adapted(layer=i, site=site, parts=parts, split=split, expert=e))
    if not out:
        raise ValueError(f"target_modules={list(adapter.target_modules)} (excluding "
                         f"{list(adapter.exclude_modules)}) match no linear layer of "
                         f"{spec.architecture}; use "
                         f"{', '.join(sorted({s.target for s in sites(spec)}))}"
                         " or their parts")
    return tuple(out)


def _tensors(adapter: AdapterSpec):
    return TENSORS + ((MAGNITUDE,) if adapter.scheme == "dora" else ())


def layouts(site: Site, fused: bool) -> dict[str, tuple[Layout, Layout]]:
    """``{mcore tensor: (mcore layout, peft layout)}`` of one adapter on ``site``; ``fused``:
    one adapter over a multi-part column linear (B's rows as the fused weight's). An
    expert's split over the expert-tensor-parallel group (``Layout.expert``)."""
    if site.parallel == "row":
        out = {"linear_in.weight": (ROW, ROW), "linear_out.weight": (REPLICATED, REPLICATED),
               "magnitude": (REPLICATED, REPLICATED)}
    else:
        rows = GATED_COLUMN if fused and site.fuse == "gate_up" else COLUMN
        out = {"linear_in.weight": (REPLICATED, REPLICATED),
               "linear_out.weight": (rows, COLUMN), "magnitude": (rows, COLUMN)}
    if not site.expert:
        return out
    return {t: (_expert(mc), _expert(hf)) for t, (mc, hf) in out.items()}


def _expert(layout: Layout) -> Layout:
    return msgspec.structs.replace(layout, expert=True)


def weight_layout(site: Site) -> Layout:
    """The layout of the base linear's weight (``architectures/dense.py``'s and ``moe.py``'s
    mappings)."""
    if site.parallel == "row":
        layout = ROW
    else:
        layout = GATED_COLUMN if site.fuse == "gate_up" else COLUMN
    return _expert(layout) if site.expert else layout


def _split_mapping(a: Adapted, adapter: AdapterSpec) -> Mapping:
    lay = layouts(a.site, fused=False)
    return chain(*(rename(keys.peft_key(a.hf(j), hf),
                          keys.adapter_key(a.module, a.part(j), mc), lay[mc][0])
                   for j in a.parts for mc, hf in _tensors(adapter)))


def _fused_mapping(a: Adapted, adapter: AdapterSpec, spec: ModelSpec) -> Mapping:
    """One adapter over a fused linear <-> per-part peft adapters sharing A."""
    lay = layouts(a.site, fused=True)
    hf = {(j, t): keys.peft_key(a.hf(j), t) for j in a.parts
          for _, t in _tensors(adapter)}
    mc = {m: keys.adapter_key(a.module, None, m) for m, _ in _tensors(adapter)}
    fuse, split = fuse_fn(a.site, spec), split_fn(a.site, spec)
    joined = [(m, t) for m, t in _tensors(adapter) if m != "linear_in.weight"]
    hf_layouts = {hf[j, t]: lay[m][1] for j in a.parts for m, t in _tensors(adapter)}

    def to_mcore(tree: Tree) -> Tree:
        shared = [tree[hf[j, "lora_A.weight"]] for j in a.parts]
        if not all(torch.equal(shared[0], x) for x in shared[1:]):
            raise ValueError(f"the peft adapters of {a.module}'s parts have different lora_A; "
                             "a fused adapter needs one A: adapt the parts (canonical "
                             "variant, target_modules linear_q/linear_k/... ) to load them")
        out = {mc["linear_in.weight"]: shared[0]}
        out.update({mc[m]: fuse(*(tree[hf[j, t]] for j in a.parts)) for m, t in joined})
        return out

    def to_hf(tree: Tree) -> Tree:
        out = {hf[j, "lora_A.weight"]: tree[mc["linear_in.weight"]].clone() for j in a.parts}
        for m, t in joined:
            out.update({hf[j, t]: x for j, x in zip(a.parts, split(tree[mc[m]]), strict=True)})
        return {k: out[k] for k in hf_layouts}

    return Mapping(hf_layouts, {mc[m]: lay[m][0] for m, _ in _tensors(adapter)}, to_mcore, to_hf)


def mapping(adapter: AdapterSpec, spec: ModelSpec) -> tuple[Mapping, ...]:
    """The adapter mapping groups in layer order: per layer holding adapters one group, then
    one per adapted expert (an EP rank reads only its experts, export streams one at a time)."""
    by_layer: dict[tuple[int, int], list[Mapping]] = {}
    for a in selection(adapter, spec):
        m = _split_mapping(a, adapter) if a.split else _fused_mapping(a, adapter, spec)
        slot = -1 if a.expert is None else a.expert
        by_layer.setdefault((a.layer, slot), []).append(m)
    return tuple(chain(*ms) for ms in by_layer.values())


def shapes(adapter: AdapterSpec, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """``{mcore adapter key: global shape}`` (TP=1), from the base weights' shapes."""
    arch = registry.get(spec.architecture)
    out = {}
    for a in selection(adapter, spec):
        rows, cols = arch.mcore_shape(spec, a.module + ".weight")
        part_rows = [t.shape[0] for t in split_fn(a.site, spec)(torch.empty(rows, device="meta"))]
        for j in (a.parts if a.split else (None,)):
            out_rows = rows if j is None else part_rows[j]
            part = None if j is None else a.part(j)
            out[keys.adapter_key(a.module, part, "linear_in.weight")] = (adapter.dim, cols)
            out[keys.adapter_key(a.module, part, "linear_out.weight")] = (out_rows, adapter.dim)
            if adapter.scheme == "dora":
                out[keys.adapter_key(a.module, part, "magnitude")] = (out_rows,)
    return out
