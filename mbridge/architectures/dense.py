"""The Llama-style decoder shared by Llama, Mistral, Qwen2 and Qwen3: config translation
pair and mapping. Per-architecture files only state what differs.

HF names follow ``transformers/models/llama/modeling_llama.py``; mcore names follow the
local layer spec of ``megatron/core/models/gpt/gpt_layer_specs.py`` (``keys.te_key`` gives
the Transformer Engine spec's names). Next to each mapping template sits the table of the
Megatron-Core tensors it writes (``attention_shapes``, ``mlp_shapes``): the one source of what
a distributed checkpoint of the model holds.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from mbridge.keys import EMBEDDING, FINAL_NORM, HF_LAYER, MC_LAYER, OUTPUT
from mbridge.mappings.core import Mapping, at, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.rope import rope_attention_factor
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, REPLICATED, ROW, vocab_layout
from mbridge.specs import ModelSpec, RopeSpec

Shapes = dict[str, tuple[int, ...]]


def rope_from_hf(cfg: dict[str, Any]) -> RopeSpec:
    """Read rope settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (older files)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise NotImplementedError(f"rope_type={kind!r} is not supported yet "
                                  "(supported: default, linear, llama3, yarn)")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
            "beta_fast", "beta_slow", "truncate")
    optional = {k: float(params[k]) for k in YARN_OPTIONAL if params.get(k) is not None}
    return RopeSpec(theta=float(theta), kind=kind, **optional,
                    **{k: type(getattr(RopeSpec(), k))(params[k]) for k in keep
                       if params.get(k) is not None})


YARN_OPTIONAL = ("attention_factor", "mscale", "mscale_all_dim")


def rope_to_hf(rope: RopeSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.kind, "rope_theta": rope.theta}
    if rope.kind == "linear":
        out["factor"] = rope.factor
    if rope.kind == "llama3":
        out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                   high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.kind == "yarn":
        out.update(factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                   truncate=rope.truncate,
                   original_max_position_embeddings=rope.original_max_position_embeddings,
                   **{k: getattr(rope, k) for k in YARN_OPTIONAL if getattr(rope, k) is not None})
    return out


def spec_from_hf(cfg: dict[str, Any], **overrides) -> ModelSpec:
    """HF ``config.json`` dict -> ModelSpec for a Llama-style model."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act={cfg['hidden_act']!r} is not supported (silu only)")
    if cfg.get("mlp_bias"):
        raise NotImplementedError("mlp_bias=True is not supported")
    heads = cfg["num_attention_heads"]
    fields = dict(
        architecture=cfg["architectures"][0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=rope_from_hf(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def spec_to_hf(spec: ModelSpec, model_type: str, **extra) -> dict[str, Any]:
    """ModelSpec -> HF ``config.json`` dict (the keys a Llama-style config needs)."""
    return dict(
        architectures=[spec.architecture],
        model_type=model_type,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_act=spec.activation,
        rms_norm_eps=spec.norm_eps,
        rope_parameters=rope_to_hf(spec.rope),
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings,
        **extra,
    )


def attention(spec: ModelSpec) -> Mapping:
    """Template for layer ``{i}``'s attention: q/k/v fused, o, input norm, optional
    qkv bias (Qwen2) and q/k norms (Qwen3, ``[head_dim]``, replicated)."""
    a = "self_attn."
    qkv = partial(fuse, fuse_fn=partial(fuse_qkv, head_dim=spec.head_dim),
                  split_fn=partial(split_qkv, heads_per_group=spec.heads_per_group,
                                   head_dim=spec.head_dim),
                  hf_layout=COLUMN, mcore_layout=COLUMN)
    parts = [
        rename(HF_LAYER + "input_layernorm.weight", MC_LAYER + "input_layernorm.weight"),
        qkv(tuple(HF_LAYER + a + f"{p}_proj.weight" for p in "qkv"),
            MC_LAYER + "self_attention.linear_qkv.weight"),
        rename(HF_LAYER + a + "o_proj.weight", MC_LAYER + "self_attention.linear_proj.weight", ROW),
    ]
    if spec.qkv_bias:
        parts.append(qkv(tuple(HF_LAYER + a + f"{p}_proj.bias" for p in "qkv"),
                         MC_LAYER + "self_attention.linear_qkv.bias"))
    if spec.qk_norm:
        parts += [rename(HF_LAYER + a + f"{p}_norm.weight",
                         MC_LAYER + f"self_attention.{p}_layernorm.weight") for p in "qk"]
    return chain(*parts)


def mlp() -> Mapping:
    """Template for layer ``{i}``'s gated MLP: gate/up fused into ``linear_fc1``."""
    m = HF_LAYER + "mlp."
    return chain(
        rename(HF_LAYER + "post_attention_layernorm.weight", MC_LAYER + "pre_mlp_layernorm.weight"),
        fuse((m + "gate_proj.weight", m + "up_proj.weight"), MC_LAYER + "mlp.linear_fc1.weight",
             fuse_fn=fuse_gate_up, split_fn=split_gate_up, hf_layout=COLUMN,
             mcore_layout=GATED_COLUMN),
        rename(m + "down_proj.weight", MC_LAYER + "mlp.linear_fc2.weight", ROW),
    )


def embedding(spec: ModelSpec, multiple: int = 128) -> Mapping:
    """The token embedding ``[vocab, hidden]``, vocab-padded over TP."""
    return rename("model.embed_tokens.weight", EMBEDDING,
                  vocab_layout(spec.vocab_size, multiple))


def tail(spec: ModelSpec, multiple: int = 128) -> Mapping:
    """The final norm and, untied only, the output layer ``[vocab, hidden]``."""
    parts = [rename("model.norm.weight", FINAL_NORM, REPLICATED)]
    if not spec.tie_embeddings:
        parts.append(rename("lm_head.weight", OUTPUT, vocab_layout(spec.vocab_size, multiple)))
    return chain(*parts)


def mapping(spec: ModelSpec, multiple: int = 128, *,
            layer: Mapping | None = None) -> tuple[Mapping, ...]:
    """The whole model as groups in a fixed global order: embedding, one group per layer
    (``layer``, a template with ``{i}``; default the Llama layer), then the tail. Import
    and export stream group by group."""
    layer = layer or chain(attention(spec), mlp())
    return (embedding(spec, multiple), *(at(layer, i=i) for i in range(spec.num_layers)),
            tail(spec, multiple))


def attention_shapes(spec: ModelSpec) -> Shapes:
    """Shapes of one layer's attention tensors (local-spec names, TP=1)."""
    h, heads, d = spec.hidden_size, spec.num_heads, spec.head_dim
    a = "self_attention."
    qkv = (heads + 2 * spec.num_kv_heads) * d
    out = {a + "linear_qkv.weight": (qkv, h), a + "linear_proj.weight": (h, heads * d)}
    if spec.qkv_bias or spec.linear_bias:
        out[a + "linear_qkv.bias"] = (qkv,)
    if spec.linear_bias:
        out[a + "linear_proj.bias"] = (h,)
    if spec.qk_norm:
        out.update({a + "q_layernorm.weight": (d,), a + "k_layernorm.weight": (d,)})
    if spec.attention_sinks:
        out[a + "core_attention.softmax_offset"] = (heads,)
    return out


def mlp_shapes(prefix: str, ffn: int, hidden: int, bias: bool) -> Shapes:
    """A gated MLP under ``prefix``: ``linear_fc1`` ``[2 * ffn, hidden]``, ``linear_fc2``
    ``[hidden, ffn]`` (and their biases)."""
    fc1, fc2 = prefix + "linear_fc1.", prefix + "linear_fc2."
    out = {fc1 + "weight": (2 * ffn, hidden), fc2 + "weight": (hidden, ffn)}
    if bias:
        out.update({fc1 + "bias": (2 * ffn,), fc2 + "bias": (hidden,)})
    return out


def layer_shapes(spec: ModelSpec, layer: int) -> Shapes:
    """Every tensor of one dense decoder layer (local-spec names, TP=1)."""
    h = spec.hidden_size
    return {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
            **attention_shapes(spec), **mlp_shapes("mlp.", spec.ffn_hidden_size, h,
                                                   spec.linear_bias)}


def mcore_config(spec: ModelSpec) -> dict[str, Any]:
    """The architecture's ``TransformerConfig`` settings: biases everywhere, attention sinks,
    per-layer windows, the GLU variant and yarn's attention factor (non-default only)."""
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
