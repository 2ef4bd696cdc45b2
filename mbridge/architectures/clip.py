"""The CLIP vision tower of LLaVA, kept as Hugging Face's module (pure: names and shapes).

The shell builds ``transformers``' ``CLIPVisionModel`` from the checkpoint's
``vision_config`` and replicates it over tensor-parallel ranks, so its tensors pass through
unchanged: the mapping is a rename under ``keys.MC_VISION`` with replicated layouts, one
group per tower layer (import and export stream them like decoder layers). Names follow
``transformers/models/clip/modeling_clip.py`` (``CLIPVisionTransformer``) as
``save_pretrained`` writes them (``vision_tower.embeddings...``; older files nest them under
``vision_tower.vision_model.``).
"""

from __future__ import annotations

from mbridge.keys import MC_VISION
from mbridge.mappings.core import Mapping, at, chain, rename
from mbridge.specs import VisionSpec

Shapes = dict[str, tuple[int, ...]]

LAYER = "encoder.layers.{i}."


def layer_shapes(vision: VisionSpec) -> Shapes:
    """One encoder layer: q/k/v/out ``[h, h]`` with biases, the MLP ``fc1`` ``[f, h]`` and
    ``fc2`` ``[h, f]`` with biases, two LayerNorms ``[h]`` (weight and bias)."""
    h, f = vision.hidden_size, vision.intermediate_size
    out: Shapes = {}
    for p in ("q", "k", "v", "out"):
        out.update({f"self_attn.{p}_proj.weight": (h, h), f"self_attn.{p}_proj.bias": (h,)})
    out.update({"mlp.fc1.weight": (f, h), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (h, f),
                "mlp.fc2.bias": (h,)})
    for norm in ("layer_norm1", "layer_norm2"):
        out.update({f"{norm}.weight": (h,), f"{norm}.bias": (h,)})
    return out


def embedding_shapes(vision: VisionSpec) -> Shapes:
    """Patch embedding ``[h, channels, patch, patch]`` (no bias), CLS ``[h]``, positions
    ``[patches + 1, h]`` and the pre-encoder LayerNorm (CLIP spells it ``pre_layrnorm``)."""
    h, p = vision.hidden_size, vision.patch_size
    patches = (vision.image_size // p) ** 2
    return {"embeddings.class_embedding": (h,),
            "embeddings.patch_embedding.weight": (h, vision.num_channels, p, p),
            "embeddings.position_embedding.weight": (patches + 1, h),
            "pre_layrnorm.weight": (h,), "pre_layrnorm.bias": (h,)}


def tail_shapes(vision: VisionSpec) -> Shapes:
    h = vision.hidden_size
    return {"post_layernorm.weight": (h,), "post_layernorm.bias": (h,)}


def shapes(vision: VisionSpec) -> Shapes:
    """Every tensor of the tower, by its name inside ``CLIPVisionModel``."""
    out = dict(embedding_shapes(vision))
    for i in range(vision.num_layers):
        out.update({LAYER.format(i=i) + k: v for k, v in layer_shapes(vision).items()})
    out.update(tail_shapes(vision))
    return out


def renames(names, hf_prefix: str, mcore_prefix: str = MC_VISION) -> Mapping:
    """Each of a tower's tensors passed through unchanged (replicated), moved from
    ``hf_prefix`` to ``mcore_prefix``."""
    return chain(*(rename(hf_prefix + k, mcore_prefix + k) for k in names))


def mapping(vision: VisionSpec, hf_prefix: str = "vision_tower.") -> tuple[Mapping, ...]:
    """Groups: embeddings, one per encoder layer, the post-encoder LayerNorm."""
    layer = renames([LAYER + k for k in layer_shapes(vision)], hf_prefix)
    return (renames(embedding_shapes(vision), hf_prefix),
            *(at(layer, i=i) for i in range(vision.num_layers)),
            renames(tail_shapes(vision), hf_prefix))
