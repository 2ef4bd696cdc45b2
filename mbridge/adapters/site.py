"""Where adapters go: the linear layers of a decoder layer, their parts, their HF names and
how they split over tensor-parallel ranks (pure).

A ``Site`` is one Megatron-Core linear: ``linear_qkv`` fuses HF's q/k/v projections
(``mappings.ops.fuse_qkv``), ``linear_fc1`` gate and up (``fuse_gate_up``); the row-parallel
``linear_proj`` and ``linear_fc2`` are one projection each. Names follow ``architectures/
dense.py`` (the mappings the adapters sit next to).

A mixture-of-experts layer (``architectures/moe.py``) has the same attention sites and, per
routed expert ``{e}``, ``mlp.experts.local_experts.{e}.linear_fc1``/``linear_fc2``
(``expert=True``: they split over the expert-tensor-parallel group and live on one EP rank).
Their HF names are transformers 4's per-expert modules ``mlp.experts.{e}.gate_proj``/
``up_proj``/``down_proj``: the names peft saves for such a model and converts on load into
transformers 5's stacked experts. A shared expert (``mlp.shared_experts.linear_fc1``/``fc2``,
HF ``mlp.shared_expert.*``) is a dense MLP's sites; the router and the shared expert's gate
take no adapter.
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
    ``parallel``: column (output rows split) or row (input columns split); ``expert``: a
    routed expert's linear (``name`` and ``hf`` hold the expert slot ``{e}``)."""

    name: str
    parts: tuple[str, ...]
    hf: tuple[str, ...]
    fuse: Literal["qkv", "gate_up", "none"] = "none"
    parallel: Literal["column", "row"] = "column"
    expert: bool = False

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
EXPERT_FC1 = Site(name="mlp.experts.local_experts.{e}.linear_fc1",
                  parts=("linear_fc1_gate", "linear_fc1_up"),
                  hf=("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"), fuse="gate_up",
                  expert=True)
EXPERT_FC2 = Site(name="mlp.experts.local_experts.{e}.linear_fc2", parts=("linear_fc2",),
                  hf=("mlp.experts.{e}.down_proj",), parallel="row", expert=True)
# a shared expert (Qwen2-MoE's ``mlp.shared_expert``): a dense MLP beside the routed experts,
# split over TP like one; its sigmoid gate takes no adapter
SHARED_FC1 = Site(name="mlp.shared_experts.linear_fc1", parts=("linear_fc1_gate", "linear_fc1_up"),
                  hf=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                  fuse="gate_up")
SHARED_FC2 = Site(name="mlp.shared_experts.linear_fc2", parts=("linear_fc2",),
                  hf=("mlp.shared_expert.down_proj",), parallel="row")
DENSE_SITES = (QKV, PROJ, FC1, FC2)
MOE_SITES = (QKV, PROJ, EXPERT_FC1, EXPERT_FC2)


def sites(spec: ModelSpec, layer: int = 0) -> tuple[Site, ...]:
    """The adaptable linears of layer ``layer`` of ``spec`` (experts' with their slot
    ``{e}``); NotImplementedError for the models whose linears are not yet covered."""
    if spec.mla is not None or (spec.moe is not None and
                                spec.architecture not in _PER_EXPERT_HF):
        raise NotImplementedError(
            f"adapters on {spec.architecture} are not supported yet (latent attention, or "
            "experts whose HF names differ from gate_proj/up_proj/down_proj); dense decoders, "
            "Qwen2-MoE and Qwen3-MoE")
    if spec.moe is not None and spec.moe.is_moe_layer(layer):
        return MOE_SITES + ((SHARED_FC1, SHARED_FC2) if spec.moe.shared_ffn_hidden_size else ())
    return DENSE_SITES


# MoE architectures whose experts' HF modules are mlp.experts.{e}.gate_proj/up_proj/down_proj
# (transformers 4's, and what peft saves for them) and whose shared expert is mlp.shared_expert
_PER_EXPERT_HF = frozenset({"Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})


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


def module_name(layer: int, site: Site, expert: int | None = None) -> str:
    """The global mcore module: ``(3, QKV) -> "decoder.layers.3.self_attention.linear_qkv"``,
    ``(3, EXPERT_FC2, 5) -> "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2"``."""
    return keys.with_layer(layer, _expert_slot(site.name, site, expert))


def part_name(layer: int, site: Site, part: str, expert: int | None = None) -> str:
    """A part as a full name for ``AdapterSpec.selects``:
    ``(3, QKV, "linear_q") -> "decoder.layers.3.self_attention.linear_q"``."""
    return module_name(layer, site, expert).rsplit(".", 1)[0] + "." + part


def hf_module(layer: int, site: Site, part: int, expert: int | None = None) -> str:
    """``(3, QKV, 0) -> "model.layers.3.self_attn.q_proj"``,
    ``(3, EXPERT_FC1, 1, 5) -> "model.layers.3.mlp.experts.5.up_proj"``."""
    return keys.HF_LAYER.format(i=layer) + _expert_slot(site.hf[part], site, expert)


def _expert_slot(name: str, site: Site, expert: int | None) -> str:
    if site.expert != (expert is not None):
        raise ValueError(f"{site.name}: an expert site needs an expert index, any other none "
                         f"(got {expert})")
    return name.format(e=expert) if site.expert else name
