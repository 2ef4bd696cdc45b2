"""Where each mcore tensor sits in a Megatron-Core distributed checkpoint (pure).

Megatron-Core 0.16's ``GPTModel.sharded_state_dict()`` (local and Transformer Engine layer
specs alike) places a dense decoder's tensors like this, at any TP/PP/VPP, so a checkpoint
written this way loads with ``dist_checkpointing.load(model.sharded_state_dict(), dir)``
at whatever layout the model was built with:

- Layer tensors are stacked along a leading layer axis. ``decoder.layers.{i}.<name>``
  ``[*shape]`` is index ``i`` of ``decoder.layers.<name>`` ``[num_layers, *shape]``, stored
  as a ``[1, *shape]`` chunk at offset ``(i, 0, ...)``. The two norms take Transformer
  Engine's names (``core.te_key``): ``input_layernorm.weight`` is
  ``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight`` is
  ``mlp.linear_fc1.layer_norm_weight``.
- The gated ``linear_fc1`` ``[2 * ffn, hidden]`` is ``[gate; up]`` at every TP: Megatron-Core's
  swiglu ``ShardedTensorFactory`` places each rank's gate and up rows there, as two chunks
  (``pieces``). mbridge writes one chunk per tensor and layer (``to_chunks``); readers
  assemble any chunking (``torch.distributed.checkpoint`` reads the chunks that overlap what
  is asked), so both load at any layout.
- ``embedding.word_embeddings.weight``, ``output_layer.weight`` (untied only) and
  ``decoder.final_layernorm.weight`` keep their names and shapes. Vocabulary tensors are
  stored unpadded, ``[vocab_size, hidden]``: Megatron-Core marks them
  ``allow_shape_mismatch``, so loading fills the rows the checkpoint holds and leaves the
  rows it pads for TP at zero, whatever the TP; a checkpoint Megatron-Core saved itself holds
  them padded, and readers take the first ``vocab_size`` rows.
- Each linear layer of each decoder layer has an ``_extra_state`` object (``None`` without
  FP8) named ``decoder.layers.<module>._extra_state/shard_{i}_{num_layers}``.

Mixture-of-experts, multi-latent-attention and GPT-OSS models (their tensors, expert axes,
per-layer keys for mixed dense/MoE layers) follow ``mbridge.sharding.moe_checkpoint``:
pass ``spec=`` to the functions below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from mbridge.mappings.core import te_key
from mbridge.sharding import moe_checkpoint
from mbridge.sharding.layout import Layout
from mbridge.specs import ModelSpec, Spec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class Region(Spec, frozen=True, kw_only=True):
    """A box in a global checkpoint tensor: ``key`` of ``global_shape``, the box at
    ``offset`` of ``shape`` (both include the layer axis for stacked layer tensors)."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def checkpoint_key(mcore_key: str, spec: ModelSpec | None = None) -> tuple[str, int | None]:
    """``"decoder.layers.3.input_layernorm.weight"`` ->
    ``("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)``; keys outside the
    layers map to themselves with layer ``None``. With ``spec`` (MoE, MLA, GPT-OSS models)
    the key follows ``moe_checkpoint``."""
    if spec is not None and moe_checkpoint.applies(spec):
        key = moe_checkpoint.placement(mcore_key, spec)[0]
        match = _LAYER.match(mcore_key)
        return key, int(match.group(1)) if match else None
    match = _LAYER.match(mcore_key)
    if not match:
        return mcore_key, None
    layer, rest = int(match.group(1)), match.group(2)
    return te_key("decoder.layers." + rest), layer


def region(mcore_key: str, shape: tuple[int, ...], num_layers: int,
           spec: ModelSpec | None = None) -> Region:
    """The box that mcore tensor ``mcore_key`` of ``shape`` fills in the checkpoint.
    ``("decoder.layers.1.mlp.linear_fc2.weight", (8, 16), 4)`` ->
    ``Region(key="decoder.layers.mlp.linear_fc2.weight", global_shape=(4, 8, 16),
    offset=(1, 0, 0), shape=(1, 8, 16))``."""
    shape = tuple(shape)
    if spec is not None and moe_checkpoint.applies(spec):
        key, offsets, sizes = moe_checkpoint.placement(mcore_key, spec)
        return Region(key=key, global_shape=sizes + shape,
                      offset=offsets + (0,) * len(shape), shape=(1,) * len(sizes) + shape)
    key, layer = checkpoint_key(mcore_key)
    if layer is None:
        return Region(key=key, global_shape=shape, offset=(0,) * len(shape), shape=shape)
    if not 0 <= layer < num_layers:
        raise ValueError(f"{mcore_key}: layer {layer} is outside 0..{num_layers - 1}")
    return Region(key=key, global_shape=(num_layers, *shape), offset=(layer,) + (0,) * len(shape),
                  shape=(1, *shape))


def pieces(mcore_key: str, shape: tuple[int, ...], layout: Layout,
           num_layers: int, spec: ModelSpec | None = None) -> tuple[Region, ...]:
    """The chunks Megatron-Core writes for one mcore tensor: its region, split into
    ``layout.parts`` equal parts along the split dim for fused tensors (gated fc1)."""
    whole = region(mcore_key, shape, num_layers, spec)
    if layout.parts == 1 or layout.dim is None:
        return (whole,)
    axis = layout.dim + len(whole.shape) - len(shape)
    size = whole.shape[axis] // layout.parts
    return tuple(whole.replace(offset=_bump(whole.offset, axis, k * size),
                               shape=_bump(whole.shape, axis, size - whole.shape[axis]))
                 for k in range(layout.parts))


def _bump(values: tuple[int, ...], axis: int, delta: int) -> tuple[int, ...]:
    return tuple(v + delta if a == axis else v for a, v in enumerate(values))


def to_chunks(tree: Mapping[str, torch.Tensor], num_layers: int,
              spec: ModelSpec | None = None) -> list[tuple[Region, torch.Tensor]]:
    """An mcore tree (global, unpadded tensors) as checkpoint chunks, one per tensor: the
    tensor viewed as its region (``[1, *shape]`` for a layer tensor). One chunk, not
    Megatron-Core's gate/up ``pieces``, so a reader maps it without assembling a copy."""
    out = []
    for key, tensor in tree.items():
        reg = region(key, tuple(tensor.shape), num_layers, spec)
        out.append((reg, tensor.reshape(reg.shape)))
    return out


def extra_state_keys(mcore_keys: Iterable[str], num_layers: int,
                     spec: ModelSpec | None = None) -> tuple[str, ...]:
    """Object keys of the ``_extra_state`` of every linear layer among ``mcore_keys``.
    ``["decoder.layers.2.mlp.linear_fc2.weight"], 4`` ->
    ``("decoder.layers.mlp.linear_fc2._extra_state/shard_2_4",)``."""
    if spec is not None and moe_checkpoint.applies(spec):
        keys = (moe_checkpoint.extra_state_key(k, spec) for k in mcore_keys)
        return tuple(k for k in keys if k is not None)
    out = []
    for mcore_key in mcore_keys:
        match = _LAYER.match(mcore_key)
        if not match or not match.group(2).endswith(".weight"):
            continue
        module = match.group(2)[: -len(".weight")]
        if module.rsplit(".", 1)[-1].startswith("linear_"):
            out.append(f"decoder.layers.{module}._extra_state/shard_{match.group(1)}_{num_layers}")
    return tuple(out)


def mcore_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every mcore tensor of ``spec`` at TP=1 with the vocabulary unpadded, layer
    slot written ``{i}``: what the checkpoint must hold, whatever the source."""
    h, d, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * d
    layer = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv, h),
        "self_attention.linear_proj.weight": (h, spec.num_heads * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * ffn, h),
        "mlp.linear_fc2.weight": (h, ffn),
    }
    if spec.qkv_bias:
        layer["self_attention.linear_qkv.bias"] = (qkv,)
    if spec.qk_norm:
        layer.update({"self_attention.q_layernorm.weight": (d,),
                      "self_attention.k_layernorm.weight": (d,)})
    shapes = {"embedding.word_embeddings.weight": (spec.vocab_size, h)}
    shapes.update({"decoder.layers.{i}." + k: v for k, v in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not spec.tie_embeddings:
        shapes["output_layer.weight"] = (spec.vocab_size, h)
    return shapes


def expected_shape(spec: ModelSpec, mcore_key: str) -> tuple[int, ...]:
    """``mcore_shapes`` for one concrete key (``decoder.layers.3.x`` looks up ``{i}``)."""
    if moe_checkpoint.applies(spec) and _LAYER.match(mcore_key):
        return moe_checkpoint.expected_shape(spec, mcore_key)
    match = _LAYER.match(mcore_key)
    template = f"decoder.layers.{{i}}.{match.group(2)}" if match else mcore_key
    shapes = mcore_shapes(spec)
    if template not in shapes:
        raise KeyError(f"{mcore_key} is not a tensor of a {spec.architecture} model")
    return shapes[template]
