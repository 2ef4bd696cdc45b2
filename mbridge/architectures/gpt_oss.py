"""GptOssForCausalLM: biased q/k/v/o, a learnable attention sink per head (Megatron-Core
``softmax_type="learnable"``: ``core_attention.softmax_offset``), sliding-window attention on
the layers ``layer_types`` marks (``window_attn_skip_freq`` as a list), yarn rope, and experts
with biases, a biased router and the clamped SwiGLU ``(clamp(up) + 1) * g * sigmoid(1.702 g)``,
``g = clamp(gate)`` (Megatron-Core ``quick_gelu`` with ``glu_linear_offset=1`` and
``activation_func_clamp_value``).

Checkpoints stack the experts (transformers' GptOssExperts): ``gate_up_proj``
``[experts, hidden, 2 * ffn]`` with gate and up interleaved along the last dim, its bias
``[experts, 2 * ffn]``, ``down_proj`` ``[experts, ffn, hidden]`` and its bias; row ``e``
becomes ``linear_fc1`` ``[2 * ffn, hidden]`` (de-interleaved, transposed) and ``linear_fc2``
``[hidden, ffn]`` (transposed). MXFP4-quantised checkpoints (``*_blocks``/``*_scales``) are
not read: dequantise them first.
"""

from mbridge.architectures import dense, moe
from mbridge.architectures.registry import Architecture, register
from mbridge.keys import MC_EXPERT
from mbridge.mappings.core import chain, rename
from mbridge.sharding.layout import COLUMN, REPLICATED, Layout
from mbridge.specs import MoESpec

QUICK_GELU_ALPHA = 1.702  # megatron/core/fusions/fused_bias_geglu.py quick_gelu
A, M = dense.HF_LAYER + "self_attn.", dense.HF_LAYER + "mlp."


def from_hf_config(cfg):
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        raise NotImplementedError("MXFP4-quantised GPT-OSS checkpoints are not read: "
                                  "dequantise first (transformers Mxfp4Config(dequantize=True), "
                                  "then save_pretrained)")
    if abs(cfg.get("swiglu_alpha", QUICK_GELU_ALPHA) - QUICK_GELU_ALPHA) > 1e-12:
        raise NotImplementedError(f"swiglu_alpha={cfg['swiglu_alpha']}: Megatron-Core's "
                                  f"quick_gelu fixes it at {QUICK_GELU_ALPHA}")
    if not cfg.get("attention_bias", True):
        raise NotImplementedError("GPT-OSS attention_bias=False is not supported: Megatron-"
                                  "Core biases every linear layer or none")
    experts = MoESpec(num_experts=cfg["num_local_experts"], topk=cfg["num_experts_per_tok"],
                      ffn_hidden_size=cfg["intermediate_size"])
    layer_types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    windows = tuple(t == "sliding_attention" for t in layer_types)
    return dense.spec_from_hf(
        {**cfg, "hidden_act": "silu"}, qkv_bias=True, linear_bias=True, attention_sinks=True,
        activation="quick_gelu", glu_linear_offset=1.0, activation_clamp=cfg["swiglu_limit"],
        sliding_window=cfg.get("sliding_window") if any(windows) else None,
        window_layers=windows if any(windows) else None, moe=experts)


def to_hf_config(spec):
    windows = spec.window_layers or (False,) * spec.num_layers
    return dense.spec_to_hf(
        spec, "gpt_oss", attention_bias=True, num_local_experts=spec.moe.num_experts,
        num_experts_per_tok=spec.moe.topk, swiglu_limit=spec.activation_clamp,
        swiglu_alpha=QUICK_GELU_ALPHA, sliding_window=spec.sliding_window or 128,
        layer_types=["sliding_attention" if w else "full_attention" for w in windows])


def attention(spec):
    """Llama attention plus the o bias and the per-head sink logits ``[heads]``."""
    mc = dense.MC_LAYER + "self_attention."
    return chain(dense.attention(spec),
                 rename(A + "o_proj.bias", mc + "linear_proj.bias", REPLICATED),
                 rename(A + "sinks", mc + "core_attention.softmax_offset", COLUMN))


def fc1_from_hf(gate_up):
    """``[hidden, 2 * ffn]`` interleaved -> ``[2 * ffn, hidden]`` as ``[gate; up]``."""
    return moe.deinterleave(gate_up).t().contiguous()


def fc1_to_hf(fc1):
    return moe.interleave(fc1.t())


def transpose(t):
    return t.t().contiguous()


def expert():
    """Template for expert ``{e}``: rows of the stacked tensors. Expert-TP slices HF columns
    of ``gate_up_proj`` contiguously: interleaved pairs keep gate and up rows together."""
    col, row = Layout(dim=1, expert=True), Layout(dim=0, expert=True)
    return chain(
        moe.transform(M + "experts.gate_up_proj[{e}]", MC_EXPERT + "linear_fc1.weight",
                      fc1_from_hf, fc1_to_hf, col, moe.EXPERT_GATED),
        moe.transform(M + "experts.gate_up_proj_bias[{e}]", MC_EXPERT + "linear_fc1.bias",
                      moe.deinterleave, moe.interleave, row, moe.EXPERT_GATED),
        moe.transform(M + "experts.down_proj[{e}]", MC_EXPERT + "linear_fc2.weight",
                      transpose, transpose, row, moe.EXPERT_ROW),
        rename(M + "experts.down_proj_bias[{e}]", MC_EXPERT + "linear_fc2.bias", REPLICATED))


def mapping(spec, multiple=128):
    return moe.mapping(spec, multiple, attention=attention(spec),
                       moe_block=moe.router(M + "router.weight", bias=M + "router.bias"),
                       expert_template=expert())


GPT_OSS = register(Architecture("GptOssForCausalLM", from_hf_config, to_hf_config, mapping,
                                moe.layer_shapes, moe.mcore_config, "gpt_block"))
