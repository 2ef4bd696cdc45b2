"""Where the tensors of MoE and multi-latent-attention models sit in a Megatron-Core
distributed checkpoint (pure; ``mbridge.sharding.dist_checkpoint`` holds the dense rules).

What Megatron-Core 0.16's ``sharded_state_dict()`` writes, read from
megatron/core/transformer/{transformer_block,transformer_layer}.py and moe/experts.py and
checked against live models in tests/moe:

- Layers are stacked along a leading layer axis (``decoder.layers.<name>``
  ``[num_layers, ...]``) when every layer has the same structure (``moe_layer_freq`` an int);
  with dense and MoE layers mixed (DeepSeek's first layers) each layer keeps its own keys
  (``decoder.layers.{i}.<name>``, no layer axis).
- Experts are stacked along an expert axis after the layer axis:
  ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`` ``[2f, h]`` is
  index ``(i, e)`` of ``decoder.layers.mlp.experts.experts.linear_fc1.weight``
  ``[L, E, 2f, h]`` (SequentialMLP and TEGroupedMLP write the same), gated fc1 in two parts.
- Norms take the names Transformer Engine's layer spec gives them (``checkpoint_renames``):
  TE fuses a norm into the linear layer after it where one exists (q/k/v; the dense MLP's
  fc1; MLA's q and kv up-projections) and keeps it separate otherwise (MoE's pre-MLP norm,
  MLA's input norm). mbridge's local layer specs write the same names (shell/model.py), so a
  checkpoint loads with either spec.
"""

from __future__ import annotations

import re

from mbridge.specs import ModelSpec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def checkpoint_renames(moe_layer: bool, mla: bool) -> dict[str, str]:
    """Prefix renames, local-spec name -> checkpoint name, inside one decoder layer."""
    renames = {}
    if mla:
        renames["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        renames["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    else:
        renames["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    if not moe_layer:
        renames["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return renames


def homogeneous(spec: ModelSpec) -> bool:
    """Whether the checkpoint stacks layers (every layer built from the same spec)."""
    return spec.moe is None or not spec.moe.dense_layers


def layer_key(spec: ModelSpec, layer: int, name: str) -> tuple[str, int | None]:
    """``(checkpoint name within the layers, expert index or None)`` for a layer tensor
    ``name`` (local spec, global expert index). ``(qwen3_moe, 0, "mlp.experts.local_experts.5.
    linear_fc2.weight") -> ("mlp.experts.experts.linear_fc2.weight", 5)``"""
    moe_layer = spec.moe is not None and spec.moe.is_moe_layer(layer)
    for old, new in checkpoint_renames(moe_layer, spec.mla is not None).items():
        if name.startswith(old):
            return new + name[len(old):], None
    match = _EXPERT.match(name)
    if match:
        return f"mlp.experts.experts.{match.group(2)}", int(match.group(1))
    return name, None


def placement(mcore_key: str, spec: ModelSpec) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(checkpoint key, leading offsets, leading sizes)``: the tensor ``mcore_key`` is the
    box at those offsets along the leading (layer and expert) axes of the checkpoint key.
    ``"decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight"`` in a 4-layer,
    8-expert all-MoE model -> ``("decoder.layers.mlp.experts.experts.linear_fc1.weight",
    (2, 5), (4, 8))``."""
    match = _LAYER.match(mcore_key)
    if not match:
        return mcore_key, (), ()
    layer = int(match.group(1))
    if not 0 <= layer < spec.num_layers:
        raise ValueError(f"{mcore_key}: layer {layer} is outside 0..{spec.num_layers - 1}")
    name, expert = layer_key(spec, layer, match.group(2))
    offsets, sizes = ((layer,), (spec.num_layers,)) if homogeneous(spec) else ((), ())
    if expert is not None:
        offsets, sizes = offsets + (expert,), sizes + (spec.moe.num_experts,)
    prefix = "decoder.layers." if homogeneous(spec) else f"decoder.layers.{layer}."
    return prefix + name, offsets, sizes
