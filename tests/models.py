"""Tiny random HF models of every dense architecture, saved to disk for tests.

Every parameter is drawn at random (norms around 1, biases non-zero), so a mapping that
misplaces a norm or drops a bias changes the logits. Configs use non-default settings where
bugs hide: llama3 rope scaling with unusual factors, GQA and MQA, tied and untied
embeddings, a vocabulary that is not a multiple of 128, head_dim != hidden/heads, a sliding
window shorter than the test sequence; Gemma's soft-caps, per-layer windows and local rope.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5)

CONFIGS = {
    "llama": ("LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=50000.0, factor=4.0, low_freq_factor=2.0,
        high_freq_factor=8.0, original_max_position_embeddings=64))),
    "llama_tied_mqa": ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1,
                                                 rope_parameters=dict(rope_type="linear",
                                                                      rope_theta=10000.0,
                                                                      factor=2.0))),
    "mistral": ("MistralForCausalLM", dict(sliding_window=5, head_dim=16,
                                           rope_parameters=dict(rope_type="default",
                                                                rope_theta=1e6))),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    # soft-caps small enough to bite, a softmax scale of 20 ** -0.5 (not head_dim's), window
    # 4 on layers 0 and 3 of a 12-token sequence, tied embeddings
    "gemma2": ("Gemma2ForCausalLM", dict(
        head_dim=24, query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, sliding_window=4, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=20000.0))),
    # 2:1 local/global, window 5, local rope theta 1e4 and a linear-scaled global rope at
    # 1e6, untied; attn_logit_softcapping set though transformers' Gemma 3 ignores it
    "gemma3": ("Gemma3ForCausalLM", dict(
        head_dim=32, query_pre_attn_scalar=40, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, sliding_window=5, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=1e6, factor=4.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
}


def hf_config(name: str, **overrides):
    from transformers import AutoConfig

    arch, extra = CONFIGS[name]
    kwargs = {**BASE, **extra, **overrides}
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                  "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}[arch]
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [arch]
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if "norm" in name else 0.05)
            p.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def make_hf(name: str, directory: Path, seed: int = 0, dtype=torch.float32, **overrides):
    """Build, randomize and ``save_pretrained`` a tiny model; returns it (eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    randomize(model, seed).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(directory: Path, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                 dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits


def sample_ids(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor,
                dtype=torch.float32) -> torch.Tensor:
    """Logits of Hugging Face peft's ``PeftModel`` on the HF base with the adapter in
    ``adapter_dir`` (fp32 unless ``dtype``, eager attention): the reference for adapted
    Megatron models."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager",
                                                dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(ids).logits
