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


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *,
                       image_token_id: int, spatial_merge_size: int) -> torch.Tensor:
    """3-D rope positions ``[3, batch, seq]`` (temporal, height, width) of a batch whose
    images are runs of ``image_token_id``, one run per row of ``image_grid_thw``
    ``[images, 3]`` (patch grids, in reading order), as
    ``Qwen2_5_VLModel.get_rope_index`` computes them for images: text tokens count on in
    all three rows; an image's ``t * h * w / merge ** 2`` tokens take ``start + (t, h, w)``
    of the merged grid, and text after it resumes at ``start + max(h, w) / merge``.

    ``[[5, 9, 9, 9, 9, 6]]`` with one grid ``(1, 4, 4)``, merge 2 ->
    ``[[[0, 1, 1, 1, 1, 3]], [[0, 1, 1, 2, 2, 3]], [[0, 1, 2, 1, 2, 3]]]``.
    ValueError when a run of image tokens does not hold its grid's number of features."""
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw]
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    used = 0
    for row, ids in enumerate(input_ids.tolist()):
        pos, start = [], 0
        for is_image, run in _runs(ids, image_token_id):
            if not is_image:
                pos.append(torch.arange(run).expand(3, -1) + start)
                start += run
                continue
            if used == len(grids):
                raise ValueError(f"input_ids hold more runs of image tokens ({image_token_id}) "
                                 f"than image_grid_thw has images ({len(grids)})")
            t, h, w = grids[used]
            used += 1
            m = spatial_merge_size
            want = t * h * w // m ** 2
            if run != want:
                raise ValueError(f"image {used - 1} has grid {(t, h, w)}: {want} features, but "
                                 f"its run of image tokens holds {run}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // m),
                                        torch.arange(w // m), indexing="ij")
            pos.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)
            start += max(h, w) // m
        if pos:  # an empty sequence has no positions
            out[:, row] = torch.cat(pos, dim=1)
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images, input_ids hold {used} runs "
                         f"of image tokens ({image_token_id})")
    return out.to(input_ids.device)


def _runs(ids: list[int], token: int):
    """``(is token, length)`` of each run of equal kind: ``[1, 9, 9, 2]`` with 9 ->
    ``(False, 1), (True, 2), (False, 1)``."""
    out: list[tuple[bool, int]] = []
    for t in ids:
        kind = t == token
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + 1)
        else:
            out.append((kind, 1))
    return out
