"""Pipeline placement: which global layers each (pipeline rank, virtual chunk) builds.

Matches Megatron-Core's ``get_transformer_layer_offset``/``get_num_layers_to_build``: each
stage gets ``first_stage_layers``/``last_stage_layers`` when set and an even share of the
rest otherwise; with virtual pipelining a stage's layers split evenly over its chunks, and
chunk ``v`` of every stage comes before chunk ``v + 1`` of any stage in layer order.
"""

from __future__ import annotations

from mbridge import keys
from mbridge.keys import EMBEDDING, OUTPUT
from mbridge.specs import ParallelSpec

Placement = tuple[int, int, int]  # (pp rank, vpp chunk, local layer index)


def stage_layer_counts(num_layers: int, parallel: ParallelSpec) -> tuple[int, ...]:
    """Layers per pipeline stage. ``(8, pp=3, first_stage_layers=2) -> (2, 3, 3)``."""
    pp, first, last = parallel.pp, parallel.first_stage_layers, parallel.last_stage_layers
    if pp == 1:
        return (num_layers,)
    fixed = (first or 0) + (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - fixed
    if rest < 0 or (middle_stages == 0 and rest) or (middle_stages and rest % middle_stages):
        raise ValueError(
            f"num_layers={num_layers} cannot be split over pipeline parallel size {pp}"
            f" (first_stage_layers={first}, last_stage_layers={last}); the layers left after"
            " the first/last stage must divide evenly over the remaining stages"
        )
    if parallel.vpp and middle_stages == 0:
        raise ValueError("with virtual pipelining Megatron-Core needs at least one stage besides"
                         " the first and last when both first_stage_layers and last_stage_layers"
                         " are set; drop one of them or raise pipeline parallel size")
    share = rest // middle_stages if middle_stages else 0
    counts = [share] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    for stage, n in enumerate(counts):
        if n % parallel.vpp_size:
            raise ValueError(f"pipeline stage {stage} has {n} layers, not divisible by "
                             f"virtual pipeline size {parallel.vpp_size}")
    return tuple(counts)


def layer_placement(num_layers: int, parallel: ParallelSpec) -> tuple[Placement, ...]:
    """Placement of every global layer, in layer order.

    ``layer_placement(4, ParallelSpec(pp=2, vpp=2))`` ->
    ``((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0))``.
    """
    counts = stage_layer_counts(num_layers, parallel)
    out: list[Placement] = []
    for chunk in range(parallel.vpp_size):
        for stage, n in enumerate(counts):
            per_chunk = n // parallel.vpp_size
            out.extend((stage, chunk, local) for local in range(per_chunk))
    return tuple(out)


def first_chunk(parallel: ParallelSpec) -> tuple[int, int]:
    """(pp rank, vpp chunk) holding the embedding."""
    return 0, 0


def last_chunk(parallel: ParallelSpec) -> tuple[int, int]:
    """(pp rank, vpp chunk) holding the final norm and output layer."""
    return parallel.pp - 1, parallel.vpp_size - 1




def key_placement(key: str, num_layers: int, parallel: ParallelSpec,
                  tie_embeddings: bool = False) -> tuple[tuple[int, int, str], ...]:
    """Where a global mcore key lives: ``(pp rank, vpp chunk, local key)`` for every copy.

    Layer keys move to their chunk's local index; the embedding sits in the first chunk and,
    when tied and pipelined, also in the last chunk as ``output_layer.weight`` (Megatron-Core
    keeps that copy in sync itself); modality submodules (a vision tower, its projector) sit
    in the first chunk; everything else outside the layers sits in the last chunk.
    ``("decoder.layers.3.mlp.linear_fc2.weight", 4, pp=2) -> ((1, 0, "decoder.layers.1..."),)``
    """
    found = keys.layer_of(key)
    if found is not None:
        stage, chunk, local = layer_placement(num_layers, parallel)[found[0]]
        return ((stage, chunk, keys.with_layer(local, found[1])),)
    if keys.is_modality_key(key):  # a vision tower or projector feeds the first stage
        return ((*first_chunk(parallel), key),)
    if key == EMBEDDING:
        places = [(*first_chunk(parallel), key)]
        if tie_embeddings and parallel.pp > 1:
            places.append((*last_chunk(parallel), OUTPUT))
        return tuple(places)
    return ((*last_chunk(parallel), key),)
