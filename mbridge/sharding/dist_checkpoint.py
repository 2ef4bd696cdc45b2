"""Where each mcore tensor sits in a Megatron-Core distributed checkpoint (pure).

What Megatron-Core 0.16's ``GPTModel.sharded_state_dict()`` writes (local and Transformer
Engine layer specs alike), read from megatron/core/transformer/{transformer_block,
transformer_layer}.py and moe/experts.py and checked against live models in tests, so a
checkpoint written this way loads with ``dist_checkpointing.load(model.sharded_state_dict(),
dir)`` at whatever TP/PP/VPP/EP the model was built with:

- Layers are stacked along a leading layer axis (``decoder.layers.<name>``
  ``[num_layers, ...]``, layer ``i`` a ``[1, ...]`` box at offset ``(i, 0, ...)``) when every
  layer has the same structure; with dense and MoE layers mixed (DeepSeek's first layers)
  each layer keeps its own keys (``decoder.layers.{i}.<name>``, no layer axis).
- Experts are stacked along an expert axis after the layer axis:
  ``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`` ``[2f, h]`` is
  index ``(i, e)`` of ``decoder.layers.mlp.experts.experts.linear_fc1.weight``
  ``[L, E, 2f, h]`` (SequentialMLP and TEGroupedMLP write the same).
- Norms take the names Transformer Engine's layer spec gives them (``checkpoint_renames``):
  TE fuses a norm into the linear layer after it where one exists (q/k/v; the dense MLP's
  fc1; MLA's q and kv up-projections) and keeps it separate otherwise (MoE's pre-MLP norm,
  MLA's input norm). mbridge's local layer specs write the same names (shell/model.py), so a
  checkpoint loads with either spec.
- The gated ``linear_fc1`` ``[2 * ffn, hidden]`` is ``[gate; up]`` at every TP: Megatron-Core's
  swiglu ``ShardedTensorFactory`` places each rank's gate and up rows there, as two chunks
  (``pieces``). mbridge writes one chunk per tensor and layer (``to_chunks``); readers
  assemble any chunking, so both load at any layout.
- A vision-language model (Megatron-Core's MIMO structure) holds its GPTModel's tensors
  under ``language_model.`` and its vision tower and projector as they are named
  (``modality_submodules.images...``, replicated, no layer axis).
- ``embedding.word_embeddings.weight``, ``output_layer.weight`` (untied only) and
  ``decoder.final_layernorm.weight`` keep their names and shapes. Vocabulary tensors are
  stored unpadded, ``[vocab_size, hidden]``: Megatron-Core marks them
  ``allow_shape_mismatch``, so loading fills the rows the checkpoint holds and leaves the
  rows it pads for TP at zero, whatever the TP; a checkpoint Megatron-Core saved itself holds
  them padded, and readers take the first ``vocab_size`` rows.
- Each linear layer has an ``_extra_state`` object (``None`` without FP8) named
  ``<module>._extra_state/shard_<offsets>_<sizes>`` (``ShardedObject.unique_key``).

Which tensors a model has and their shapes come from its architecture
(``Architecture.mcore_shapes``); this module only places them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from mbridge import keys
from mbridge.sharding.layout import Layout
from mbridge.specs import ModelSpec, Spec


class Region(Spec, frozen=True, kw_only=True):
    """A box in a global checkpoint tensor: ``key`` of ``global_shape``, the box at
    ``offset`` of ``shape`` (both include the layer and expert axes of stacked tensors)."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]


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
    expert = keys.expert_of(name)
    if expert is not None:
        rest = keys.expert_template(name).split("{e}.", 1)[1]
        return f"mlp.experts.experts.{rest}", expert
    return name, None


def placement(mcore_key: str, spec: ModelSpec) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(checkpoint key, leading offsets, leading sizes)``: the tensor ``mcore_key`` is the
    box at those offsets along the leading (layer and expert) axes of the checkpoint key.
    ``"decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight"`` in a 4-layer,
    8-expert all-MoE model -> ``("decoder.layers.mlp.experts.experts.linear_fc1.weight",
    (2, 5), (4, 8))``."""
    if spec.vision is not None and not keys.is_modality_key(mcore_key):
        # a vision-language model's GPTModel is its ``language_model`` (MIMO's structure)
        key, offsets, sizes = placement(mcore_key, spec.replace(vision=None))
        return keys.LANGUAGE_MODEL + key, offsets, sizes
    found = keys.layer_of(mcore_key)
    if found is None:
        return mcore_key, (), ()
    layer, name = found
    if not 0 <= layer < spec.num_layers:
        raise ValueError(f"{mcore_key}: layer {layer} is outside 0..{spec.num_layers - 1}")
    name, expert = layer_key(spec, layer, name)
    offsets, sizes = ((layer,), (spec.num_layers,)) if homogeneous(spec) else ((), ())
    if expert is not None:
        offsets, sizes = offsets + (expert,), sizes + (spec.moe.num_experts,)
    prefix = "decoder.layers." if homogeneous(spec) else f"decoder.layers.{layer}."
    return prefix + name, offsets, sizes


def checkpoint_key(mcore_key: str, spec: ModelSpec) -> str:
    """``"decoder.layers.3.input_layernorm.weight"`` ->
    ``"decoder.layers.self_attention.linear_qkv.layer_norm_weight"`` (keys outside the
    layers map to themselves)."""
    return placement(mcore_key, spec)[0]


def region(mcore_key: str, shape: tuple[int, ...], spec: ModelSpec) -> Region:
    """The box that mcore tensor ``mcore_key`` of ``shape`` fills in the checkpoint.
    ``("decoder.layers.1.mlp.linear_fc2.weight", (8, 16))`` in a 4-layer model ->
    ``Region(key="decoder.layers.mlp.linear_fc2.weight", global_shape=(4, 8, 16),
    offset=(1, 0, 0), shape=(1, 8, 16))``."""
    shape = tuple(shape)
    key, offsets, sizes = placement(mcore_key, spec)
    return Region(key=key, global_shape=sizes + shape, offset=offsets + (0,) * len(shape),
                  shape=(1,) * len(sizes) + shape)


def pieces(mcore_key: str, shape: tuple[int, ...], layout: Layout,
           spec: ModelSpec) -> tuple[Region, ...]:
    """The chunks Megatron-Core writes for one mcore tensor: its region, split into
    ``layout.parts`` equal parts along the split dim for fused tensors (gated fc1)."""
    whole = region(mcore_key, shape, spec)
    if layout.parts == 1 or layout.dim is None:
        return (whole,)
    axis = layout.dim + len(whole.shape) - len(shape)
    size = whole.shape[axis] // layout.parts
    return tuple(whole.replace(offset=_bump(whole.offset, axis, k * size),
                               shape=_bump(whole.shape, axis, size - whole.shape[axis]))
                 for k in range(layout.parts))


def _bump(values: tuple[int, ...], axis: int, delta: int) -> tuple[int, ...]:
    return tuple(v + delta if a == axis else v for a, v in enumerate(values))


def to_chunks(tree: Mapping[str, torch.Tensor],
              spec: ModelSpec) -> list[tuple[Region, torch.Tensor]]:
    """An mcore tree (global, unpadded tensors) as checkpoint chunks, one per tensor: the
    tensor viewed as its region (``[1, *shape]`` for a layer tensor). One chunk, not
    Megatron-Core's gate/up ``pieces``, so a reader maps it without assembling a copy."""
    out = []
    for key, tensor in tree.items():
        reg = region(key, tuple(tensor.shape), spec)
        out.append((reg, tensor.reshape(reg.shape)))
    return out


def extra_state_key(mcore_key: str, spec: ModelSpec) -> str | None:
    """The ``_extra_state`` object key of the linear layer whose weight is ``mcore_key``, or
    None. ``"decoder.layers.2.mlp.linear_fc2.weight"`` (4 layers) ->
    ``"decoder.layers.mlp.linear_fc2._extra_state/shard_2_4"``."""
    if not mcore_key.endswith(".weight") or keys.layer_of(mcore_key) is None:
        return None
    module = mcore_key[: -len(".weight")]
    if not module.rsplit(".", 1)[-1].startswith("linear_"):
        return None
    key, offsets, sizes = placement(module + ".weight", spec)
    key = key[: -len(".weight")] + "._extra_state"
    offsets, sizes = offsets or (0,), sizes or (1,)
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, sizes))}"


def extra_state_keys(mcore_keys: Iterable[str], spec: ModelSpec) -> tuple[str, ...]:
    """Object keys of the ``_extra_state`` of every linear layer among ``mcore_keys``."""
    found = (extra_state_key(k, spec) for k in mcore_keys)
    return tuple(k for k in found if k is not None)
