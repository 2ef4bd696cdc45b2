"""Pure config translation: ModelSpec + ParallelSpec -> Megatron-Core kwargs.

Nothing here imports megatron.core: the kwargs are plain dicts (activation and dtype by
name) that the shell resolves and passes to ``TransformerConfig`` and ``GPTModel``. The
common part (sizes, layout, dtypes) is here; each architecture adds its own
(``Architecture.mcore_config``). ``from_hf_config``/``to_hf_config`` are the registry's,
re-exported for convenience.
"""

from __future__ import annotations

from typing import Any

from mbridge import architectures  # noqa: F401  (registers every architecture)
from mbridge.architectures import registry
from mbridge.architectures.registry import from_hf_config, to_hf_config
from mbridge.rope import rope_inv_freq
from mbridge.sharding.layout import padded_vocab_size
from mbridge.specs import ModelSpec, ParallelSpec, check_model_fits

__all__ = ["from_hf_config", "gpt_model_kwargs", "rope_inv_freq", "to_hf_config",
           "transformer_config_kwargs"]


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
    if spec.rope.mrope_section is not None:  # 3-D positions (GPTModel's "mrope")
        kwargs["mrope_section"] = list(spec.rope.mrope_section)
    kwargs.update(registry.get(spec.architecture).mcore_config(spec))
    return kwargs


def gpt_model_kwargs(spec: ModelSpec, parallel: ParallelSpec) -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.models.gpt.GPTModel`` (minus config and spec)."""
    return dict(
        vocab_size=padded_vocab_size(spec.vocab_size, parallel.tp, parallel.vocab_multiple),
        max_sequence_length=spec.max_position_embeddings,
        position_embedding_type="rope" if spec.rope.mrope_section is None else "mrope",
        rotary_base=spec.rope.theta,
        share_embeddings_and_output_weights=spec.tie_embeddings,
    )
