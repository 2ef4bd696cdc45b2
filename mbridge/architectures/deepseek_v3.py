"""DeepseekV3ForCausalLM: multi-latent attention, dense MLPs on the first
``first_k_dense_replace`` layers, then routed experts with a sigmoid router (a score-correction
bias picks the experts, ``n_group``/``topk_group`` limit the choice to the best groups, the
weights are renormalised and scaled by ``routed_scaling_factor``) plus shared experts.

MLA names: HF ``q_a_proj`` ``[q_lora, hidden]``, ``q_a_layernorm``, ``q_b_proj``
``[heads * (nope + rope), q_lora]``, ``kv_a_proj_with_mqa`` ``[kv_lora + rope, hidden]``,
``kv_a_layernorm``, ``kv_b_proj`` ``[heads * (nope + v), kv_lora]``, ``o_proj``; Megatron-Core
(``multi_latent_attention.py``) uses the same row orders, so every tensor is a rename. Its
local spec splits the down projections over TP by rows too (and gathers their output).
Multi-token-prediction layers (``model.layers.{num_hidden_layers}...`` in hub checkpoints)
are not converted: transformers does not load them either.
"""

from typing import Any

from mbridge.architectures import dense, moe
from mbridge.architectures.qwen3_moe import experts as qwen_experts
from mbridge.architectures.registry import Architecture, register
from mbridge.mappings.core import chain, rename
from mbridge.rope import rope_attention_factor
from mbridge.sharding.layout import COLUMN, ROW
from mbridge.specs import MLASpec, ModelSpec, MoESpec

M = dense.HF_LAYER + "mlp."


def check_supported(cfg) -> None:
    """Raise NotImplementedError for settings Megatron-Core 0.16 cannot express."""
    if cfg.get("attention_bias"):
        raise NotImplementedError("DeepSeek-V3 attention_bias=True is not supported: "
                                  "Megatron-Core's MLA down-projections have no bias")
    if cfg.get("rms_norm_eps", 1e-6) != 1e-6:
        raise NotImplementedError(
            f"rms_norm_eps={cfg['rms_norm_eps']}: transformers normalises the MLA q and kv "
            "latents with eps 1e-6 whatever rms_norm_eps is, Megatron-Core uses one epsilon "
            "for every norm, so they agree only at 1e-6")
    if not cfg.get("rope_interleave", True):
        raise NotImplementedError("DeepSeek-V3 rope_interleave=False is not supported: "
                                  "Megatron-Core's MLA always rotates interleaved pairs")
    topk, groups, group_topk = cfg["num_experts_per_tok"], cfg.get("n_group") or 1, \
        cfg.get("topk_group") or 1
    if groups > 1 and topk // group_topk != 2:
        raise NotImplementedError(
            f"num_experts_per_tok // topk_group = {topk // group_topk}: Megatron-Core scores "
            "an expert group by the sum of its top (topk // group_topk) experts, transformers "
            "by its top 2, so they agree only when that quotient is 2")
    if not cfg.get("norm_topk_prob", True):
        raise NotImplementedError("norm_topk_prob=False is not supported: Megatron-Core "
                                  "always renormalises sigmoid top-k weights")


def moe_from_hf(cfg) -> MoESpec:
    ffn, groups = cfg["moe_intermediate_size"], cfg.get("n_group") or 1
    shared = (cfg.get("n_shared_experts") or 0) * ffn
    return MoESpec(
        num_experts=cfg["n_routed_experts"], topk=cfg["num_experts_per_tok"], ffn_hidden_size=ffn,
        shared_ffn_hidden_size=shared or None, score="sigmoid", expert_bias=True,
        num_groups=groups if groups > 1 else None,
        group_topk=cfg.get("topk_group") if groups > 1 else None,
        scaling_factor=cfg.get("routed_scaling_factor", 1.0), router_fp32=True,
        dense_layers=tuple(range(min(cfg.get("first_k_dense_replace", 0),
                                     cfg["num_hidden_layers"]))))


def from_hf_config(cfg):
    check_supported(cfg)
    mla = MLASpec(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
                  qk_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                  v_head_dim=cfg["v_head_dim"])
    spec = dense.spec_from_hf(cfg, num_kv_heads=cfg["num_attention_heads"],
                              head_dim=cfg["v_head_dim"], moe=moe_from_hf(cfg), mla=mla)
    if rope_attention_factor(spec.rope) != 1.0:
        raise NotImplementedError(
            "yarn with mscale != mscale_all_dim is not supported for MLA: Megatron-Core's "
            "MLA scales cos/sin only in its own yarn embedding, whose frequencies differ")
    return spec


def to_hf_config(spec):
    m, a = spec.moe, spec.mla
    out = dense.spec_to_hf(
        spec, "deepseek_v3", n_routed_experts=m.num_experts, num_experts_per_tok=m.topk,
        moe_intermediate_size=m.ffn_hidden_size, n_group=m.num_groups or 1,
        topk_group=m.group_topk or 1, routed_scaling_factor=m.scaling_factor,
        n_shared_experts=(m.shared_ffn_hidden_size or 0) // m.ffn_hidden_size,
        first_k_dense_replace=len(m.dense_layers), norm_topk_prob=True,
        q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, rope_interleave=True,
        attention_bias=False, num_nextn_predict_layers=0)
    out["head_dim"] = a.qk_rope_head_dim  # transformers' rotary embedding reads head_dim
    return out


def attention(spec):
    """Template for layer ``{i}``'s multi-latent attention."""
    a, mc = dense.HF_LAYER + "self_attn.", dense.MC_LAYER + "self_attention."
    norm = "input_layernorm.weight"
    parts = [rename(dense.HF_LAYER + norm, dense.MC_LAYER + norm),
             rename(a + "kv_a_proj_with_mqa.weight", mc + "linear_kv_down_proj.weight", COLUMN),
             rename(a + "kv_a_layernorm.weight", mc + "kv_layernorm.weight"),
             rename(a + "kv_b_proj.weight", mc + "linear_kv_up_proj.weight", COLUMN),
             rename(a + "o_proj.weight", mc + "linear_proj.weight", ROW)]
    if spec.mla.q_lora_rank is None:
        parts.append(rename(a + "q_proj.weight", mc + "linear_q_proj.weight", COLUMN))
    else:
        parts += [rename(a + "q_a_proj.weight", mc + "linear_q_down_proj.weight", COLUMN),
                  rename(a + "q_a_layernorm.weight", mc + "q_layernorm.weight"),
                  rename(a + "q_b_proj.weight", mc + "linear_q_up_proj.weight", COLUMN)]
    return chain(*parts)


def mapping(spec, multiple=128, stacked=False):
    block = [moe.router(M + "gate.weight", expert_bias=M + "gate.e_score_correction_bias")]
    if spec.moe.shared_ffn_hidden_size:
        block.append(moe.shared_expert(M + "shared_experts"))
    return moe.mapping(spec, multiple, attention=attention(spec), moe_block=chain(*block),
                       expert_template=qwen_experts(stacked))


def attention_shapes(spec: ModelSpec) -> dense.Shapes:
    """One layer's multi-latent attention tensors (local-spec names, TP=1)."""
    h, heads, m, a = spec.hidden_size, spec.num_heads, spec.mla, "self_attention."
    q_dim = heads * (m.qk_head_dim + m.qk_rope_head_dim)
    out = {a + "linear_kv_down_proj.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
           a + "kv_layernorm.weight": (m.kv_lora_rank,),
           a + "linear_kv_up_proj.weight": (heads * (m.qk_head_dim + m.v_head_dim),
                                             m.kv_lora_rank),
           a + "linear_proj.weight": (h, heads * m.v_head_dim)}
    if m.q_lora_rank is None:
        out[a + "linear_q_proj.weight"] = (q_dim, h)
    else:
        out.update({a + "linear_q_down_proj.weight": (m.q_lora_rank, h),
                    a + "q_layernorm.weight": (m.q_lora_rank,),
                    a + "linear_q_up_proj.weight": (q_dim, m.q_lora_rank)})
    return out


def layer_shapes(spec: ModelSpec, layer: int) -> dense.Shapes:
    return moe.layer_shapes(spec, layer, attention=attention_shapes)


def mcore_config(spec: ModelSpec) -> dict[str, Any]:
    return {**moe.mcore_config(spec), **mla_kwargs(spec)}


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


DEEPSEEK_V3 = register(Architecture("DeepseekV3ForCausalLM", from_hf_config, to_hf_config,
                                    mapping, layer_shapes, mcore_config, "gpt_block",
                                    hf_options=moe.is_stacked))
