"""Hypothesis strategies: valid specs and parallel sizes, never raw tensors (tensors are
drawn from a seed so shrinking stays meaningful)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from mbridge.specs import ModelSpec, ParallelSpec, RopeSpec


@st.composite
def model_specs(draw, architecture: str | None = None) -> ModelSpec:
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    return ModelSpec(
        architecture=architecture or draw(st.sampled_from(
            ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])),
        vocab_size=draw(st.integers(3, 300)),
        hidden_size=draw(st.sampled_from([8, 12, 16])),
        ffn_hidden_size=4 * draw(st.integers(1, 6)),
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=head_dim,
        tie_embeddings=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        rope=RopeSpec(theta=draw(st.sampled_from([1e4, 5e5]))),
    )


def tp_sizes(spec: ModelSpec):
    return st.sampled_from([tp for tp in (1, 2, 4) if spec.num_kv_heads % tp == 0
                            and spec.ffn_hidden_size % tp == 0])


def parallel_specs() -> st.SearchStrategy[ParallelSpec]:
    return st.builds(lambda pp, vpp, tp: ParallelSpec(tp=tp, pp=pp, vpp=vpp if pp > 1 else None),
                     st.integers(1, 4), st.sampled_from([None, 1, 2]), st.sampled_from([1, 2]))


def random_hf_tree(spec: ModelSpec, mapping, seed: int) -> dict[str, torch.Tensor]:
    """A random HF tree with the shapes ``spec`` implies for every key ``mapping`` reads."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(hf_shape(spec, k), generator=gen) for m in mapping for k in m.hf_keys}


def hf_shape(spec: ModelSpec, key: str) -> tuple[int, ...]:
    """HF tensor shapes of a Llama-style model, written out independently of the mappings."""
    h, d = spec.hidden_size, spec.head_dim
    table = {
        "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
        "q_proj.weight": (spec.num_heads * d, h), "k_proj.weight": (spec.num_kv_heads * d, h),
        "v_proj.weight": (spec.num_kv_heads * d, h), "o_proj.weight": (h, spec.num_heads * d),
        "q_proj.bias": (spec.num_heads * d,), "k_proj.bias": (spec.num_kv_heads * d,),
        "v_proj.bias": (spec.num_kv_heads * d,), "q_norm.weight": (d,), "k_norm.weight": (d,),
        "gate_proj.weight": (spec.ffn_hidden_size, h), "up_proj.weight": (spec.ffn_hidden_size, h),
        "down_proj.weight": (h, spec.ffn_hidden_size),
    }
    for suffix, shape in table.items():
        if key.endswith(suffix):
            return shape
    if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
        return (h,)
    raise KeyError(key)


# Mixture-of-experts specs (tests/moe): every MoE architecture with the features its mapping
# has (shared experts, MLA, biases, sinks, dense layers), sized so that ``split`` divides every
# split dimension: heads, kv groups, widths, MLA ranks and the expert count.
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                     "DeepseekV3ForCausalLM", "GptOssForCausalLM")


@st.composite
def moe_specs(draw, architecture: str | None = None, split: int = 1) -> ModelSpec:
    from mbridge.specs import MLASpec, MoESpec

    arch = architecture or draw(st.sampled_from(MOE_ARCHITECTURES))
    s = split
    layers = draw(st.integers(1, 3))
    experts = s * draw(st.sampled_from([1, 2, 3]))
    experts += experts == 1  # at least 2
    groups = s * draw(st.sampled_from([1, 2]))
    heads = groups * draw(st.sampled_from([1, 2]))
    dense = tuple(i for i in range(layers) if draw(st.booleans()))
    moe = MoESpec(num_experts=experts, topk=draw(st.integers(1, experts)),
                  ffn_hidden_size=2 * s * draw(st.integers(1, 3)),
                  dense_layers=dense if arch != "MixtralForCausalLM" else ())
    fields: dict = dict(qk_norm=arch == "Qwen3MoeForCausalLM",
                        qkv_bias=arch in ("Qwen2MoeForCausalLM", "GptOssForCausalLM"))
    if arch == "Qwen2MoeForCausalLM":
        moe = moe.replace(shared_ffn_hidden_size=2 * s, shared_gate=True)
    if arch == "GptOssForCausalLM":
        moe = moe.replace(dense_layers=())
        fields.update(linear_bias=True, attention_sinks=True, activation="quick_gelu",
                      glu_linear_offset=1.0, activation_clamp=7.0)
    if arch == "DeepseekV3ForCausalLM":
        moe = moe.replace(shared_ffn_hidden_size=moe.ffn_hidden_size, score="sigmoid",
                          expert_bias=True, dense_layers=tuple(range(len(dense))))
        fields["mla"] = MLASpec(q_lora_rank=draw(st.sampled_from([None, 2 * s])),
                                kv_lora_rank=2 * s, qk_head_dim=2, qk_rope_head_dim=2 * s,
                                v_head_dim=draw(st.sampled_from([2, 4])))
        groups = heads
    return ModelSpec(
        architecture=arch, vocab_size=draw(st.integers(3, 300)), hidden_size=8,
        ffn_hidden_size=4 * s, num_layers=layers, num_heads=heads, num_kv_heads=groups,
        head_dim=fields["mla"].v_head_dim if "mla" in fields else 4,
        tie_embeddings=draw(st.booleans()) if arch != "GptOssForCausalLM" else False,
        moe=moe, **fields)
