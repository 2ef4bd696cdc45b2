"""Expert parallelism (pure): which experts an EP rank holds, what they are called there, and
which group splits an expert tensor.

Megatron-Core gives each expert-parallel rank a contiguous block of ``num_experts // ep``
experts (``MoELayer.local_expert_indices`` in megatron/core/transformer/moe/moe_layer.py),
numbered from 0 on that rank: global expert ``e`` is local expert ``e % (num_experts // ep)``
of EP rank ``e // (num_experts // ep)``. mcore keys in mappings name experts globally
(``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight``), as layers are named
globally; ``placement`` turns a global key into where it lives and its name there.

Expert weights split over the expert-tensor-parallel group (size ``etp``) instead of the
tensor-parallel group: a ``Layout`` with ``expert=True`` says so, and ``split_of`` picks the
group size and rank for a layout.
"""

from __future__ import annotations

from mbridge import keys
from mbridge.sharding.layout import Layout
from mbridge.sharding.plan import key_placement
from mbridge.specs import ModelSpec, ParallelSpec, RankSpec

RankPlacement = tuple[int, int, int | None, str]  # (pp rank, vpp chunk, ep rank | None, local key)


def experts_per_rank(num_experts: int, ep: int) -> int:
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} is not divisible by expert parallel "
                         f"size {ep}")
    return num_experts // ep


def local_experts(num_experts: int, ep: int, ep_rank: int) -> range:
    """Global indices of the experts EP rank ``ep_rank`` holds. ``(8, 2, 1) -> range(4, 8)``."""
    n = experts_per_rank(num_experts, ep)
    return range(ep_rank * n, (ep_rank + 1) * n)


def expert_placement(key: str, num_experts: int, ep: int) -> tuple[int | None, str]:
    """``(ep rank, key with the local expert index)`` for an expert key; ``(None, key)`` for
    any other key (held by every EP rank).
    ``("d.layers.0.mlp.experts.local_experts.5.linear_fc1.weight", 8, 2)`` ->
    ``(1, "d.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")``."""
    e = keys.expert_of(key)
    if e is None:
        return None, key
    n = experts_per_rank(num_experts, ep)
    if e >= num_experts:
        raise ValueError(f"{key}: expert {e} is outside 0..{num_experts - 1}")
    return e // n, keys.with_expert(key, e % n)


def placement(key: str, spec: ModelSpec, parallel: ParallelSpec) -> tuple[RankPlacement, ...]:
    """Every copy of a global mcore key: ``(pp rank, vpp chunk, ep rank or None, local key)``
    (``key_placement`` for layers and the tied embedding, then ``expert_placement``)."""
    places = []
    for pp, chunk, local in key_placement(key, spec.num_layers, parallel, spec.tie_embeddings):
        ep, local = (expert_placement(local, spec.moe.num_experts, parallel.ep)
                     if spec.moe is not None else (None, local))
        places.append((pp, chunk, ep, local))
    return tuple(places)


def split_of(layout: Layout, parallel: ParallelSpec, rank: RankSpec) -> tuple[int, int]:
    """``(group size, rank in it)`` that ``layout`` splits over: expert tensor parallel for
    expert tensors, tensor parallel otherwise."""
    return (parallel.etp, rank.etp) if layout.expert else (parallel.tp, rank.tp)
