"""Megatron-Core's distributed optimizer with its per-parameter copy as one foreach copy.

After each step ``DistributedOptimizer._copy_main_params_to_model_params`` copies every
parameter's updated float32 shard into the bf16/fp16 parameter buffer with its own
``copy_`` and a few Python lookups. With many small parameters (LoRA: 128 adapter tensors on
a 16-layer model; MoE experts: about 1,000) the GPU idles through that loop: on an H200 it
was 128 launches of a host-bound 6 ms optimizer step. ``install`` replaces it, where no FP8,
Megatron-FSDP or precision-aware path applies (those keep Megatron-Core's code), with the
same copies into the same slices as one ``torch._foreach_copy_``: the same rounding, so the
same bits (tests/test_fast_optimizer.py).
"""

from __future__ import annotations

import torch

_installed = False
original = None  # Megatron-Core's method, once installed


def _shard_pairs(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(slice of the parameter buffer, float32 main shard) for every parameter, or [] when
    a parameter is FP8 (Megatron-Core quantizes those itself)."""
    from megatron.core.fp8_utils import is_float8tensor

    pairs = []
    for shard_groups, model_groups in ((opt.shard_fp32_from_float16_groups,
                                        opt.model_float16_groups),
                                       (opt.shard_fp32_groups, opt.model_fp32_groups)):
        for shard_group, model_group in zip(shard_groups, model_groups, strict=True):
            for shard, param in zip(shard_group, model_group, strict=True):
                if is_float8tensor(param):
                    return []
                world = opt._get_model_param_range_map(param)["gbuf_world_in_bucket"]
                gbuf, _, bucket = opt.model_param_gbuf_map[param]
                buffer = opt.buffers[gbuf].buckets[bucket].param_data
                pairs.append((buffer.view(-1)[world.start:world.end], shard))
    return pairs


def _cached_pairs(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``_shard_pairs``, built once per set of tensors: the views are kept while the main
    shards, the parameters and the buffers' storage tensors are the same objects (a reload
    that replaces any of them builds them again). Building them costs about 12 us a
    parameter of host time, while the GPU waits (1.5 ms of a LoRA step on an H200)."""
    key = (tuple(id(t) for groups in (opt.shard_fp32_from_float16_groups, opt.shard_fp32_groups,
                                      opt.model_float16_groups, opt.model_fp32_groups)
                 for group in groups for t in group),
           tuple(id(b.param_data) for buffer in opt.buffers for b in buffer.buckets))
    cached = getattr(opt, "_mbridge_copy_pairs", None)
    if cached is None or cached[0] != key:
        cached = (key, _shard_pairs(opt))
        opt._mbridge_copy_pairs = cached
    return cached[1]


def install() -> None:
    """Once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    global original
    original = DistributedOptimizer._copy_main_params_to_model_params

    def copy_main_params_to_model_params(self):
        try:
            special = (self.is_stub_optimizer or self.ddp_config.use_megatron_fsdp
                       or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
            pairs = [] if special else _cached_pairs(self)
        except (AttributeError, KeyError, TypeError, ValueError):  # other internals: its own code
            pairs = []
        if not pairs:
            return original(self)
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    DistributedOptimizer._copy_main_params_to_model_params = copy_main_params_to_model_params
