"""LlamaForCausalLM (Llama 2, Llama 3/3.1/3.2 including llama3 rope scaling)."""

from mbridge.architectures import dense
from mbridge.architectures.registry import Architecture, register


def from_hf_config(cfg):
    if cfg.get("attention_bias"):
        raise NotImplementedError("attention_bias=True (bias on q/k/v and o) is not supported: "
                                  "Megatron-Core cannot bias o_proj without biasing the MLP")
    return dense.spec_from_hf(cfg)


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "llama", attention_bias=False, mlp_bias=False)


LLAMA = register(Architecture("LlamaForCausalLM", from_hf_config, to_hf_config, dense.mapping,
                              dense.layer_shapes, dense.mcore_config))
