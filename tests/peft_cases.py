"""Adapter cases shared by the PEFT tests and their torchrun script: which hook, and how a
test perturbs an exported adapter so that every tensor (DoRA magnitudes included) matters."""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mbridge.peft import CanonicalLoRA, DoRA, LoRA

# B drawn non-zero (xavier) so the adapters change the logits from the first step
HOOKS = {
    "lora": lambda: LoRA(dim=4, alpha=8, lora_B_init_method="xavier"),
    "dora": lambda: DoRA(dim=4, lora_B_init_method="xavier"),
    # per projection, some parts only, layer 1 excluded
    "canonical": lambda: CanonicalLoRA(
        dim=3, alpha=6, lora_B_init_method="xavier",
        target_modules=["linear_q", "linear_v", "linear_fc1_up", "linear_fc2"],
        exclude_modules=["decoder.layers.1.*"]),
}


def _noise(key: str, shape, seed: int) -> torch.Tensor:
    # one draw for the lora_A of every part of a fused linear, so a fused adapter stays one
    shared = re.sub(r"(q|k|v)_proj\.lora_A", "qkv.lora_A", key)
    shared = re.sub(r"(gate|up)_proj\.lora_A", "gate_up.lora_A", shared)
    gen = torch.Generator().manual_seed(seed + zlib.crc32(shared.encode()))
    return torch.randn(shape, generator=gen)


def perturb(src: Path, dst: Path, seed: int = 7) -> None:
    """Copy a peft adapter directory, scaling every tensor by ``1 + 0.2 * noise`` (the
    same noise for the A that the parts of a fused linear share)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tensors = load_file(src / "adapter_model.safetensors")
    out = {k: (v * (1 + 0.2 * _noise(k, v.shape, seed))).contiguous()
           for k, v in sorted(tensors.items())}
    save_file(out, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    json.loads((dst / "adapter_config.json").read_text())  # still peft's config


def same_files(a: Path, b: Path) -> bool:
    """Both adapter files hold the same keys with bit-identical tensors and dtypes."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype
                                        for k in x)


def provide(base: Path, hook=None):
    """(bridge, provider, model) of the HF model at ``base``, with ``hook`` as pre-wrap hook."""
    from mbridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(base)
    provider = bridge.to_megatron_provider()
    provider.finalize()
    return bridge, provider, provider.provide_distributed_model(pre_wrap_hook=hook)


def logits(bridge, provider, model, ids):
    """The model's fp32 logits ``[b, s, vocab]`` at its layout (gathered on every rank)."""
    from mbridge.shell import forward

    return forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                          bridge.spec.hidden_size)
