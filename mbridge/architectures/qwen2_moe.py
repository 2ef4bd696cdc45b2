"""Qwen2MoeForCausalLM: Qwen2 attention (q/k/v biases), Qwen-MoE routing, and a shared expert
whose output a sigmoid gate ``shared_expert_gate`` ``[1, hidden]`` scales (Megatron-Core's
``moe_shared_expert_gate``). Experts per tensor or stacked, as for Qwen3-MoE."""

from mbridge.architectures import dense, moe
from mbridge.architectures.qwen3_moe import M, experts, moe_from_hf, moe_to_hf
from mbridge.architectures.registry import Architecture, register
from mbridge.mappings.core import chain


def from_hf_config(cfg):
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("Qwen2-MoE use_sliding_window=True is not supported")
    shared = cfg.get("shared_expert_intermediate_size") or None
    return dense.spec_from_hf(cfg, qkv_bias=bool(cfg.get("qkv_bias", True)),
                              moe=moe_from_hf(cfg, shared_ffn_hidden_size=shared,
                                              shared_gate=shared is not None))


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "qwen2_moe", qkv_bias=spec.qkv_bias, use_sliding_window=False,
                            shared_expert_intermediate_size=spec.moe.shared_ffn_hidden_size or 0,
                            **moe_to_hf(spec))


def mapping(spec, multiple=128, stacked=False):
    block = [moe.router(M + "gate.weight")]
    if spec.moe.shared_ffn_hidden_size:
        block.append(moe.shared_expert(M + "shared_expert", M + "shared_expert_gate.weight"))
    return moe.mapping(spec, multiple, attention=dense.attention(spec),
                       moe_block=chain(*block), expert_template=experts(stacked))


QWEN2_MOE = register(Architecture("Qwen2MoeForCausalLM", from_hf_config, to_hf_config, mapping,
                                  moe.layer_shapes, moe.mcore_config, "gpt_block",
                                  hf_options=moe.is_stacked))
