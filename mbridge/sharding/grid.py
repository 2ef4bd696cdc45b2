"""Which global ranks form each process group of a parallel layout (pure).

Megatron-Core orders ranks ``tp-cp-ep-dp-pp`` (``initialize_model_parallel``'s default
``order``): tensor parallel ranks are adjacent, pipeline stages furthest apart. Dense groups
are drawn on the grid ``tp x cp x dp x pp``; expert groups on ``etp x ep x edp x pp``
(``edp = world / (etp * ep * pp)``), as ``parallel_state`` does.

    groups_over(dense_grid(ParallelSpec(tp=2), 4), ("tp",)) -> ((0, 1), (2, 3))
"""

from __future__ import annotations

import itertools
import math

from mbridge.specs import ParallelSpec

Grid = tuple[tuple[str, int], ...]  # (dimension, size), fastest-varying first


def dense_grid(parallel: ParallelSpec, world: int) -> Grid:
    """``tp x cp x dp x pp`` for ``world`` ranks; ValueError if the sizes do not divide it."""
    model = parallel.tp * parallel.cp * parallel.pp
    if world % model:
        raise ValueError(f"world size {world} is not divisible by tp*cp*pp = {model}")
    return (("tp", parallel.tp), ("cp", parallel.cp), ("dp", world // model),
            ("pp", parallel.pp))


def expert_grid(parallel: ParallelSpec, world: int) -> Grid:
    """``etp x ep x edp x pp`` for ``world`` ranks."""
    model = parallel.etp * parallel.ep * parallel.pp
    if world % model:
        raise ValueError(f"world size {world} is not divisible by etp*ep*pp = {model}")
    return (("etp", parallel.etp), ("ep", parallel.ep), ("edp", world // model),
            ("pp", parallel.pp))


def groups_over(grid: Grid, dims: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Every group of ranks that differ only along ``dims``, each in ascending order, groups
    ordered by their first rank."""
    names = [name for name, _ in grid]
    unknown = set(dims) - set(names)
    if unknown:
        raise ValueError(f"dimensions {sorted(unknown)} are not in the grid {names}")
    strides = dict(zip(names, itertools.accumulate([1] + [s for _, s in grid[:-1]],
                                                    lambda a, b: a * b)))
    sizes = dict(grid)
    fixed = [n for n in names if n not in dims]
    out = []
    for base in itertools.product(*(range(sizes[n]) for n in fixed)):
        origin = sum(c * strides[n] for n, c in zip(fixed, base))
        members = [origin + sum(c * strides[n] for n, c in zip(dims, coords))
                   for coords in itertools.product(*(range(sizes[n]) for n in dims))]
        out.append(tuple(sorted(members)))
    return tuple(sorted(out))


def embedding_groups(grid: Grid) -> tuple[tuple[int, ...], ...]:
    """The ranks holding the embedding and the output layer: first and last pipeline stage
    of each pipeline group (one rank without pipelining), as Megatron-Core's
    ``default_embedding_ranks``."""
    return tuple(tuple(sorted({g[0], g[-1]})) for g in groups_over(grid, ("pp",)))


def world_size(grid: Grid) -> int:
    return math.prod(size for _, size in grid)
