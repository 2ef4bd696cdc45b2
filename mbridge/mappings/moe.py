"""Mixture-of-experts mapping pieces shared by the MoE architectures, and the whole-model
mapping built from them.

mcore names follow megatron/core/transformer/moe/ with the local layer spec: the router
``mlp.router.weight`` ``[experts, hidden]`` (plus ``bias`` and the score-correction
``expert_bias``), each expert ``mlp.experts.local_experts.{e}.linear_fc1.weight``
``[2 * ffn, hidden]`` (``[gate; up]``) and ``linear_fc2.weight`` ``[hidden, ffn]``
(SequentialMLP), the shared expert ``mlp.shared_experts.linear_fc1/linear_fc2.weight`` and its
gate ``mlp.shared_experts.gate_weight`` ``[1, hidden]``. Expert indices in mappings are
global; ``mbridge.sharding.expert`` places them on EP ranks. TEGroupedMLP names the same
tensors ``mlp.experts.linear_fc1.weight{e}``: ``grouped_key``/``sequential_key``.

A MoE layer is several mapping groups: one for attention, norms, router and shared expert,
then one per expert, so that an EP rank reads only its experts and export streams one expert
at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from mbridge.mappings import dense
from mbridge.mappings.core import Mapping, at, chain, fuse, rename
from mbridge.mappings.dense import HF_LAYER, MC_LAYER
from mbridge.mappings.ops import fuse_gate_up, split_gate_up
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, REPLICATED, ROW, Layout, vocab_layout
from mbridge.specs import ModelSpec

MC_MLP = MC_LAYER + "mlp."
MC_EXPERT = MC_MLP + "experts.local_experts.{e}."
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
    vocab = vocab_layout(spec.vocab_size, multiple)
    groups = [rename("model.embed_tokens.weight", "embedding.word_embeddings.weight", vocab)]
    moe_layer = chain(attention, pre_mlp_norm(), moe_block)
    dense_layer = chain(attention, dense_block or dense.mlp())
    for i in range(spec.num_layers):
        if not spec.moe.is_moe_layer(i):
            groups.append(at(dense_layer, i=i))
            continue
        groups.append(at(moe_layer, i=i))
        groups += [at(expert_template, i=i, e=e) for e in range(spec.moe.num_experts)]
    tail = [rename("model.norm.weight", "decoder.final_layernorm.weight", REPLICATED)]
    if not spec.tie_embeddings:
        tail.append(rename("lm_head.weight", "output_layer.weight", vocab))
    groups.append(chain(*tail))
    return tuple(groups)


_SEQUENTIAL = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_GROUPED = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def grouped_key(key: str) -> str:
    """SequentialMLP's name -> TEGroupedMLP's:
    ``"...mlp.experts.local_experts.3.linear_fc1.weight" -> "...mlp.experts.linear_fc1.weight3"``"""
    m = _SEQUENTIAL.search(key)
    return f"{key[:m.start()]}.mlp.experts.{m[2]}.{m[3]}{m[1]}" if m else key


def sequential_key(key: str) -> str:
    """Inverse of ``grouped_key``."""
    m = _GROUPED.search(key)
    return f"{key[:m.start()]}.mlp.experts.local_experts.{m[3]}.{m[1]}.{m[2]}" if m else key
