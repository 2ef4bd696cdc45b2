"""The Hugging Face peft references for adapters on mixture-of-experts experts (Qwen3-MoE,
Qwen2-MoE).

transformers 5 stacks a layer's experts in two 3-D parameters (``mlp.experts.gate_up_proj``
``[experts, 2 * ffn, hidden]``, ``down_proj``); peft 0.21 adapts those only as
``target_parameters`` (``lora.ParamWrapper``: LoRA, no DoRA), and loads the per-expert adapter
files of transformers 4 (``model.layers.{i}.mlp.experts.{e}.gate_proj.lora_A.weight``, the
format mbridge writes) by converting them into that form. Two references, both peft's own
code on the HF base:

- ``peft_logits`` (tests/models.py): stock ``PeftModel.from_pretrained`` on the stacked
  transformers 5 model, converting the per-expert file (LoRA only);
- ``unfused_peft_logits``: the same HF model with each layer's experts as transformers 4's
  per-expert ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` modules (``Unfused``, the
  stacked experts' exact forward), where peft puts its ordinary ``lora.Linear`` (and
  DoRA) layers. ``peft_made`` builds an adapter with peft there (peft's own initialisation
  and files).
"""

from __future__ import annotations

from pathlib import Path

import torch
from moe.moe_models import make_hf

# a dense layer (1) among MoE layers; 4 experts keep the CPU runs short
MOE_OVERRIDES = dict(num_experts=4, mlp_only_layers=[1], num_hidden_layers=3)


def make_moe(directory: Path, name: str = "qwen3_moe", **overrides) -> Path:
    """A tiny ``qwen3_moe`` (or ``qwen2_moe``: a shared expert with its gate) saved to
    ``directory`` (``moe/moe_models.py``, with ``MOE_OVERRIDES``)."""
    make_hf(name, directory, **{**MOE_OVERRIDES, **overrides})
    return directory


class Unfused(torch.nn.ModuleList):
    """transformers 4's Qwen2/Qwen3-MoE experts: one ``Qwen3MoeMLP`` (``Qwen2MoeMLP``) per
    expert, holding a copy of the stacked weights; ``forward`` as ``Qwen3MoeExperts.forward``
    (each token's top-k experts, weighted, summed)."""

    def __init__(self, stacked, config):
        import sys

        mlp_class = getattr(sys.modules[type(stacked).__module__],
                            type(stacked).__name__.replace("Experts", "MLP"))
        super().__init__()
        for e in range(stacked.num_experts):
            mlp = mlp_class(config, intermediate_size=stacked.intermediate_dim)
            gate, up = stacked.gate_up_proj.data[e].chunk(2, 0)
            with torch.no_grad():
                mlp.gate_proj.weight.copy_(gate)
                mlp.up_proj.weight.copy_(up)
                mlp.down_proj.weight.copy_(stacked.down_proj.data[e])
            self.append(mlp)

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel():
                out.index_add_(0, token, expert(hidden[token]) * top_k_weights[token, slot, None])
        return out


def unfused(base: Path):
    """The HF model at ``base`` with unfused experts (fp32, eager). Its ``model_type`` is
    renamed so that peft does not convert adapters for the stacked form it no longer has."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager",
                                                 dtype=torch.float32)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = Unfused(layer.mlp.experts, model.config)
    model.config.model_type += "_unfused"
    return model.eval()


def unfused_peft_logits(base: Path, adapter: Path, ids: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """peft's logits on the unfused model; ``float64``: computed in double precision (the
    exact answer the float32 results approximate)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(unfused(base), adapter).to(dtype).eval()
    with torch.no_grad():
        return model(ids).logits


def peft_made(base: Path, out: Path, dora: bool, seed: int = 3) -> Path:
    """An adapter peft makes on the unfused model (``init_lora_weights=False``: random A and
    B; DoRA's magnitudes moved off the row norms), saved with peft's ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, use_dora=dora, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    model = get_peft_model(unfused(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out
