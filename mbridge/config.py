"""Pure config translation: HF config dict <-> ModelSpec <-> Megatron-Core kwargs.

Nothing here imports megatron.core: the kwargs are plain dicts (activation and dtype by
name) that the shell resolves and passes to ``TransformerConfig`` and ``GPTModel``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mbridge.mappings import registry
from mbridge.sharding.layout import padded_vocab_size
from mbridge.specs import ModelSpec, ParallelSpec, RopeSpec, check_model_fits


def from_hf_config(hf_config: dict[str, Any]) -> ModelSpec:
    """HF ``config.json`` dict -> ModelSpec, through the architecture's own translation."""
    return registry.architecture_of(hf_config).from_hf_config(hf_config)


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    return registry.get(spec.architecture).to_hf_config(spec)


def transformer_config_kwargs(spec: ModelSpec, parallel: ParallelSpec,
                              dtype: str = "float32") -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.transformer.TransformerConfig``
    (``activation_func`` and ``params_dtype`` by name)."""
    check_model_fits(spec, parallel)
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=spec.activation,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        context_parallel_size=parallel.cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
    )
    if spec.sliding_window is not None:
        # HF attends to the last `sliding_window` positions including itself; Megatron's
        # window (left, right) counts positions besides the query.
        kwargs["window_size"] = (spec.sliding_window - 1, 0)
    kwargs.update(attention_kwargs(spec))
    if spec.moe is not None:
        kwargs.update(moe_kwargs(spec))
    if spec.mla is not None:
        kwargs.update(mla_kwargs(spec))
    return kwargs


def attention_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Biases everywhere, attention sinks, per-layer windows, the GLU variant and yarn's
    attention factor (non-default settings only)."""
    out: dict[str, Any] = {}
    if spec.linear_bias:
        out["add_bias_linear"] = True
    if spec.attention_sinks:
        out["softmax_type"] = "learnable"
    if spec.window_layers is not None:
        out["window_attn_skip_freq"] = [int(w) for w in spec.window_layers]
    if spec.glu_linear_offset:
        out["glu_linear_offset"] = spec.glu_linear_offset
    if spec.activation_clamp is not None:
        out["activation_func_clamp_value"] = spec.activation_clamp
    factor = rope_attention_factor(spec.rope)
    if factor != 1.0 and spec.mla is None:
        # HF scales cos and sin by the factor, so q.k scales by its square: the same as
        # scaling the softmax (Megatron-Core's GPTModel drops yarn's scale).
        out["softmax_scale"] = factor * factor / math.sqrt(spec.head_dim)
    return out


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


def mla_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``MLATransformerConfig`` settings. Rotary frequencies are set by the shell
    (``rope_inv_freq`` over ``qk_rope_head_dim``), so rope_type is plain "rope"; the
    softmax scale takes yarn's ``mscale_all_dim`` through ``rotary_scaling_factor``, as
    transformers' ``yarn_apply_mscale`` does."""
    mla, rope = spec.mla, spec.rope
    scaled = rope.kind != "default" and bool(rope.mscale_all_dim)
    return dict(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        kv_channels=mla.v_head_dim,
        qk_layernorm=True,  # builds the q and kv latent norms
        rope_type="rope",
        rotary_base=rope.theta,
        rotary_scaling_factor=rope.factor if scaled else 1.0,
        mscale_all_dim=rope.mscale_all_dim if scaled else 0.0,
    )


def gpt_model_kwargs(spec: ModelSpec, parallel: ParallelSpec) -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.models.gpt.GPTModel`` (minus config and spec)."""
    return dict(
        vocab_size=padded_vocab_size(spec.vocab_size, parallel.tp, parallel.vocab_multiple),
        max_sequence_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope.theta,
        share_embeddings_and_output_weights=spec.tie_embeddings,
    )


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse rotary frequencies ``[head_dim // 2]`` in float32, computed the way
    ``transformers/modeling_rope_utils.py`` does for default, linear and llama3 rope, so the
    Megatron-Core model rotates exactly as the HF one (Megatron's own llama3 scaling fixes
    low/high frequency factors and the original context; this honours any)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "default":
        return inv
    if rope.kind == "yarn":
        return yarn_inv_freq(rope, head_dim)
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' ``get_mscale``: ``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeSpec) -> float:
    """The factor HF multiplies cos and sin by: 1 except for yarn, where it is
    ``attention_factor`` if given, else from ``mscale``/``mscale_all_dim`` or ``factor``."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def yarn_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Yarn's blend of interpolated and extrapolated frequencies, as
    ``transformers/modeling_rope_utils.py::_compute_yarn_parameters`` computes them."""
    pos = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    extrapolated, interpolated = 1.0 / pos, 1.0 / (rope.factor * pos)

    def correction_dim(rotations: float) -> float:
        old = rope.original_max_position_embeddings
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation
