"""Multi-module (MIMO) layouts: each module of a model (a vision encoder ``images``, the
language model ``language``) on its own ranks with its own tensor/pipeline/data-parallel
sizes (pure). Megatron-Bridge's ``MimoParallelismConfig`` names and checks.

Three deployment modes:

- ``homogeneous``: one layout for every module, on every rank (what a single
  ``ParallelSpec`` does);
- ``colocated``: every module on every rank, each with its own TP x DP (PP=1); an encoder's
  outputs move between the modules' data-parallel groups (fan-in when the encoder's DP is
  larger than the language model's, fan-out when smaller), gradients back the same way;
- ``heterogeneous``: modules on disjoint rank ranges that tile the world; encoder ranks send
  embeddings to language-model ranks and receive their gradients.

``finalize(world_size)`` checks a config and returns it finalized; everything that lays
ranks out (``module_ranks``, ``module_groups``) refuses an unfinalized one.

    cfg = MimoParallelismConfig(deployment_mode="heterogeneous", module_parallelisms={
        "images": ModuleParallelismConfig(rank_offset=0),
        "language": ModuleParallelismConfig(rank_offset=1)}).finalize(2)
    module_groups(cfg, "language", ("tp",)) -> ((1,),)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from mbridge.sharding import grid
from mbridge.specs import ParallelSpec

Mode = Literal["homogeneous", "colocated", "heterogeneous"]


class MimoConfigError(ValueError):
    """A MIMO layout that cannot run; the message names what to change."""


class ModuleParallelismConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                              kw_only=True):
    """One module's layout: ``tensor_parallel x pipeline_parallel x data_parallel`` ranks
    starting at global rank ``rank_offset``."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    rank_offset: int = 0

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "data_parallel"):
            if getattr(self, name) < 1:
                raise MimoConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.rank_offset < 0:
            raise MimoConfigError(f"rank_offset={self.rank_offset} must be >= 0")

    @property
    def size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    @property
    def parallel(self) -> ParallelSpec:
        return ParallelSpec(tp=self.tensor_parallel, pp=self.pipeline_parallel)

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.size)


class MimoParallelismConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                            kw_only=True):
    """The layout of every module; ``world_size`` is set by ``finalize`` (None: not yet).
    ``module_parallelisms`` maps module names (``images``, ``language``) to layouts, as
    Megatron-Bridge's config does (a mapping, so the struct is frozen but not hashable)."""

    llm_module_name: str = "language"
    deployment_mode: Mode = "homogeneous"
    module_parallelisms: dict[str, ModuleParallelismConfig] = {}
    world_size: int | None = None

    def finalize(self, world_size: int, *, global_batch_size: int | None = None,
                 num_heads: Mapping[str, int] | None = None) -> MimoParallelismConfig:
        """This config checked on ``world_size`` ranks (and, when given, against the global
        batch and each module's attention heads), with ``world_size`` set."""
        check(self, world_size, global_batch_size=global_batch_size, num_heads=num_heads)
        return msgspec.structs.replace(self, world_size=world_size)

    @property
    def finalized(self) -> bool:
        return self.world_size is not None

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(n for n in sorted(self.module_parallelisms) if n != self.llm_module_name)


def _fail(message: str):
    raise MimoConfigError(message)


def _check_rank_ranges(cfg: MimoParallelismConfig, world_size: int) -> None:
    mods, mode = cfg.module_parallelisms, cfg.deployment_mode
    for name, m in sorted(mods.items()):
        if m.ranks.stop > world_size:
            _fail(f"module {name!r} needs ranks {m.ranks.start}..{m.ranks.stop - 1} "
                  f"(rank_offset {m.rank_offset} + tp*pp*dp = {m.size}) but the world has "
                  f"{world_size}; lower its sizes or rank_offset, or launch more ranks")
    if mode in ("homogeneous", "colocated"):
        for name, m in sorted(mods.items()):
            if m.rank_offset != 0 or m.size != world_size:
                _fail(f"{mode} mode puts every module on all {world_size} ranks: module "
                      f"{name!r} has rank_offset={m.rank_offset} and tp*pp*dp={m.size}; set "
                      f"rank_offset=0 and tp*pp*dp={world_size}")
    if mode == "homogeneous":
        layouts = {(m.tensor_parallel, m.pipeline_parallel, m.data_parallel)
                   for m in mods.values()}
        if len(layouts) > 1:
            _fail(f"homogeneous mode uses one layout for every module, got {sorted(layouts)} "
                  "(tp, pp, dp); give every module the same sizes, or use "
                  "deployment_mode='colocated' (same ranks, own TP/DP per module)")
    if mode == "colocated":
        for name, m in sorted(mods.items()):
            if m.pipeline_parallel != 1:
                _fail(f"colocated mode needs pipeline_parallel=1 for every module (the "
                      f"modules share each rank's forward and backward); module {name!r} has "
                      f"pipeline_parallel={m.pipeline_parallel}: set it to 1, or use "
                      "deployment_mode='heterogeneous' (disjoint ranks per module)")
    if mode == "heterogeneous":
        owner: dict[int, str] = {}
        for name, m in sorted(mods.items(), key=lambda kv: kv[1].rank_offset):
            for r in m.ranks:
                if r in owner:
                    _fail(f"heterogeneous mode gives each module its own ranks: modules "
                          f"{owner[r]!r} and {name!r} both hold rank {r}; shift the "
                          f"rank_offset of {name!r} to {mods[owner[r]].ranks.stop} or "
                          "later, or use deployment_mode='colocated'")
                owner[r] = name
        idle = sorted(set(range(world_size)) - set(owner))
        if idle:
            _fail(f"heterogeneous mode: ranks {idle} hold no module (the ranges must tile "
                  f"the {world_size} ranks); grow a module's data_parallel or launch "
                  f"{world_size - len(idle)} ranks")


def check(cfg: MimoParallelismConfig, world_size: int, *, global_batch_size: int | None = None,
          num_heads: Mapping[str, int] | None = None) -> None:
    """Raise MimoConfigError naming the fix for the first thing ``cfg`` gets wrong."""
    mods = cfg.module_parallelisms
    if world_size < 1:
        _fail(f"world_size={world_size} must be at least 1")
    if cfg.llm_module_name not in mods:
        _fail(f"llm_module_name={cfg.llm_module_name!r} has no entry in module_parallelisms "
              f"(modules: {sorted(mods)}); add its layout or set llm_module_name")
    if len(mods) < 2 and cfg.deployment_mode != "homogeneous":
        _fail(f"{cfg.deployment_mode} mode needs an encoder module beside "
              f"{cfg.llm_module_name!r}; add one to module_parallelisms")
    _check_rank_ranges(cfg, world_size)
    if global_batch_size is not None:
        for name, m in sorted(mods.items()):
            if global_batch_size % m.data_parallel:
                _fail(f"global batch size {global_batch_size} is not divisible by module "
                      f"{name!r}'s data_parallel={m.data_parallel}; set the global batch to a "
                      f"multiple of every module's data_parallel (global_batch_size(base, "
                      f"llm_dp) = base x the language model's DP)")
    for name, heads in sorted((num_heads or {}).items()):
        if name in mods and heads % mods[name].tensor_parallel:
            _fail(f"module {name!r} has {heads} attention heads, not divisible by its "
                  f"tensor_parallel={mods[name].tensor_parallel}; pick a divisor of {heads}")


def _finalized(cfg: MimoParallelismConfig) -> int:
    if cfg.world_size is None:
        _fail("MimoParallelismConfig is not finalized: call cfg = cfg.finalize(world_size) "
              "before laying out ranks, building grids or planning data")
    return cfg.world_size


def _module(cfg: MimoParallelismConfig, name: str) -> ModuleParallelismConfig:
    _finalized(cfg)
    if name not in cfg.module_parallelisms:
        _fail(f"no module {name!r} (modules: {sorted(cfg.module_parallelisms)})")
    return cfg.module_parallelisms[name]


def module_ranks(cfg: MimoParallelismConfig, name: str) -> tuple[int, ...]:
    """The global ranks of module ``name``."""
    return tuple(_module(cfg, name).ranks)


def module_grid(cfg: MimoParallelismConfig, name: str) -> grid.Grid:
    """Module ``name``'s ``tp x cp x dp x pp`` grid over its own ranks (Megatron-Core's
    order: TP ranks adjacent), local ranks 0..size-1."""
    m = _module(cfg, name)
    return grid.dense_grid(m.parallel, m.size)


def module_groups(cfg: MimoParallelismConfig, name: str, dims: tuple[str, ...], *,
                  expert: bool = False) -> tuple[tuple[int, ...], ...]:
    """Every group of module ``name`` along ``dims`` (``("tp",)``, ``("dp",)``...), in
    global ranks: ``module_groups(cfg, "language", ("tp",)) -> ((2, 3),)``. ``expert``:
    along the expert grid ``etp x ep x edp x pp`` instead."""
    m = _module(cfg, name)
    g = grid.expert_grid(m.parallel, m.size) if expert else module_grid(cfg, name)
    return tuple(tuple(r + m.rank_offset for r in ranks) for ranks in grid.groups_over(g, dims))


def embedding_groups(cfg: MimoParallelismConfig, name: str) -> tuple[tuple[int, ...], ...]:
    """Module ``name``'s first and last pipeline stage of each pipeline group."""
    offset = _module(cfg, name).rank_offset
    return tuple(tuple(r + offset for r in g)
                 for g in grid.embedding_groups(module_grid(cfg, name)))


def modules_on(cfg: MimoParallelismConfig, rank: int) -> tuple[str, ...]:
    """The modules that rank ``rank`` holds (sorted by name)."""
    return tuple(n for n in sorted(cfg.module_parallelisms) if rank in module_ranks(cfg, n))


def coordinates(cfg: MimoParallelismConfig, name: str, rank: int) -> dict[str, int]:
    """``{"tp": i, "dp": j, "pp": k}`` of global ``rank`` in module ``name``."""
    local = rank - _module(cfg, name).rank_offset
    out = {}
    for dim, size in module_grid(cfg, name):
        out[dim], local = local % size, local // size
    return {k: out[k] for k in ("tp", "dp", "pp")}


def rank_at(cfg: MimoParallelismConfig, name: str, *, tp: int = 0, dp: int = 0,
            pp: int = 0) -> int:
    """The global rank at coordinates ``tp, dp, pp`` of module ``name``."""
    m = _module(cfg, name)
    return m.rank_offset + tp + m.tensor_parallel * (dp + m.data_parallel * pp)


__all__ = ["MimoConfigError", "MimoParallelismConfig", "ModuleParallelismConfig", "check",
           "coordinates", "module_grid", "module_groups", "module_ranks", "modules_on",
           "rank_at"]
