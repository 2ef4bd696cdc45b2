"""Gemma2ForCausalLM and Gemma3ForCausalLM (text, ``model_type="gemma3_text"``).

HF names follow ``transformers/models/gemma2/modeling_gemma2.py`` and
``gemma3/modeling_gemma3.py``. A Gemma layer is the Llama layer (``dense.attention``: fused
q/k/v, o, input norm; Gemma 3 adds per-head q/k norms) plus two norms on the block outputs:

- ``post_attention_layernorm`` (on the attention output) ->
  ``self_attention.linear_proj.post_layernorm.weight``;
- ``pre_feedforward_layernorm`` -> ``pre_mlp_layernorm.weight``;
- ``post_feedforward_layernorm`` (on the MLP output) -> ``mlp.linear_fc2.post_layernorm.weight``.

Every norm scales by ``1 + weight``; the weights are copied raw (the shell's norm adds the 1,
``shell/gemma.py``), so round trips are bit-exact. Embeddings are scaled by sqrt(hidden), the
softmax by ``query_pre_attn_scalar ** -0.5``, logits are soft-capped (attention logits in
Gemma 2 only: transformers' ``Gemma3Attention`` never passes ``attn_logit_softcapping`` to
its attention function, so a Gemma 3 model ignores it, and so does mbridge), and the layers
``layer_types`` marks ``sliding_attention`` attend within ``sliding_window``. Gemma 3 rotates
those sliding layers with their own rope (``rope_parameters["sliding_attention"]``,
``ModelSpec.local_rope``) and the global layers with ``rope_parameters["full_attention"]``
(``ModelSpec.rope``, for example linear-scaled).
"""

from __future__ import annotations

from typing import Any

from mbridge.architectures import dense
from mbridge.architectures.registry import Architecture, register
from mbridge.keys import HF_LAYER, MC_LAYER
from mbridge.mappings.core import Mapping, chain, fuse, rename
from mbridge.mappings.ops import fuse_gate_up, split_gate_up
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, REPLICATED, ROW
from mbridge.specs import ModelSpec, RopeSpec

Shapes = dict[str, tuple[int, ...]]

GELU_TANH = "gelu_pytorch_tanh"
SLIDING, FULL = "sliding_attention", "full_attention"
POST_ATTN_NORM = "self_attention.linear_proj.post_layernorm.weight"
POST_MLP_NORM = "mlp.linear_fc2.post_layernorm.weight"
# HF defaults where a config.json leaves a key out (Gemma2Config, Gemma3TextConfig)
GEMMA2_DEFAULTS = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
GEMMA3_THETAS = {FULL: 1_000_000.0, SLIDING: 10_000.0}


def check_supported(cfg: dict[str, Any]) -> None:
    """NotImplementedError naming any setting the Gemma translation cannot express."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or GELU_TANH
    if act != GELU_TANH:
        raise NotImplementedError(f"Gemma hidden_activation={act!r} is not supported "
                                  f"({GELU_TANH} only)")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if cfg.get(flag):
            raise NotImplementedError(f"Gemma {flag}=True is not supported")
    kinds = set(cfg.get("layer_types") or ()) - {SLIDING, FULL}
    if kinds:
        raise NotImplementedError(f"Gemma layer_types {sorted(kinds)} are not supported "
                                  f"({SLIDING}, {FULL} only)")


def gemma_rope(cfg: dict[str, Any]) -> RopeSpec:
    """``dense.rope_from_hf`` of a config (or of one layer type's ``{"rope_parameters": ...}``);
    yarn is refused (its cos/sin factor would scale only some layers' softmax, which one
    ``softmax_scale`` cannot express)."""
    rope = dense.rope_from_hf(cfg)
    if rope.kind == "yarn":
        raise NotImplementedError("Gemma rope_type='yarn' is not supported "
                                  "(supported: default, linear, llama3)")
    return rope


def window_layers(cfg: dict[str, Any], every: int) -> tuple[bool, ...]:
    """``layer_types`` as ``[layers]`` bools, True = sliding; absent: HF's default pattern,
    sliding except every ``every``-th layer."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % every else FULL for i in range(n)]
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
    return tuple(t == SLIDING for t in types)


def attention_scale(cfg: dict[str, Any]) -> float:
    """The softmax scale HF uses: ``query_pre_attn_scalar ** -0.5`` (default 256)."""
    return cfg.get("query_pre_attn_scalar", 256) ** -0.5


def query_pre_attn_scalar(spec: ModelSpec) -> float | int:
    """Inverse of ``attention_scale``, an integer where it is one up to rounding (so the
    scale read back is the same float)."""
    value = spec.attention_scale ** -2
    return round(value) if abs(value - round(value)) < 1e-6 else value


def spec_from_hf(cfg: dict[str, Any], **fields) -> ModelSpec:
    """The parts Gemma 2 and 3 share; ``fields`` adds the family's own."""
    check_supported(cfg)
    return dense.spec_from_hf(
        {**cfg, "hidden_act": "silu"}, activation="gelu_tanh", zero_centered_norm=True,
        post_norms=True, embedding_scale=cfg["hidden_size"] ** 0.5,
        attention_scale=attention_scale(cfg), sliding_window=cfg.get("sliding_window", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), **fields)


def gemma2_from_hf(cfg: dict[str, Any]) -> ModelSpec:
    caps = {k: cfg.get(k, v) for k, v in GEMMA2_DEFAULTS.items()}
    return spec_from_hf(cfg, rope=gemma_rope(cfg),
                        window_layers=window_layers(cfg, 2),
                        attn_logit_softcap=caps["attn_logit_softcapping"],
                        final_logit_softcap=caps["final_logit_softcapping"])


def gemma3_ropes(cfg: dict[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    """(global, local) ropes from ``rope_parameters`` keyed by layer type (transformers 5),
    or from ``rope_theta``/``rope_scaling``/``rope_local_base_freq`` (older files)."""
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        full = {"rope_theta": GEMMA3_THETAS[FULL], **(params.get(FULL) or {})}
        local = {"rope_theta": GEMMA3_THETAS[SLIDING], **(params.get(SLIDING) or {})}
    else:
        full = {**(cfg.get("rope_scaling") or {}),
                "rope_theta": cfg.get("rope_theta", GEMMA3_THETAS[FULL])}
        local = {"rope_theta": cfg.get("rope_local_base_freq", GEMMA3_THETAS[SLIDING])}
    return (gemma_rope({"rope_parameters": full}),
            gemma_rope({"rope_parameters": local}))


def gemma3_from_hf(cfg: dict[str, Any]) -> ModelSpec:
    rope, local = gemma3_ropes(cfg)
    # attn_logit_softcapping is left out on purpose: Gemma3Attention never applies it
    return spec_from_hf(cfg, rope=rope, local_rope=local, qk_norm=True,
                        window_layers=window_layers(cfg, cfg.get("sliding_window_pattern", 6)),
                        final_logit_softcap=cfg.get("final_logit_softcapping"))


def spec_to_hf(spec: ModelSpec, model_type: str, **extra) -> dict[str, Any]:
    out = dense.spec_to_hf(
        spec, model_type, hidden_activation=GELU_TANH, attention_bias=False,
        query_pre_attn_scalar=query_pre_attn_scalar(spec), sliding_window=spec.sliding_window,
        final_logit_softcapping=spec.final_logit_softcap,
        layer_types=[SLIDING if w else FULL for w in spec.window_layers], **extra)
    out.pop("hidden_act")
    return out


def gemma2_to_hf(spec: ModelSpec) -> dict[str, Any]:
    return spec_to_hf(spec, "gemma2", attn_logit_softcapping=spec.attn_logit_softcap)


def gemma3_to_hf(spec: ModelSpec) -> dict[str, Any]:
    out = spec_to_hf(spec, "gemma3_text", attn_logit_softcapping=None)
    out["rope_parameters"] = {FULL: dense.rope_to_hf(spec.rope),
                              SLIDING: dense.rope_to_hf(spec.local_rope)}
    return out


def mlp() -> Mapping:
    """Template for layer ``{i}``'s MLP and the norms around it: ``pre_feedforward_layernorm``
    (the pre-MLP norm), gate/up fused into ``linear_fc1``, down, and the post-MLP norm
    ``[hidden]`` inside ``linear_fc2`` (replicated)."""
    m = HF_LAYER + "mlp."
    return chain(
        rename(HF_LAYER + "pre_feedforward_layernorm.weight",
               MC_LAYER + "pre_mlp_layernorm.weight"),
        fuse((m + "gate_proj.weight", m + "up_proj.weight"), MC_LAYER + "mlp.linear_fc1.weight",
             fuse_fn=fuse_gate_up, split_fn=split_gate_up, hf_layout=COLUMN,
             mcore_layout=GATED_COLUMN),
        rename(m + "down_proj.weight", MC_LAYER + "mlp.linear_fc2.weight", ROW),
        rename(HF_LAYER + "post_feedforward_layernorm.weight", MC_LAYER + POST_MLP_NORM,
               REPLICATED),
    )


def layer(spec: ModelSpec) -> Mapping:
    """Template for one decoder layer: Llama attention, the post-attention norm ``[hidden]``
    inside ``linear_proj`` (replicated), then ``mlp``."""
    post_attn = rename(HF_LAYER + "post_attention_layernorm.weight", MC_LAYER + POST_ATTN_NORM,
                       REPLICATED)
    return chain(dense.attention(spec), post_attn, mlp())


def mapping(spec: ModelSpec, multiple: int = 128) -> tuple[Mapping, ...]:
    """Embedding, one group per Gemma layer, final norm and (untied only) output layer."""
    return dense.mapping(spec, multiple, layer=layer(spec))


def layer_shapes(spec: ModelSpec, layer: int) -> Shapes:
    """A dense layer's tensors plus the two post norms ``[hidden]``."""
    h = spec.hidden_size
    return {**dense.layer_shapes(spec, layer), POST_ATTN_NORM: (h,), POST_MLP_NORM: (h,)}


def mcore_config(spec: ModelSpec) -> dict[str, Any]:
    """Softmax scale and the per-layer windows (a list, 1 = sliding: Megatron-Core's
    ``is_layer_window_attention`` reads entry ``layer_number - 1``). The GeLU-tanh
    activation comes with the common part (``ModelSpec.activation``)."""
    return dict(softmax_scale=spec.attention_scale,
                window_attn_skip_freq=[int(w) for w in spec.window_layers])


GEMMA2 = register(Architecture("Gemma2ForCausalLM", gemma2_from_hf, gemma2_to_hf, mapping,
                               layer_shapes, mcore_config, "gemma"))
GEMMA3 = register(Architecture("Gemma3ForCausalLM", gemma3_from_hf, gemma3_to_hf, mapping,
                               layer_shapes, mcore_config, "gemma"))
