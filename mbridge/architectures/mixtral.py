"""MixtralForCausalLM: Mistral attention (optional sliding window) and routed experts with
a softmax router renormalised over the top-k. Hub checkpoints and ``save_pretrained`` name
them ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up, down); transformers 5 holds them
stacked under ``mlp.experts`` (and the router as ``mlp.gate``), and either form is read."""

from mbridge.architectures import dense, moe
from mbridge.architectures.registry import Architecture, register
from mbridge.specs import MoESpec

SPARSE = dense.HF_LAYER + "block_sparse_moe."
STACKED = dense.HF_LAYER + "mlp."


def from_hf_config(cfg):
    experts = MoESpec(num_experts=cfg["num_local_experts"], topk=cfg["num_experts_per_tok"],
                      ffn_hidden_size=cfg["intermediate_size"])
    return dense.spec_from_hf(cfg, sliding_window=cfg.get("sliding_window"), moe=experts)


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "mixtral", sliding_window=spec.sliding_window,
                            num_local_experts=spec.moe.num_experts,
                            num_experts_per_tok=spec.moe.topk)


def mapping(spec, multiple=128, stacked=False):
    if stacked:
        block = moe.router(STACKED + "gate.weight")
        expert = moe.stacked_expert(STACKED + "experts.gate_up_proj", STACKED + "experts.down_proj")
    else:
        block = moe.router(SPARSE + "gate.weight")
        e = SPARSE + "experts.{e}."
        expert = moe.expert(e + "w1.weight", e + "w3.weight", e + "w2.weight")
    return moe.mapping(spec, multiple, attention=dense.attention(spec), moe_block=block,
                       expert_template=expert)


MIXTRAL = register(Architecture("MixtralForCausalLM", from_hf_config, to_hf_config, mapping,
                                moe.layer_shapes, moe.mcore_config, "gpt_block",
                                hf_options=moe.is_stacked))
