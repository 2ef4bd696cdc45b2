"""The vision tower of Qwen2.5-VL, kept as Hugging Face's module (pure: names and shapes).

The shell builds ``transformers``' ``Qwen2_5_VisionTransformerPretrainedModel`` (patch
embedding, window-attention blocks, the patch merger that projects into the language
model's width) from the checkpoint's ``vision_config`` and replicates it over
tensor-parallel ranks, so its tensors pass through unchanged: a rename under
``keys.MC_QWEN_VISION`` with replicated layouts, one group per block. Names follow
``transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py`` as ``save_pretrained`` writes
them (``visual.patch_embed...``; the module's own names put ``model.`` in front).
"""

from __future__ import annotations

from mbridge.architectures.clip import Shapes, renames
from mbridge.keys import MC_QWEN_VISION
from mbridge.mappings.core import Mapping, at
from mbridge.specs import VisionSpec

BLOCK = "blocks.{i}."


def block_shapes(vision: VisionSpec) -> Shapes:
    """One block: RMSNorms ``norm1``/``norm2`` ``[h]``, fused ``attn.qkv`` ``[3h, h]`` and
    ``attn.proj`` ``[h, h]`` with biases, the gated MLP ``gate_proj``/``up_proj`` ``[f, h]``
    and ``down_proj`` ``[h, f]`` with biases."""
    h, f = vision.hidden_size, vision.intermediate_size
    return {"norm1.weight": (h,), "norm2.weight": (h,),
            "attn.qkv.weight": (3 * h, h), "attn.qkv.bias": (3 * h,),
            "attn.proj.weight": (h, h), "attn.proj.bias": (h,),
            "mlp.gate_proj.weight": (f, h), "mlp.gate_proj.bias": (f,),
            "mlp.up_proj.weight": (f, h), "mlp.up_proj.bias": (f,),
            "mlp.down_proj.weight": (h, f), "mlp.down_proj.bias": (h,)}


def embedding_shapes(vision: VisionSpec) -> Shapes:
    """The patch embedding, a Conv3d without bias ``[h, channels, temporal, patch, patch]``."""
    p = vision.patch_size
    return {"patch_embed.proj.weight": (vision.hidden_size, vision.num_channels,
                                        vision.temporal_patch_size, p, p)}


def merger_shapes(vision: VisionSpec) -> Shapes:
    """The patch merger: RMSNorm ``ln_q`` ``[h]``, then ``mlp.0`` ``[h m^2, h m^2]`` and
    ``mlp.2`` ``[out, h m^2]`` with biases (``m = spatial_merge_size``)."""
    h, wide = vision.hidden_size, vision.hidden_size * vision.spatial_merge_size ** 2
    out = vision.out_hidden_size
    return {"merger.ln_q.weight": (h,), "merger.mlp.0.weight": (wide, wide),
            "merger.mlp.0.bias": (wide,), "merger.mlp.2.weight": (out, wide),
            "merger.mlp.2.bias": (out,)}


def shapes(vision: VisionSpec) -> Shapes:
    """Every tensor of the tower, by its name inside the HF module."""
    out = dict(embedding_shapes(vision))
    for i in range(vision.num_layers):
        out.update({BLOCK.format(i=i) + k: v for k, v in block_shapes(vision).items()})
    out.update(merger_shapes(vision))
    return out


def mapping(vision: VisionSpec, hf_prefix: str = "visual.") -> tuple[Mapping, ...]:
    """Groups: the patch embedding, one per block, the merger."""
    block = renames([BLOCK + k for k in block_shapes(vision)], hf_prefix, MC_QWEN_VISION)
    return (renames(embedding_shapes(vision), hf_prefix, MC_QWEN_VISION),
            *(at(block, i=i) for i in range(vision.num_layers)),
            renames(merger_shapes(vision), hf_prefix, MC_QWEN_VISION))
