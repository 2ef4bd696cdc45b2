"""Qwen3MoeForCausalLM: Qwen3 attention (q/k norms), routed experts with a softmax router
(renormalised top-k when ``norm_topk_prob``), dense MLPs on ``mlp_only_layers`` and off the
``decoder_sparse_step``. Hub checkpoints store one tensor per expert; transformers 5 holds
them stacked (``mlp.experts.gate_up_proj``), and either form is read (``hf_options``)."""

from mbridge.architectures import dense, moe
from mbridge.architectures.registry import Architecture, register
from mbridge.specs import MoESpec

M = dense.HF_LAYER + "mlp."


def moe_from_hf(cfg, **extra) -> MoESpec:
    """The Qwen-MoE routing settings (shared by Qwen2-MoE)."""
    step, only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
    dense_layers = tuple(i for i in range(cfg["num_hidden_layers"])
                         if i in only or (i + 1) % step)
    return MoESpec(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                   topk=cfg["num_experts_per_tok"], ffn_hidden_size=cfg["moe_intermediate_size"],
                   pre_softmax=not cfg.get("norm_topk_prob", False), dense_layers=dense_layers,
                   **extra)


def moe_to_hf(spec) -> dict:
    m = spec.moe
    return dict(num_experts=m.num_experts, num_experts_per_tok=m.topk,
                moe_intermediate_size=m.ffn_hidden_size, norm_topk_prob=not m.pre_softmax,
                decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers))


def from_hf_config(cfg):
    if cfg.get("attention_bias"):
        raise NotImplementedError("Qwen3-MoE attention_bias=True is not supported")
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("Qwen3-MoE use_sliding_window=True is not supported")
    return dense.spec_from_hf(cfg, qk_norm=True, moe=moe_from_hf(cfg))


def to_hf_config(spec):
    return dense.spec_to_hf(spec, "qwen3_moe", attention_bias=False, use_sliding_window=False,
                            **moe_to_hf(spec))


def experts(stacked: bool):
    """Expert ``{e}``'s template: per-expert tensors (save_pretrained) or stacked rows."""
    if stacked:
        return moe.stacked_expert(M + "experts.gate_up_proj", M + "experts.down_proj")
    e = M + "experts.{e}."
    return moe.expert(e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight")


def mapping(spec, multiple=128, stacked=False):
    return moe.mapping(spec, multiple, attention=dense.attention(spec),
                       moe_block=moe.router(M + "gate.weight"), expert_template=experts(stacked))


QWEN3_MOE = register(Architecture("Qwen3MoeForCausalLM", from_hf_config, to_hf_config, mapping,
                                  moe.layer_shapes, moe.mcore_config, "gpt_block",
                                  hf_options=moe.is_stacked))
