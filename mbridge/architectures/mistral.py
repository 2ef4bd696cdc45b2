"""MistralForCausalLM: Llama layout plus an optional sliding attention window."""

from mbridge.architectures import dense
from mbridge.architectures.registry import Architecture, register


def from_hf_config(cfg):
    return dense.spec_from_hf(cfg, sliding_window=cfg.get("sliding_window"))


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "mistral", sliding_window=spec.sliding_window)


MISTRAL = register(Architecture("MistralForCausalLM", from_hf_config, to_hf_config, dense.mapping,
                                dense.layer_shapes, dense.mcore_config))
