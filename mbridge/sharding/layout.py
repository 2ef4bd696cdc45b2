"""How one tensor splits across tensor-parallel ranks, and the pure shard/unshard pair.

A ``Layout`` names the split dimension (``None``: replicated), how many equal parts are
stacked along it (2 for Megatron's fused ``[gate; up]``, where each rank holds
``[gate_r; up_r]``), and for vocabulary tensors the true size to pad up to a multiple of
``multiple * tp`` (Megatron-Core pads the vocabulary so that every TP rank gets equal rows).

``shard_ranges`` is the single source of truth for which slice a rank owns: ``shard`` applies
it to a tensor in memory and the lazy safetensors reader applies it to a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mbridge.specs import Spec

Tree = dict[str, torch.Tensor]  # a flat pytree: key -> tensor


class Layout(Spec, frozen=True, kw_only=True):
    dim: int | None = None
    parts: int = 1
    vocab_size: int | None = None  # set for vocab-padded tensors: the unpadded size on `dim`
    multiple: int = 128
    expert: bool = False  # an expert's tensor: splits over expert tensor parallel ranks


REPLICATED = Layout()
COLUMN = Layout(dim=0)
ROW = Layout(dim=1)
GATED_COLUMN = Layout(dim=0, parts=2)


def vocab_layout(vocab_size: int, multiple: int = 128) -> Layout:
    return Layout(dim=0, vocab_size=vocab_size, multiple=multiple)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-Core's rule: pad to a multiple of ``multiple * tp``. ``(1000, 2) -> 1024``."""
    step = multiple * tp
    return math.ceil(vocab_size / step) * step


def global_size(layout: Layout, size: int, tp: int) -> int:
    """Size along the split dim of the global (padded) tensor whose true size is ``size``."""
    if layout.vocab_size is None:
        return size
    return padded_vocab_size(layout.vocab_size, tp, layout.multiple)


def shard_ranges(layout: Layout, size: int, tp: int, rank: int) -> tuple[tuple[int, int], int]:
    """Half-open ranges of the unpadded dim ``layout.dim`` that ``rank`` owns, and how many
    zero rows pad them. ``(COLUMN, 8, 2, 1) -> (((4, 8),), 0)``."""
    if layout.dim is None:
        return ((0, size),), 0
    if layout.vocab_size is not None:
        chunk = padded_vocab_size(layout.vocab_size, tp, layout.multiple) // tp
        lo, hi = min(rank * chunk, size), min((rank + 1) * chunk, size)
        return ((lo, hi),), chunk - (hi - lo)
    if size % (layout.parts * tp):
        raise ValueError(f"dim {layout.dim} of size {size} does not split into "
                         f"{layout.parts} parts x tensor parallel size {tp}")
    part = size // layout.parts
    chunk = part // tp
    return tuple((k * part + rank * chunk, k * part + (rank + 1) * chunk)
                 for k in range(layout.parts)), 0


def shard(tensor: torch.Tensor, layout: Layout, tp: int, rank: int) -> torch.Tensor:
    """The slice of ``tensor`` that TP ``rank`` holds (contiguous, zero-padded for vocab)."""
    if layout.dim is None:
        return tensor
    ranges, pad = shard_ranges(layout, tensor.shape[layout.dim], tp, rank)
    pieces = [tensor.narrow(layout.dim, lo, hi - lo) for lo, hi in ranges]
    if pad:
        shape = list(tensor.shape)
        shape[layout.dim] = pad
        pieces.append(tensor.new_zeros(shape))
    return torch.cat(pieces, layout.dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous()


def unshard(shards: Sequence[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Inverse of ``shard``: ``unshard([shard(t, l, tp, r) for r in range(tp)], l) == t``."""
    if layout.dim is None:
        return shards[0]
    per_rank = [s.chunk(layout.parts, layout.dim) for s in shards]
    pieces = [p[k] for k in range(layout.parts) for p in per_rank]
    full = pieces[0] if len(pieces) == 1 else torch.cat(pieces, layout.dim)  # one: no copy
    if layout.vocab_size is not None:
        full = full.narrow(layout.dim, 0, layout.vocab_size)
    return full.contiguous()
