"""Qwen3ForCausalLM: Llama layout with RMS norms on q and k per head; head_dim is free."""

from mbridge.architectures import dense
from mbridge.architectures.registry import Architecture, register


def from_hf_config(cfg):
    if cfg.get("attention_bias"):
        raise NotImplementedError("Qwen3 attention_bias=True is not supported")
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("Qwen3 use_sliding_window=True is not supported")
    return dense.spec_from_hf(cfg, qk_norm=True)


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "qwen3", attention_bias=False, use_sliding_window=False)


QWEN3 = register(Architecture("Qwen3ForCausalLM", from_hf_config, to_hf_config, dense.mapping,
                              dense.layer_shapes, dense.mcore_config))
