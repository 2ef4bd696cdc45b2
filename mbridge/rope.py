"""Rotary embedding math (pure): the inverse frequencies and the cos/sin scale that
``transformers/modeling_rope_utils.py`` computes for every rope variant mbridge supports, so
a Megatron-Core model rotates exactly as the HF one (Megatron's own llama3 scaling fixes its
factors and the original context; this honours any)."""

from __future__ import annotations

import math

import torch

from mbridge.specs import RopeSpec


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse rotary frequencies ``[head_dim // 2]`` in float32, computed the way
    ``transformers/modeling_rope_utils.py`` does for default, linear and llama3 rope, so the
    Megatron-Core model rotates exactly as the HF one (Megatron's own llama3 scaling fixes
    low/high frequency factors and the original context; this honours any)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "default":
        return inv
    if rope.kind == "yarn":
        return yarn_inv_freq(rope, head_dim)
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' ``get_mscale``: ``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope: RopeSpec) -> float:
    """The factor HF multiplies cos and sin by: 1 except for yarn, where it is
    ``attention_factor`` if given, else from ``mscale``/``mscale_all_dim`` or ``factor``."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def yarn_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Yarn's blend of interpolated and extrapolated frequencies, as
    ``transformers/modeling_rope_utils.py::_compute_yarn_parameters`` computes them."""
    pos = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    extrapolated, interpolated = 1.0 / pos, 1.0 / (rope.factor * pos)

    def correction_dim(rotations: float) -> float:
        old = rope.original_max_position_embeddings
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation
