"""Which samples each data-parallel rank reads: a pure function of consumed samples.

Sequential order over the (already shuffled) dataset, as Megatron-LM's
``MegatronPretrainingSampler``: the global batch at ``consumed`` is samples
``consumed .. consumed + global_batch_size - 1``; micro-step ``m`` takes
``micro_batch_size * dp`` consecutive samples and rank ``r`` the ``r``-th slice of them.
Resuming from ``consumed_samples`` therefore reads exactly what an uninterrupted run reads.

    microbatch_indices(0, global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=1)
    -> ((2, 3), (6, 7))
"""

from __future__ import annotations

from mbridge.train.config import ConfigError


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    per_step = micro_batch_size * dp_size
    if global_batch_size <= 0 or micro_batch_size <= 0 or global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size})")
    return global_batch_size // per_step


def microbatch_indices(consumed: int, *, global_batch_size: int, micro_batch_size: int,
                       dp_size: int, dp_rank: int) -> tuple[tuple[int, ...], ...]:
    """This rank's micro-batches (sample indices) for the global batch at ``consumed``."""
    n = num_microbatches(global_batch_size, micro_batch_size, dp_size)
    per_step = micro_batch_size * dp_size
    return tuple(
        tuple(range(consumed + m * per_step + dp_rank * micro_batch_size,
                    consumed + m * per_step + (dp_rank + 1) * micro_batch_size))
        for m in range(n))
