"""Tiny random HF mixture-of-experts models of every MoE architecture, saved to disk.

Settings that hide bugs: a dense layer among MoE layers (Qwen ``mlp_only_layers``,
DeepSeek ``first_k_dense_replace``), renormalised and plain top-k, a shared expert with its
gate, grouped sigmoid routing with a non-zero score-correction bias, a low-rank MLA query
and yarn rope, GPT-OSS sinks, biases, alternating sliding windows shorter than the test
sequence and yarn. Parameters are random around sensible values (norms near 1, router and
bias noise large enough that routing differs per token). ``save_stacked`` writes the
transformers-5 module layout (experts stacked in 3-D tensors) that some tools save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMON = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=False)

CONFIGS = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        mlp_only_layers=[1], rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe", dict(
        num_hidden_layers=4, num_key_value_heads=2, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False)),
    "mixtral": ("MixtralForCausalLM", "mixtral", dict(
        num_hidden_layers=4, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=7)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        num_hidden_layers=4, num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-6,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                             original_max_position_embeddings=128, mscale=0.7,
                             mscale_all_dim=0.7, beta_fast=32, beta_slow=1))),
    "gpt_oss": ("GptOssForCausalLM", "gpt_oss", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * 2, swiglu_limit=1.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=1.5e5, factor=8.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=64))),
}


def hf_config(name: str, **overrides):
    from transformers import AutoConfig

    arch, model_type, extra = CONFIGS[name]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    cfg.architectures = [arch]
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norms ~1, everything else ~N(0, 0.05); routers, router biases and sinks wider so that
    routing and sinks matter; buffers (score-correction bias) random too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            wide = any(s in name for s in ("gate.", "router.", "sinks", "e_score"))
            noise = torch.randn(p.shape, generator=gen) * (0.5 if wide else 0.05)
            p.copy_(noise + (1.0 if "norm" in name and "sinks" not in name else 0.0))
    return model


def make_hf(name: str, directory: Path, seed: int = 0, **overrides):
    """Build, randomize and ``save_pretrained`` a tiny model (fp32, eager); returns it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides),
                                             attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed).eval()
    model.save_pretrained(directory)
    return model


def save_stacked(model, directory: Path) -> None:
    """Write the module's own state dict (experts stacked, transformers 5 names) and the
    config: the stacked form of an HF checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
