"""LlavaForConditionalGeneration: a CLIP vision tower, a two-layer MLP projector and a
Llama or Mistral language model (``transformers/models/llava/modeling_llava.py``).

The language model is the text architecture's own record (same mapping, shapes and
Megatron-Core config, the HF names moved under LLaVA's prefixes); the tower and projector
pass through unchanged (``architectures/clip.py``), named as Megatron-Core's MIMO modality
submodules (``keys.MC_VISION``, ``keys.MC_PROJECTOR``). What a ``ModelSpec`` says about the
vision side is its ``VisionSpec``.

HF names as ``save_pretrained`` writes them: ``vision_tower.``, ``multi_modal_projector.``,
``language_model.model.``, ``language_model.lm_head.weight``; the module's own names
(``model.vision_tower.``, ``model.language_model.``, ``lm_head.weight``) and the older
``vision_tower.vision_model.`` are read too (``hf_options``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mbridge.architectures import clip
from mbridge.architectures.registry import Architecture, get, register
from mbridge.keys import MC_PROJECTOR, MC_VISION
from mbridge.mappings.core import Mapping, chain, rekey, rename, swap_prefix
from mbridge.specs import ModelSpec, VisionSpec

NAME = "LlavaForConditionalGeneration"
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
VISION_TOWERS = {"clip_vision_model": "clip"}
# activations of ``transformers.activations.ACT2FN`` the projector may name (the module is
# HF's own, so any of them computes exactly as HF does)
PROJECTOR_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
SELECT_STRATEGIES = ("default", "full")
# save_pretrained's names (the defaults), and the alternatives a checkpoint may use
SAVED = dict(vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.",
             text_prefix="language_model.model.", head="language_model.lm_head.weight")
MODULE = dict(vision_prefix="model.vision_tower.", projector_prefix="model.multi_modal_projector.",
              text_prefix="model.language_model.", head="lm_head.weight")


def vision_from_hf(cfg: dict[str, Any], text_architecture: str) -> VisionSpec:
    """The ``VisionSpec`` of a LLaVA config; NotImplementedError naming a setting mbridge
    does not support."""
    vision = cfg["vision_config"]
    if vision.get("model_type") not in VISION_TOWERS:
        raise NotImplementedError(
            f"vision_config.model_type={vision.get('model_type')!r} is not supported "
            f"(supported: {', '.join(VISION_TOWERS)})")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise NotImplementedError(f"vision_feature_select_strategy={strategy!r} is not "
                                  f"supported (supported: {', '.join(SELECT_STRATEGIES)})")
    act = cfg.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTS:
        raise NotImplementedError(f"projector_hidden_act={act!r} is not supported "
                                  f"(supported: {', '.join(PROJECTOR_ACTS)})")
    layers = cfg.get("vision_feature_layer", -2)
    return VisionSpec(
        tower=VISION_TOWERS[vision["model_type"]],
        tower_config=json.dumps(vision, sort_keys=True),
        hidden_size=vision["hidden_size"], num_layers=vision["num_hidden_layers"],
        intermediate_size=vision["intermediate_size"], image_size=vision["image_size"],
        patch_size=vision["patch_size"], num_channels=vision.get("num_channels", 3),
        feature_layers=tuple(layers) if isinstance(layers, list) else (layers,),
        select_strategy=strategy, projector_act=act,
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        text_architecture=text_architecture)


def from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    text = dict(cfg["text_config"])
    kind = text.get("model_type", "llama")
    if kind not in TEXT_ARCHITECTURES:
        raise NotImplementedError(f"text_config.model_type={kind!r} is not supported "
                                  f"(supported: {', '.join(TEXT_ARCHITECTURES)})")
    name = TEXT_ARCHITECTURES[kind]
    spec = get(name).from_hf_config({**text, "architectures": [name]})
    vision = vision_from_hf(cfg, name)
    if not 0 <= vision.image_token_id < spec.vocab_size:
        raise ValueError(f"image_token_index={vision.image_token_id} is outside the text "
                         f"vocabulary (vocab_size={spec.vocab_size})")
    return spec.replace(architecture=NAME, vision=vision)


def text_spec(spec: ModelSpec) -> ModelSpec:
    """The language model's own spec (its architecture, no vision)."""
    return spec.replace(architecture=spec.vision.text_architecture, vision=None)


def to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    v = spec.vision
    text = get(v.text_architecture).to_hf_config(text_spec(spec))
    text.pop("architectures", None)
    layers = v.feature_layers[0] if len(v.feature_layers) == 1 else list(v.feature_layers)
    return dict(architectures=[NAME], model_type="llava", text_config=text,
                vision_config=json.loads(v.tower_config), image_token_index=v.image_token_id,
                projector_hidden_act=v.projector_act, multimodal_projector_bias=v.projector_bias,
                vision_feature_layer=layers, vision_feature_select_strategy=v.select_strategy,
                tie_word_embeddings=spec.tie_embeddings)


def projector_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """``linear_1`` ``[text hidden, layers * vision hidden]``, ``linear_2`` ``[text hidden,
    text hidden]``, each with a bias unless ``multimodal_projector_bias`` is false."""
    v, h = spec.vision, spec.hidden_size
    out = {"linear_1.weight": (h, len(v.feature_layers) * v.hidden_size),
           "linear_2.weight": (h, h)}
    if v.projector_bias:
        out.update({"linear_1.bias": (h,), "linear_2.bias": (h,)})
    return out


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensors outside the language model: the tower and the projector."""
    out = {MC_VISION + k: v for k, v in clip.shapes(spec.vision).items()}
    out.update({MC_PROJECTOR + k: v for k, v in projector_shapes(spec).items()})
    return out


def mapping(spec: ModelSpec, multiple: int = 128, *, vision_prefix: str = SAVED["vision_prefix"],
            projector_prefix: str = SAVED["projector_prefix"],
            text_prefix: str = SAVED["text_prefix"],
            head: str = SAVED["head"]) -> tuple[Mapping, ...]:
    """Groups: the tower's (embeddings, layers, post-norm), the projector, then the language
    model's (embedding, layers, tail) under LLaVA's names."""
    projector = chain(*(rename(projector_prefix + k, MC_PROJECTOR + k)
                        for k in projector_shapes(spec)))
    text = get(spec.vision.text_architecture).mapping(text_spec(spec), multiple)
    moved = swap_prefix("model.", text_prefix)
    text = tuple(rekey(g, hf=lambda k: head if k == "lm_head.weight" else moved(k))
                 for g in text)
    return (*clip.mapping(spec.vision, vision_prefix), projector, *text)


def hf_options(hf_keys: Iterable[str]) -> dict[str, str]:
    """The names a checkpoint uses (``SAVED`` or ``MODULE``; a tower nested under
    ``vision_model.`` as older files write it)."""
    names = list(hf_keys)
    module = any(k.startswith(MODULE["text_prefix"]) for k in names)
    out = dict(MODULE if module else SAVED)
    nested = out["vision_prefix"] + "vision_model."
    if any(k.startswith(nested) for k in names):
        out["vision_prefix"] = nested
    return out


def text_delegate(method: str):
    """The text architecture's own ``method``, called on the language model's spec."""
    def delegate(spec: ModelSpec, *args):
        return getattr(get(spec.vision.text_architecture), method)(text_spec(spec), *args)
    return delegate


LLAVA = register(Architecture(NAME, from_hf_config, to_hf_config, mapping,
                              text_delegate("layer_shapes"), text_delegate("mcore_config"),
                              hf_options=hf_options, module_shapes=module_shapes))
