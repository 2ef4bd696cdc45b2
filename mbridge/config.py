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
    return kwargs


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
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
