"""Qwen2_5_VLForConditionalGeneration: a vision tower with window attention and a patch
merger, in front of a Qwen2 language model with multimodal rope
(``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py``).

As for LLaVA (``architectures/llava.py``), the language model is the text architecture's
own record (Qwen2: q/k/v biases), its HF names moved under this checkpoint's prefix, and the
tower passes through unchanged (``architectures/qwen_vision.py``), named as Megatron-Core's
MIMO modality submodule (``keys.MC_QWEN_VISION``). The merger is part of HF's tower, so
there is no separate projector. What differs is the rope: ``RopeSpec.mrope_section`` makes
the language model rotate by 3-D positions (``rope.mrope_position_ids``).

HF names as ``save_pretrained`` writes them: ``visual.``, ``model.`` (the language model),
``lm_head.weight``; the module's own names (``model.visual.``, ``model.language_model.``)
are read too (``hf_options``). Configs: transformers 5's nested ``text_config``, and older
files whose text settings sit at the top level with ``rope_scaling.type = "mrope"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mbridge.architectures import qwen_vision
from mbridge.architectures.llava import PROJECTOR_ACTS, text_delegate, text_spec
from mbridge.architectures.registry import Architecture, get, register
from mbridge.keys import MC_QWEN_VISION
from mbridge.mappings.core import Mapping, rekey, swap_prefix
from mbridge.specs import ModelSpec, VisionSpec

NAME = "Qwen2_5_VLForConditionalGeneration"
TEXT = "Qwen2ForCausalLM"
VISION_TYPES = ("qwen2_5_vl_vision", "qwen2_5_vl")  # the second: older files
# vision_config fields mbridge reads rather than assume transformers' defaults (a 7B tower)
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                 "spatial_merge_size", "temporal_patch_size", "window_size",
                 "fullatt_block_indexes", "out_hidden_size")
SAVED = dict(vision_prefix="visual.", text_prefix="model.")
MODULE = dict(vision_prefix="model.visual.", text_prefix="model.language_model.")
DEFAULT_MROPE = (16, 24, 24)  # transformers' default when rope settings name none
VISION_ACTS = PROJECTOR_ACTS  # the ACT2FN names LLaVA's projector takes: HF's module runs them


def vision_from_hf(cfg: dict[str, Any], text_hidden: int) -> VisionSpec:
    """The ``VisionSpec`` of a Qwen2.5-VL config; ValueError for a missing or inconsistent
    field, NotImplementedError naming a setting mbridge does not support."""
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise ValueError("config.json has no vision_config object, which "
                         f"{NAME} needs")
    if vision.get("model_type", VISION_TYPES[0]) not in VISION_TYPES:
        raise NotImplementedError(f"vision_config.model_type={vision.get('model_type')!r} is "
                                  f"not supported (supported: {VISION_TYPES[0]})")
    missing = [k for k in VISION_FIELDS if k not in vision]
    if missing:
        raise ValueError(f"vision_config has no {', '.join(missing)}: mbridge reads the "
                         "tower's shape from the config rather than assume transformers' "
                         "defaults")
    act = vision.get("hidden_act", "silu")
    if act not in VISION_ACTS:
        raise NotImplementedError(f"vision_config.hidden_act={act!r} is not supported "
                                  f"(supported: {', '.join(VISION_ACTS)})")
    rope = (vision.get("rope_parameters") or {}).get("rope_type", "axial")
    if rope != "axial":
        raise NotImplementedError(f"vision_config.rope_parameters.rope_type={rope!r} is not "
                                  "supported (the tower's rope is axial)")
    if vision["hidden_size"] % vision["num_heads"]:
        raise ValueError(f"vision_config.hidden_size={vision['hidden_size']} is not divisible "
                         f"by num_heads={vision['num_heads']}")
    if vision["out_hidden_size"] != text_hidden:
        raise ValueError(f"vision_config.out_hidden_size={vision['out_hidden_size']} must equal "
                         f"the language model's hidden_size={text_hidden}: the merger's "
                         "features replace token embeddings")
    return VisionSpec(
        tower="qwen2_5_vl", tower_config=json.dumps(vision, sort_keys=True),
        hidden_size=vision["hidden_size"], num_layers=vision["depth"],
        intermediate_size=vision["intermediate_size"], patch_size=vision["patch_size"],
        num_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        spatial_merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        out_hidden_size=vision["out_hidden_size"], window_size=vision["window_size"],
        full_attention_layers=tuple(vision["fullatt_block_indexes"]),
        image_token_id=cfg.get("image_token_id", 151655), text_architecture=TEXT)


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings as a Qwen2 config: ``text_config`` (or the top level of
    older files), ``mrope`` rope read as default rope, ``mrope_section`` left out."""
    text = dict(cfg["text_config"]) if "text_config" in cfg else {
        k: v for k, v in cfg.items() if k != "vision_config"}
    params = dict(text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {})
    text.pop("rope_scaling", None)
    params.pop("mrope_section", None)
    if params.get("rope_type", params.get("type")) == "mrope":
        params.pop("type", None)
        params["rope_type"] = "default"
    if "rope_theta" in text:
        params.setdefault("rope_theta", text.pop("rope_theta"))
    params.setdefault("rope_theta", 1000000.0)  # Qwen2_5_VLTextConfig.default_theta
    text.pop("head_dim", None)  # the HF attention uses hidden_size // heads
    tie = cfg.get("tie_word_embeddings") or text.get("tie_word_embeddings", False)
    return {**text, "rope_parameters": params, "tie_word_embeddings": tie,
            "architectures": [TEXT]}


def mrope_section(cfg: dict[str, Any]) -> tuple[int, ...]:
    text = cfg.get("text_config", cfg)
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return tuple(params.get("mrope_section", DEFAULT_MROPE))


def from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    spec = get(TEXT).from_hf_config(text_config(cfg))
    section = mrope_section(cfg)
    if sum(section) != spec.head_dim // 2:
        raise ValueError(f"mrope_section={list(section)} sums to {sum(section)}; it must sum "
                         f"to head_dim / 2 = {spec.head_dim // 2}")
    vision = vision_from_hf(cfg, spec.hidden_size)
    if not 0 <= vision.image_token_id < spec.vocab_size:
        raise ValueError(f"image_token_id={vision.image_token_id} is outside the text "
                         f"vocabulary (vocab_size={spec.vocab_size})")
    return spec.replace(architecture=NAME, vision=vision,
                        rope=spec.rope.replace(mrope_section=section))


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    v = spec.vision
    text = get(TEXT).to_hf_config(text_spec(spec))
    for k in ("architectures", "use_sliding_window", "head_dim"):
        text.pop(k, None)
    text["rope_parameters"]["mrope_section"] = list(spec.rope.mrope_section)
    return dict(architectures=[NAME], model_type="qwen2_5_vl",
                text_config={**text, "model_type": "qwen2_5_vl_text"},
                vision_config=json.loads(v.tower_config), image_token_id=v.image_token_id,
                tie_word_embeddings=spec.tie_embeddings)


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensors outside the language model: the tower, merger included."""
    return {MC_QWEN_VISION + k: s for k, s in qwen_vision.shapes(spec.vision).items()}


def mapping(spec: ModelSpec, multiple: int = 128, *,
            vision_prefix: str = SAVED["vision_prefix"],
            text_prefix: str = SAVED["text_prefix"]) -> tuple[Mapping, ...]:
    """Groups: the tower's (patch embedding, blocks, merger), then the language model's
    (embedding, layers, tail) under this checkpoint's names."""
    text = get(TEXT).mapping(text_spec(spec), multiple)
    if text_prefix != "model.":
        text = tuple(rekey(g, hf=swap_prefix("model.", text_prefix)) for g in text)
    return (*qwen_vision.mapping(spec.vision, vision_prefix), *text)


def hf_options(hf_keys: Iterable[str]) -> dict[str, str]:
    """The names a checkpoint uses (``SAVED`` or ``MODULE``)."""
    module = any(k.startswith(MODULE["text_prefix"]) for k in hf_keys)
    return dict(MODULE if module else SAVED)


QWEN2_5_VL = register(Architecture(NAME, from_hf_config, to_hf_config, mapping,
                                   text_delegate("layer_shapes"), text_delegate("mcore_config"),
                                   hf_options=hf_options, module_shapes=module_shapes))
