"""Merging adapters into their base weights (pure, on full tensors or on one rank's shards).

LoRA: ``W' = W + (alpha/dim) * B @ A``, computed in float32 and cast back to W's dtype.
DoRA (peft's ``DoraLinearLayer``): ``W' = m / ||W + s B A||_row * (W + s B A)``, the norm
over each output row. On a TP shard the same functions apply unchanged: a column-parallel
linear holds whole rows (``B`` split by rows, ``A`` whole), a row-parallel one a slice of
every row (``A`` split by columns, ``B`` whole), so only a row-parallel DoRA norm needs the
ranks' squared norms summed (``row_norm_sq`` is what a rank contributes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (A [dim, in], B [out, dim])


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in float32 ``[out, in]``."""
    return (b.float() @ a.float()) * scale


def site_delta(weight: torch.Tensor, pairs: Sequence[Pair | None], scale: float,
               split: Callable, fuse: Callable) -> torch.Tensor:
    """The float32 update of one linear ``weight`` ``[out, in]``: one pair over the whole
    linear, or one per part of a fused linear (None: that part is not adapted), joined by the
    weights' op pair (``split``/``fuse``: ``site.split_fn``/``fuse_fn``)."""
    if len(pairs) == 1 and pairs[0] is not None:
        return lora_delta(*pairs[0], scale)
    parts = split(weight)
    return fuse(*(lora_delta(*p, scale) if p is not None else
                  torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                  for w, p in zip(parts, pairs, strict=True)))


def row_norm_sq(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[out]`` squared norms of the rows of ``W + delta`` (float32): a row-parallel rank's
    share of DoRA's norm (sum them over the TP group)."""
    return (weight.float() + delta).square().sum(dim=1)


def site_magnitude(norm_sq: torch.Tensor, magnitudes: Sequence[torch.Tensor | None],
                   split: Callable, fuse: Callable) -> torch.Tensor:
    """DoRA's magnitude of the whole linear ``[out]`` (float32): the one vector, or the parts'
    joined; a part with no adapter keeps its row norms, so its factor is exactly 1."""
    if len(magnitudes) == 1 and magnitudes[0] is not None:
        return magnitudes[0].float()
    norms = split(norm_sq.sqrt())
    return fuse(*(m.float() if m is not None else n for n, m in zip(norms, magnitudes,
                                                                    strict=True)))


def dora_factor(magnitude: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """``m / ||W + s B A||_row`` ``[out]``: DoRA's per-row scale (the norm is a constant to
    autograd, as DoRA's section 4.3 and peft treat it)."""
    return magnitude.float() / norm_sq.sqrt()


def merge(weight: torch.Tensor, delta: torch.Tensor,
          factor: torch.Tensor | None = None) -> torch.Tensor:
    """``W + delta`` (LoRA) or ``factor * (W + delta)`` by rows (DoRA), in float32, cast to
    ``weight``'s dtype. ``merge(shard(W), site_delta(shards...)) == shard(merge(W, ...))``."""
    out = weight.float() + delta
    if factor is not None:
        out = out * factor.unsqueeze(1)
    return out.to(weight.dtype)
