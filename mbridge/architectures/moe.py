"""Mixture-of-experts mapping pieces shared by the MoE architectures, and the whole-model
mapping built from them.

mcore names follow megatron/core/transformer/moe/ with the local layer spec: the router
``mlp.router.weight`` ``[experts, hidden]`` (plus ``bias`` and the score-correction
``expert_bias``), each expert ``mlp.experts.local_experts.{e}.linear_fc1.weight``
``[2 * ffn, hidden]`` (``[gate; up]``) and ``linear_fc2.weight`` ``[hidden, ffn]``
(SequentialMLP), the shared expert ``mlp.shared_experts.linear_fc1/linear_fc2.weight`` and its
gate ``mlp.shared_experts.gate_weight`` ``[1, hidden]``. Expert indices in mappings are
global; ``mbridge.sharding.expert`` places them on EP ranks. TEGroupedMLP names the same
tensors ``mlp.experts.linear_fc1.weight{e}`` (``keys.grouped_key``/``keys.sequential_key``).

A MoE layer is several mapping groups: one for attention, norms, router and shared expert,
then one per expert, so that an EP rank reads only its experts and export streams one expert
at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mbridge.architectures import dense
from mbridge.keys import HF_LAYER, MC_EXPERT, MC_LAYER
from mbridge.mappings.core import Mapping, at, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, split_gate_up
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, ROW, Layout
from mbridge.specs import ModelSpec

MC_MLP = MC_LAYER + "mlp."
EXPERT_COLUMN = Layout(dim=0, expert=True)
EXPERT_ROW = Layout(dim=1, expert=True)
EXPERT_GATED = Layout(dim=0, parts=2, expert=True)


def pre_mlp_norm() -> Mapping:
    return rename(HF_LAYER + "post_attention_layernorm.weight",
                  MC_LAYER + "pre_mlp_layernorm.weight")


def router(weight: str, bias: str | None = None, expert_bias: str | None = None) -> Mapping:
    """Template: the router's weight (and bias, score-correction bias), replicated."""
    parts = [rename(weight, MC_MLP + "router.weight")]
    if bias:
        parts.append(rename(bias, MC_MLP + "router.bias"))
    if expert_bias:
        parts.append(rename(expert_bias, MC_MLP + "router.expert_bias"))
    return chain(*parts)


def expert(gate: str, up: str, down: str) -> Mapping:
    """Template for expert ``{e}`` stored as three HF tensors: gate, up ``[ffn, hidden]``
    fused into ``linear_fc1``, down ``[hidden, ffn]`` as ``linear_fc2``."""
    return chain(
        fuse((gate, up), MC_EXPERT + "linear_fc1.weight", fuse_fn=fuse_gate_up,
             split_fn=split_gate_up, hf_layout=EXPERT_COLUMN, mcore_layout=EXPERT_GATED),
        rename(down, MC_EXPERT + "linear_fc2.weight", EXPERT_ROW),
    )


def stacked_expert(gate_up: str, down: str) -> Mapping:
    """Template for expert ``{e}`` as rows of stacked HF tensors (transformers' fused
    ``gate_up_proj`` ``[experts, 2 * ffn, hidden]``, gate first, and ``down_proj``
    ``[experts, hidden, ffn]``): row ``{e}`` is already Megatron-Core's layout."""
    return chain(rename(gate_up + "[{e}]", MC_EXPERT + "linear_fc1.weight", EXPERT_GATED),
                 rename(down + "[{e}]", MC_EXPERT + "linear_fc2.weight", EXPERT_ROW))


def shared_expert(prefix: str, gate_weight: str | None = None) -> Mapping:
    """Template: a shared expert with HF ``{prefix}.gate_proj/up_proj/down_proj.weight``,
    split over TP like a dense MLP, and its optional sigmoid gate ``[1, hidden]``."""
    mc = MC_MLP + "shared_experts."
    parts = [
        fuse((prefix + ".gate_proj.weight", prefix + ".up_proj.weight"), mc + "linear_fc1.weight",
             fuse_fn=fuse_gate_up, split_fn=split_gate_up, hf_layout=COLUMN,
             mcore_layout=GATED_COLUMN),
        rename(prefix + ".down_proj.weight", mc + "linear_fc2.weight", ROW),
    ]
    if gate_weight:
        parts.append(rename(gate_weight, mc + "gate_weight"))
    return chain(*parts)


def transform(hf_key: str, mcore_key: str, to_mcore: Callable, to_hf: Callable,
              hf_layout: Layout, mcore_layout: Layout) -> Mapping:
    """One tensor, changed by ``to_mcore`` on the way in and ``to_hf`` (its inverse) back."""
    return fuse((hf_key,), mcore_key, fuse_fn=to_mcore, split_fn=lambda t: (to_hf(t),),
                hf_layout=hf_layout, mcore_layout=mcore_layout)


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Last dim ``[g0, u0, g1, u1, ...]`` -> ``[g0, g1, ..., u0, u1, ...]``."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], -1).contiguous()


def interleave(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``deinterleave``: ``interleave(deinterleave(t)) == t``."""
    first, second = t.chunk(2, -1)
    return torch.stack([first, second], -1).flatten(-2).contiguous()


def mapping(spec: ModelSpec, multiple: int, *, attention: Mapping, moe_block: Mapping,
            expert_template: Mapping, dense_block: Mapping | None = None) -> tuple[Mapping, ...]:
    """The whole model in global order: embedding; per layer one group of attention, norms
    and (for MoE layers) ``moe_block``, followed by one group per expert (for dense layers
    ``dense_block``, default the Llama MLP); final norm and untied output layer."""
    groups = [dense.embedding(spec, multiple)]
    moe_layer = chain(attention, pre_mlp_norm(), moe_block)
    dense_layer = chain(attention, dense_block or dense.mlp())
    for i in range(spec.num_layers):
        if not spec.moe.is_moe_layer(i):
            groups.append(at(dense_layer, i=i))
            continue
        groups.append(at(moe_layer, i=i))
        groups += [at(expert_template, i=i, e=e) for e in range(spec.moe.num_experts)]
    groups.append(dense.tail(spec, multiple))
    return tuple(groups)


def is_stacked(keys) -> dict:
    """The ``stacked`` mapping option: whether a checkpoint holds each layer's experts in one
    tensor (transformers 5's ``mlp.experts.gate_up_proj``) rather than one tensor each."""
    return {"stacked": any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)}


def layer_shapes(spec: ModelSpec, layer: int,
                 attention: Callable[[ModelSpec], dense.Shapes] = dense.attention_shapes
                 ) -> dense.Shapes:
    """Every tensor of decoder layer ``layer`` (local-spec names, experts as ``{e}``, TP=1):
    a dense layer off ``moe.dense_layers``, else router, experts and shared expert."""
    h, moe = spec.hidden_size, spec.moe
    out = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,), **attention(spec)}
    if not moe.is_moe_layer(layer):
        return {**out, **dense.mlp_shapes("mlp.", spec.ffn_hidden_size, h, spec.linear_bias)}
    out["mlp.router.weight"] = (moe.num_experts, h)
    if spec.linear_bias:
        out["mlp.router.bias"] = (moe.num_experts,)
    if moe.expert_bias:
        out["mlp.router.expert_bias"] = (moe.num_experts,)
    out.update(dense.mlp_shapes("mlp.experts.local_experts.{e}.", moe.ffn_hidden_size, h,
                                spec.linear_bias))
    if moe.shared_ffn_hidden_size:
        out.update(dense.mlp_shapes("mlp.shared_experts.", moe.shared_ffn_hidden_size, h, False))
        if moe.shared_gate:
            out["mlp.shared_experts.gate_weight"] = (1, h)
    return out


def mcore_config(spec: ModelSpec) -> dict[str, Any]:
    """The dense settings plus Megatron-Core's MoE settings for ``spec.moe``."""
    return {**dense.mcore_config(spec), **moe_kwargs(spec)}


def moe_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Megatron-Core's MoE settings for ``spec.moe`` (megatron/core/transformer/moe/)."""
    moe = spec.moe
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_gate,
        moe_router_score_function=moe.score,
        moe_router_pre_softmax=moe.pre_softmax,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_topk,
        moe_router_topk_scaling_factor=moe.scaling_factor,
        moe_router_dtype="fp32" if moe.router_fp32 else None,
        # an int keeps Megatron-Core's homogeneous (layer-stacked) checkpoint layout when
        # every layer is MoE; a list (mixed dense/MoE) makes it keep per-layer keys
        moe_layer_freq=[int(moe.is_moe_layer(i)) for i in range(spec.num_layers)]
        if moe.dense_layers else 1,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
    )
