"""Data plans of a multi-module (MIMO) run (pure): which samples of the global batch each
module's data-parallel rank reads, and where an encoder's outputs (and their gradients) go.

Every module splits the global batch into contiguous blocks, one per data-parallel rank
(``module_samples``): module micro-batch = global batch / module DP. The language model cuts
its block into micro-batches of ``train.micro_batch_size``. An encoder sample's embedding
goes from the encoder rank that made it (TP rank 0 of its DP replica, last stage) to every
TP rank of the language-model replica that reads the sample (first stage), and its gradient
back from that replica's TP rank 0 to every TP rank of the encoder replica: fan-in when the
encoder's DP is larger than the language model's, fan-out when smaller (``dp_fan``).

    global_batch_size(2, llm_dp=2) -> 4
    module_samples(4, dp=2, dp_rank=1) -> range(2, 4)
    dp_fan(4, src_dp=2, dst_dp=1) -> ((0, (0,)), (1, (0,)))          # fan-in
"""

from __future__ import annotations

import msgspec

from mbridge.sharding.mimo import MimoConfigError, MimoParallelismConfig, rank_at


def global_batch_size(base: int, llm_dp: int) -> int:
    """The global batch of a MIMO run: ``base`` samples per language-model DP replica."""
    if base < 1 or llm_dp < 1:
        raise MimoConfigError(f"base={base} and llm_dp={llm_dp} must be at least 1")
    return base * llm_dp


def module_micro_batch(global_batch: int, dp: int) -> int:
    """Samples per step on each DP replica of a module: global batch / module DP."""
    if global_batch % dp:
        raise MimoConfigError(f"global batch size {global_batch} is not divisible by the "
                              f"module's data_parallel={dp}")
    return global_batch // dp


def module_samples(global_batch: int, dp: int, dp_rank: int) -> range:
    """The samples (indices into the global batch) DP replica ``dp_rank`` of a module reads."""
    n = module_micro_batch(global_batch, dp)
    return range(dp_rank * n, (dp_rank + 1) * n)


def owner(sample: int, global_batch: int, dp: int) -> int:
    """The DP replica of a module that reads ``sample``."""
    return sample // module_micro_batch(global_batch, dp)


def lm_microbatches(global_batch: int, micro_batch: int, dp: int,
                    dp_rank: int) -> tuple[tuple[int, ...], ...]:
    """The language model's micro-batches on DP replica ``dp_rank``: its block of the global
    batch cut into ``micro_batch`` samples each."""
    block = module_samples(global_batch, dp, dp_rank)
    if len(block) % micro_batch:
        raise MimoConfigError(f"the language model reads {len(block)} samples per DP replica "
                              f"(global batch {global_batch} / DP {dp}), not divisible by "
                              f"train.micro_batch_size={micro_batch}")
    return tuple(tuple(block[i:i + micro_batch]) for i in range(0, len(block), micro_batch))


def check_module_batch(name: str, samples, *, global_batch: int, dp: int,
                       dp_rank: int) -> None:
    """Megatron-Bridge's "wrong data iterator" pitfall: a module's rank must read its own
    DP share (``module_samples``), not the language model's (or all of it)."""
    want = tuple(module_samples(global_batch, dp, dp_rank))
    if tuple(samples) != want:
        raise MimoConfigError(
            f"module {name!r} DP rank {dp_rank} got samples {tuple(samples)} of the global "
            f"batch, its share is {want} (global batch / its data_parallel={dp}); read each "
            "module's batch with mbridge.train.mimo.module_samples, not the language "
            "model's data iterator")


def dp_fan(global_batch: int, src_dp: int, dst_dp: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """For each DP replica of the sending module, the replicas of the receiving one its
    samples go to: ``dp_fan(4, 2, 1) -> ((0, (0,)), (1, (0,)))`` (fan-in), ``dp_fan(4, 1, 2)
    -> ((0, (0, 1)),)`` (fan-out)."""
    return tuple((s, tuple(sorted({owner(i, global_batch, dst_dp)
                                   for i in module_samples(global_batch, src_dp, s)})))
                 for s in range(src_dp))


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """One sample's tensor from global rank ``src`` to global rank ``dst`` (equal: a copy
    on one rank, colocated)."""

    sample: int
    src: int
    dst: int


def _last_pp(cfg: MimoParallelismConfig, name: str) -> int:
    return cfg.module_parallelisms[name].pipeline_parallel - 1


def embedding_routes(cfg: MimoParallelismConfig, encoder: str,
                     global_batch: int) -> tuple[Route, ...]:
    """Every transfer of encoder ``encoder``'s per-sample embeddings to the language model,
    ordered by sample then destination (both sides post them in this order)."""
    lm = cfg.llm_module_name
    e, m = cfg.module_parallelisms[encoder], cfg.module_parallelisms[lm]
    out = []
    for s in range(global_batch):
        src = rank_at(cfg, encoder, dp=owner(s, global_batch, e.data_parallel),
                      pp=_last_pp(cfg, encoder))
        d = owner(s, global_batch, m.data_parallel)
        out += [Route(sample=s, src=src, dst=rank_at(cfg, lm, tp=t, dp=d))
                for t in range(m.tensor_parallel)]
    return tuple(out)


def gradient_routes(cfg: MimoParallelismConfig, encoder: str,
                    global_batch: int) -> tuple[Route, ...]:
    """The reverse of ``embedding_routes``: each sample's embedding gradient from TP rank 0
    of the language-model replica that read it to every TP rank of the encoder replica that
    made it (an encoder's TP ranks hold replicas of the tower)."""
    lm = cfg.llm_module_name
    e, m = cfg.module_parallelisms[encoder], cfg.module_parallelisms[lm]
    out = []
    for s in range(global_batch):
        src = rank_at(cfg, lm, dp=owner(s, global_batch, m.data_parallel))
        d = owner(s, global_batch, e.data_parallel)
        out += [Route(sample=s, src=src, dst=rank_at(cfg, encoder, tp=t, dp=d,
                                                     pp=_last_pp(cfg, encoder)))
                for t in range(e.tensor_parallel)]
    return tuple(out)


def routes_of(routes: tuple[Route, ...], rank: int) -> tuple[tuple[Route, ...], tuple[Route, ...]]:
    """(what ``rank`` sends, what it receives) of ``routes``, in their order."""
    return (tuple(r for r in routes if r.src == rank),
            tuple(r for r in routes if r.dst == rank))


__all__ = ["Route", "check_module_batch", "dp_fan", "embedding_routes", "global_batch_size",
           "gradient_routes", "lm_microbatches", "module_micro_batch", "module_samples",
           "owner", "routes_of"]
