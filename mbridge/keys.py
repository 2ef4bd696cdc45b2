"""The naming grammar of both sides, in one place (pure, the ground floor).

HF keys follow ``transformers``' decoder models (``model.layers.{i}.``); mcore keys follow
Megatron-Core's local layer spec (``decoder.layers.{i}.``). Everything that reads a layer
index, an expert index or a stacked row out of a key, or turns one naming scheme into
another, uses the functions here rather than spelling the pattern again:

- layers: ``layer_of``/``with_layer`` (``decoder.layers.3.x`` <-> ``(3, "x")``);
- experts: ``expert_of``/``with_expert`` (``mlp.experts.local_experts.5.``);
- Transformer Engine's names for the norms it fuses: ``te_key``/``local_key``;
- TEGroupedMLP's expert names: ``grouped_key``/``sequential_key``;
- rows of stacked HF tensors: ``index_key``/``split_index`` (``name[e]``).
"""

from __future__ import annotations

import re

HF_LAYER = "model.layers.{i}."
MC_LAYER = "decoder.layers.{i}."
MC_EXPERT = MC_LAYER + "mlp.experts.local_experts.{e}."
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# Vision-language models follow Megatron-Core's MIMO structure
# (megatron/core/models/mimo/model/base.py): ``modality_submodules.<modality>.encoders.<name>.``
# and ``...input_projections.<i>.`` beside the ``language_model.`` (a GPTModel). Mappings name
# the language model's tensors as a GPTModel's (no prefix), so every layer rule holds for
# them; ``module_key`` maps a built model's state-dict name to that name.
LANGUAGE_MODEL = "language_model."
MODALITY = "modality_submodules."
MC_ENCODERS = MODALITY + "images.encoders."
MC_VISION = MC_ENCODERS + "clip."
MC_PROJECTOR = MODALITY + "images.input_projections.0."
# Qwen2.5-VL's tower holds its own projection (the patch merger), named under the encoder
MC_QWEN_VISION = MC_ENCODERS + "qwen2_5_vl."
MC_QWEN_MERGER = MC_QWEN_VISION + "merger."

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.?mlp\.experts\.local_experts\.(\d+)\.")


def layer_of(mcore_key: str) -> tuple[int, str] | None:
    """``"decoder.layers.3.mlp.linear_fc2.weight" -> (3, "mlp.linear_fc2.weight")``; None for
    keys outside the decoder layers."""
    match = _LAYER.match(mcore_key)
    return (int(match.group(1)), match.group(2)) if match else None


def with_layer(layer: int, name: str) -> str:
    """Inverse of ``layer_of``: ``(3, "mlp.linear_fc2.weight") -> "decoder.layers.3.mlp..."``"""
    return f"decoder.layers.{layer}.{name}"


def hf_layer_of(hf_key: str) -> int | None:
    """``"model.layers.7.mlp.up_proj.weight" -> 7``; None outside the layers."""
    match = _HF_LAYER.match(hf_key)
    return int(match.group(1)) if match else None


def is_modality_key(mcore_key: str) -> bool:
    """Whether an mcore key names a modality submodule's tensor (a vision tower or projector,
    which live on the first pipeline stage)."""
    return mcore_key.startswith(MODALITY)


def vision_part(mcore_key: str) -> str | None:
    """Which part of a vision-language model an mcore key belongs to: ``"vision_projection"``
    (LLaVA's projector, Qwen2.5-VL's patch merger), ``"vision_model"`` (the rest of a tower),
    or None (the language model)."""
    if mcore_key.startswith((MC_PROJECTOR, MC_QWEN_MERGER)):
        return "vision_projection"
    return "vision_model" if mcore_key.startswith(MC_ENCODERS) else None


def module_key(key: str) -> str:
    """A vision-language model's state-dict name -> its mcore name:
    ``"language_model.decoder.layers.0.x" -> "decoder.layers.0.x"``; others unchanged."""
    return key[len(LANGUAGE_MODEL):] if key.startswith(LANGUAGE_MODEL) else key


def expert_of(key: str) -> int | None:
    """The expert index an mcore key names, or None. ``"...local_experts.5.linear_fc1.weight"
    -> 5``"""
    match = _EXPERT.search(key)
    return int(match.group(1)) if match else None


def with_expert(key: str, expert: int) -> str:
    """``key`` naming expert ``expert`` instead: ``("...local_experts.5.x", 1) ->
    "...local_experts.1.x"``."""
    match = _EXPERT.search(key)
    if not match:
        raise ValueError(f"{key} names no expert")
    return f"{key[:match.start(1)]}{expert}{key[match.end(1):]}"


def expert_template(name: str) -> str:
    """The expert slot written ``{e}``: ``"mlp.experts.local_experts.5.x" ->
    "mlp.experts.local_experts.{e}.x"``."""
    match = _EXPERT.search(name)
    return f"{name[:match.start(1)]}{{e}}{name[match.end(1):]}" if match else name


# Transformer Engine's layer spec fuses the pre-attention and pre-MLP norms into the following
# linear layer (megatron/core/models/gpt/gpt_layer_specs.py), which renames their weights.
_TE_SUFFIXES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_key(key: str) -> str:
    """The Transformer Engine spec's name for a local-spec mcore key:
    ``"decoder.layers.0.input_layernorm.weight"`` ->
    ``"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"``."""
    for local, te in _TE_SUFFIXES.items():
        if key.endswith("." + local) or key == local:
            return key[: -len(local)] + te
    return key


def local_key(key: str) -> str:
    """Inverse of ``te_key``."""
    for local, te in _TE_SUFFIXES.items():
        if key.endswith("." + te) or key == te:
            return key[: -len(te)] + local
    return key


_SEQUENTIAL = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_GROUPED = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def grouped_key(key: str) -> str:
    """SequentialMLP's name -> TEGroupedMLP's:
    ``"...mlp.experts.local_experts.3.linear_fc1.weight" -> "...mlp.experts.linear_fc1.weight3"``"""
    m = _SEQUENTIAL.search(key)
    return f"{key[:m.start()]}.mlp.experts.{m[2]}.{m[3]}{m[1]}" if m else key


def sequential_key(key: str) -> str:
    """Inverse of ``grouped_key``."""
    m = _GROUPED.search(key)
    return f"{key[:m.start()]}.mlp.experts.local_experts.{m[3]}.{m[1]}.{m[2]}" if m else key


_INDEXED = re.compile(r"^(.*)\[(\d+)\]$")


def index_key(key: str, index: int) -> str:
    """Row ``index`` of a stacked HF tensor: ``("x.down_proj", 3) -> "x.down_proj[3]"``"""
    return f"{key}[{index}]"


def split_index(key: str) -> tuple[str, int | None]:
    """Inverse of ``index_key``: ``"x.down_proj[3]" -> ("x.down_proj", 3)``;
    ``"x.weight" -> ("x.weight", None)``."""
    match = _INDEXED.match(key)
    return (match.group(1), int(match.group(2))) if match else (key, None)


# Adapters (LoRA/DoRA). On the mcore side an adapter is a submodule ``adapter`` of the linear
# it adapts; a fused linear adapted per projection holds one adapter per part
# (``linear_qkv.adapter.linear_q.``). On the HF side keys follow peft's saved files
# (``peft/utils/save_and_load.py``: adapter name removed, ``base_model.model.`` in front).
PEFT_PREFIX = "base_model.model."


def adapter_key(module: str, part: str | None, tensor: str) -> str:
    """``("decoder.layers.0.self_attention.linear_qkv", "linear_q", "linear_in.weight") ->
    "decoder.layers.0.self_attention.linear_qkv.adapter.linear_q.linear_in.weight"``; ``part``
    None for an adapter over the whole linear."""
    return f"{module}.adapter.{part + '.' if part else ''}{tensor}"


def peft_key(hf_module: str, tensor: str) -> str:
    """``("model.layers.0.self_attn.q_proj", "lora_A.weight") ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"``"""
    return f"{PEFT_PREFIX}{hf_module}.{tensor}"


def peft_module(key: str) -> tuple[str, str] | None:
    """Inverse of ``peft_key`` for LoRA tensors: ``(hf module, tensor)`` or None.
    ``"base_model.model.m.q_proj.lora_A.weight" -> ("m.q_proj", "lora_A.weight")``"""
    for tensor in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
        if key.startswith(PEFT_PREFIX) and key.endswith("." + tensor):
            return key[len(PEFT_PREFIX):-len(tensor) - 1], tensor
    return None
