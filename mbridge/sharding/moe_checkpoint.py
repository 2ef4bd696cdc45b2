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


def applies(spec: ModelSpec) -> bool:
    """Whether ``spec`` has tensors beyond the dense decoder's (handled here)."""
    return (spec.moe is not None or spec.mla is not None or spec.linear_bias
            or spec.attention_sinks)


def attention_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's attention tensors (local-spec names, TP=1)."""
    h, heads, d = spec.hidden_size, spec.num_heads, spec.head_dim
    a = "self_attention."
    if spec.mla is not None:
        m = spec.mla
        q_dim = heads * (m.qk_head_dim + m.qk_rope_head_dim)
        out = {a + "linear_kv_down_proj.weight": (m.kv_lora_rank + m.qk_rope_head_dim, h),
               a + "kv_layernorm.weight": (m.kv_lora_rank,),
               a + "linear_kv_up_proj.weight": (heads * (m.qk_head_dim + m.v_head_dim),
                                                 m.kv_lora_rank),
               a + "linear_proj.weight": (h, heads * m.v_head_dim)}
        if m.q_lora_rank is None:
            out[a + "linear_q_proj.weight"] = (q_dim, h)
        else:
            out.update({a + "linear_q_down_proj.weight": (m.q_lora_rank, h),
                        a + "q_layernorm.weight": (m.q_lora_rank,),
                        a + "linear_q_up_proj.weight": (q_dim, m.q_lora_rank)})
        return out
    qkv = (heads + 2 * spec.num_kv_heads) * d
    out = {a + "linear_qkv.weight": (qkv, h), a + "linear_proj.weight": (h, heads * d)}
    if spec.qkv_bias or spec.linear_bias:
        out[a + "linear_qkv.bias"] = (qkv,)
    if spec.linear_bias:
        out[a + "linear_proj.bias"] = (h,)
    if spec.qk_norm:
        out.update({a + "q_layernorm.weight": (d,), a + "k_layernorm.weight": (d,)})
    if spec.attention_sinks:
        out[a + "core_attention.softmax_offset"] = (heads,)
    return out


def mlp_shapes(prefix: str, ffn: int, hidden: int, bias: bool) -> dict[str, tuple[int, ...]]:
    fc1, fc2 = prefix + "linear_fc1.", prefix + "linear_fc2."
    out = {fc1 + "weight": (2 * ffn, hidden), fc2 + "weight": (hidden, ffn)}
    if bias:
        out.update({fc1 + "bias": (2 * ffn,), fc2 + "bias": (hidden,)})
    return out


def layer_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of decoder layer ``layer`` (local-spec names, experts as ``{e}``, TP=1)."""
    h, moe = spec.hidden_size, spec.moe
    out = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
           **attention_shapes(spec)}
    if moe is None or not moe.is_moe_layer(layer):
        return {**out, **mlp_shapes("mlp.", spec.ffn_hidden_size, h, spec.linear_bias)}
    out["mlp.router.weight"] = (moe.num_experts, h)
    if spec.linear_bias:
        out["mlp.router.bias"] = (moe.num_experts,)
    if moe.expert_bias:
        out["mlp.router.expert_bias"] = (moe.num_experts,)
    out.update(mlp_shapes("mlp.experts.local_experts.{e}.", moe.ffn_hidden_size, h,
                          spec.linear_bias))
    if moe.shared_ffn_hidden_size:
        out.update(mlp_shapes("mlp.shared_experts.", moe.shared_ffn_hidden_size, h, False))
        if moe.shared_gate:
            out["mlp.shared_experts.gate_weight"] = (1, h)
    return out


def expected_shape(spec: ModelSpec, mcore_key: str) -> tuple[int, ...] | None:
    """The shape of a layer tensor ``mcore_key``, or None for keys outside the layers;
    KeyError if the layer has no such tensor."""
    match = _LAYER.match(mcore_key)
    if not match:
        return None
    layer, name = int(match.group(1)), match.group(2)
    template = re.sub(r"^mlp\.experts\.local_experts\.\d+\.", "mlp.experts.local_experts.{e}.",
                      name)
    shapes = layer_shapes(spec, layer)
    if template not in shapes:
        raise KeyError(f"{mcore_key} is not a tensor of a {spec.architecture} model")
    return shapes[template]


def extra_state_key(mcore_key: str, spec: ModelSpec) -> str | None:
    """The ``_extra_state`` object key of the linear layer whose weight is ``mcore_key``
    (Megatron-Core's ``ShardedObject.unique_key``: offsets and sizes joined by dots), or None."""
    if not mcore_key.endswith(".weight") or not _LAYER.match(mcore_key):
        return None
    module = mcore_key[: -len(".weight")]
    if not module.rsplit(".", 1)[-1].startswith("linear_"):
        return None
    key, offsets, sizes = placement(module + ".weight", spec)
    key = key[: -len(".weight")] + "._extra_state"
    offsets, sizes = offsets or (0,), sizes or (1,)
    return f"{key}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, sizes))}"
