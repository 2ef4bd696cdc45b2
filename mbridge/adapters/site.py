"""Where adapters go: the linear layers of a decoder layer, their parts, their HF names and
how they split over tensor-parallel ranks (pure).

A ``Site`` is one Megatron-Core linear: ``linear_qkv`` fuses HF's q/k/v projections
(``mappings.ops.fuse_qkv``), ``linear_fc1`` gate and up (``fuse_gate_up``); the row-parallel
``linear_proj`` and ``linear_fc2`` are one projection each. Names follow ``architectures/
dense.py`` (the mappings the adapters sit next to).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from mbridge import keys
from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.specs import ModelSpec, Spec


class Site(Spec, frozen=True, kw_only=True):
    """One adaptable linear of a layer. ``name``: its module under the layer; ``parts``: the
    canonical target name of each fused part (the module's own name when it has one part);
    ``hf``: the HF module of each part; ``fuse``: the op pair joining the parts' rows;
    ``parallel``: column (output rows split) or row (input columns split)."""

    name: str
    parts: tuple[str, ...]
    hf: tuple[str, ...]
    fuse: Literal["qkv", "gate_up", "none"] = "none"
    parallel: Literal["column", "row"] = "column"

    @property
    def target(self) -> str:
        """The fused target name: ``"self_attention.linear_qkv" -> "linear_qkv"``."""
        return self.name.rsplit(".", 1)[-1]


QKV = Site(name="self_attention.linear_qkv", parts=("linear_q", "linear_k", "linear_v"),
           hf=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), fuse="qkv")
PROJ = Site(name="self_attention.linear_proj", parts=("linear_proj",), hf=("self_attn.o_proj",),
            parallel="row")
FC1 = Site(name="mlp.linear_fc1", parts=("linear_fc1_gate", "linear_fc1_up"),
           hf=("mlp.gate_proj", "mlp.up_proj"), fuse="gate_up")
FC2 = Site(name="mlp.linear_fc2", parts=("linear_fc2",), hf=("mlp.down_proj",), parallel="row")
DENSE_SITES = (QKV, PROJ, FC1, FC2)


def sites(spec: ModelSpec) -> tuple[Site, ...]:
    """The adaptable linears of every layer of ``spec``; NotImplementedError for the models
    whose linears are not yet covered."""
    if spec.moe is not None or spec.mla is not None:
        raise NotImplementedError(f"adapters on {spec.architecture} (experts or latent "
                                  "attention) are not supported yet; dense decoders only")
    return DENSE_SITES


def fuse_fn(site: Site, spec: ModelSpec):
    """Per-part tensors (rows first) -> the fused linear's rows; identity for one part."""
    if site.fuse == "qkv":
        return partial(fuse_qkv, head_dim=spec.head_dim)
    if site.fuse == "gate_up":
        return fuse_gate_up
    return lambda x: x


def split_fn(site: Site, spec: ModelSpec):
    """Inverse of ``fuse_fn``: the fused rows -> a tuple of per-part tensors."""
    if site.fuse == "qkv":
        return partial(split_qkv, heads_per_group=spec.heads_per_group, head_dim=spec.head_dim)
    if site.fuse == "gate_up":
        return split_gate_up
    return lambda x: (x,)


def module_name(layer: int, site: Site) -> str:
    """The global mcore module: ``(3, QKV) -> "decoder.layers.3.self_attention.linear_qkv"``."""
    return keys.with_layer(layer, site.name)


def part_name(layer: int, site: Site, part: str) -> str:
    """A part as a full name for ``AdapterSpec.selects``:
    ``(3, QKV, "linear_q") -> "decoder.layers.3.self_attention.linear_q"``."""
    return module_name(layer, site).rsplit(".", 1)[0] + "." + part


def hf_module(layer: int, site: Site, part: int) -> str:
    """``(3, QKV, 0) -> "model.layers.3.self_attn.q_proj"``."""
    return keys.HF_LAYER.format(i=layer) + site.hf[part]
