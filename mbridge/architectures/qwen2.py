"""Qwen2ForCausalLM: Llama layout with biases on q, k and v."""

from mbridge.architectures import dense
from mbridge.architectures.registry import Architecture, register


def from_hf_config(cfg):
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 use_sliding_window=True is not supported")
    return dense.spec_from_hf(cfg, qkv_bias=True)


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "qwen2", use_sliding_window=False)


QWEN2 = register(Architecture("Qwen2ForCausalLM", from_hf_config, to_hf_config, dense.mapping,
                              dense.layer_shapes, dense.mcore_config))
