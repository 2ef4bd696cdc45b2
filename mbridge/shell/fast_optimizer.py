"""Megatron-Core's mixed-precision optimizers with fewer host stalls: the distributed
optimizer's per-parameter copy as one foreach copy, and the step's one host sync moved to
its end.

After each step ``DistributedOptimizer._copy_main_params_to_model_params`` copies every
parameter's updated float32 shard into the bf16/fp16 parameter buffer with its own
``copy_`` and a few Python lookups. With many small parameters (LoRA: 128 adapter tensors on
a 16-layer model; MoE experts: about 1,000) the GPU idles through that loop: on an H200 it
was 128 launches of a host-bound 6 ms optimizer step. ``install`` replaces it, where no FP8,
Megatron-FSDP or precision-aware path applies (those keep Megatron-Core's code), with the
same copies into the same slices as one ``torch._foreach_copy_``: the same rounding, so the
same bits (tests/test_fast_optimizer.py).

``MixedPrecisionOptimizer.step`` reads the gradient norm to the host (``.item()`` in
``get_grad_norm_fp32``) before it clips and updates, so the GPU idled while the host then
launched the clipping, Adam and the copy (about 5 ms of a 118 ms LoRA step on an H200, seen
in a trace). ``deferred_step`` computes the same norm on the device, clips by a coefficient
computed there (``max_norm / (sqrt(sq) + 1e-6)`` in float64, applied only where below 1, as
Megatron-Core does on the host), launches the update, and only then reads the norm it
returns (on CUDA from a pinned copy behind an event, so the host does not wait for the
update either): the same return values and the same bits (tests/test_fast_optimizer.py;
on a GPU tests/gpu/test_fast_optimizer_gpu.py). It applies
to the L2 norm with clipping on and no loss scaler, no zero counting and no FSDP /
decoupled gradients, on releases whose step is 0.16's (0.19 clips parameter groups by their
own norms: its own ``step`` runs there); anything else runs Megatron-Core's ``step``.
"""

from __future__ import annotations

import torch

_installed = False
original = None  # Megatron-Core's method, once installed
original_step = None  # Megatron-Core's MixedPrecisionOptimizer.step, once installed
original_chained_step = None  # and ChainedOptimizer.step


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


def _deferrable(opt) -> bool:
    cfg = opt.config
    ddp = getattr(opt, "ddp_config", None)
    return (hasattr(opt, "get_main_grads_for_grad_norm")
            and not hasattr(opt, "_compute_grad_norms_by_group")  # 0.19's per-group norms
            and opt.grad_scaler is None and not cfg.log_num_zeros_in_grad and cfg.timers is None
            and not cfg.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            and not (ddp is not None and ddp.use_megatron_fsdp))


def _norm_squared(opts, group) -> torch.Tensor:
    """``get_grad_norm_fp32``'s L2 branch up to its ``.item()``: the float32 sum of squares
    over the gradients that count in ``opts``, reduced over ``group``, on the device."""
    from megatron.core.optimizer import clip_grads

    grads = [g for o in opts for g in o.get_main_grads_for_grad_norm()]
    if grads:
        norm, _ = clip_grads.multi_tensor_applier(
            clip_grads.l2_norm_impl, torch.zeros(1, dtype=torch.int, device=grads[0].device),
            [grads], False)
    else:
        norm = torch.zeros(1, dtype=torch.float, device=_device())
    sq = norm ** 2.0
    torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    return sq


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def clip_on_device(grads: list[torch.Tensor], sq: torch.Tensor, max_norm: float) -> None:
    """Megatron-Core's ``clip_grad_by_total_norm_fp32`` with the norm still on the device:
    ``coeff = max_norm / (sqrt(sq) + 1e-6)`` in float64 (as the host computes it), the
    gradients multiplied by its float32 rounding where it is below 1 (by exactly 1 otherwise,
    which changes no bit; a NaN coefficient leaves them as they are, as on the host)."""
    if not grads:
        return
    coeff = max_norm / (sq.reshape(()).double().sqrt() + 1.0e-6)
    coeff = torch.where(coeff < 1.0, coeff, torch.ones_like(coeff)).float()
    torch._foreach_mul_(grads, coeff)


def _clip(opt, sq: torch.Tensor) -> None:
    if opt.config.clip_grad > 0.0:
        clip_on_device([p.grad.detach() for p in opt.get_parameters() if p.grad is not None],
                       sq, opt.config.clip_grad)


def _read_later(opt, sq: torch.Tensor):
    """Start copying ``sq`` to the host now; returns a function that gives the norm. On
    CUDA the copy goes to a pinned buffer and an event marks it, so reading it waits for
    the norm only, not for the update launched after it (the GPU keeps working through
    Adam while the host goes on to the next step); elsewhere ``.item()`` at the end."""
    if not sq.is_cuda:
        return lambda: sq.item() ** 0.5
    buf = getattr(opt, "_mbridge_norm_host", None)
    if buf is None or buf.dtype != sq.dtype:
        buf = opt._mbridge_norm_host = torch.empty(1, dtype=sq.dtype, pin_memory=True)
    buf.copy_(sq.reshape(1), non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> float:
        done.synchronize()
        return buf.item() ** 0.5

    return read


def deferred_step(self):
    """``MixedPrecisionOptimizer.step`` with its host sync at the end (module docstring)."""
    if self.is_stub_optimizer or not _deferrable(self) or self.config.clip_grad <= 0.0:
        return original_step(self)
    if self.prepare_grads():  # no loss scaler here: never True, but as Megatron-Core does
        return False, None, None
    sq = _norm_squared([self], self.get_grad_stats_parallel_group())
    norm = _read_later(self, sq)
    _clip(self, sq)
    success = self.step_with_ready_grads()
    return success, norm(), 0


def deferred_chained_step(self):
    """``ChainedOptimizer.step`` (what ``get_megatron_optimizer`` returns) likewise: one norm
    over every optimizer's gradients where they share the grad-stats group (or there is one
    optimizer), each optimizer clipped by it."""
    opts = [o for o in self.chained_optimizers if not getattr(o, "is_stub_optimizer", False)]
    if not (opts and all(_deferrable(o) for o in opts) and not self.config.log_num_zeros_in_grad
            and (len(self.chained_optimizers) == 1
                 or self.grads_states_parallel_group_is_shared())):
        return original_chained_step(self)
    if self.prepare_grads():
        return False, None, None
    sq = _norm_squared(self.chained_optimizers,
                       self.chained_optimizers[0].get_grad_stats_parallel_group())
    norm = _read_later(self, sq)
    for o in opts:
        if o.get_parameters():
            _clip(o, sq)
    success = self.step_with_ready_grads()
    return success, norm(), None


def install() -> None:
    """Once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, MixedPrecisionOptimizer

    global original, original_step, original_chained_step
    original_step = MixedPrecisionOptimizer.step
    MixedPrecisionOptimizer.step = torch.no_grad()(deferred_step)
    original_chained_step = ChainedOptimizer.step
    ChainedOptimizer.step = torch.no_grad()(deferred_chained_step)
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


def use_fused_adam(optimizer) -> int:
    """Adam/AdamW of a Megatron-Core optimizer (chained or not) over CUDA parameters as
    torch's fused kernel (one launch reading and writing each tensor once) instead of its
    default foreach kernels (about ten passes over the moments and main parameters: at 1B
    that was some 20 ms of each step on an H200), where Apex and TE, whose fused Adam
    Megatron-Core would take, are absent. The same update up to float32 rounding (the fused
    kernel orders its arithmetic its own way: tests/gpu/test_fast_optimizer_gpu.py).
    Parameters on the CPU keep the foreach kernels. The fused kernel takes each parameter's
    step count as a float32 tensor on the parameter's device: state already there (a
    resumed run's, restored on the host) is moved. Call it again after loading a state.
    Returns the parameter groups switched."""
    switched = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if type(torch_opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # Apex's or TE's fused Adam, SGD, or none (a stub)
        for group in torch_opt.param_groups:
            if not group["params"] or not all(p.is_cuda for p in group["params"]):
                continue
            if not group.get("fused"):
                group.update(fused=True, foreach=False)
                switched += 1
            for p in group["params"]:
                fused_step_on_device(torch_opt.state.get(p), p)
    return switched


def fused_step_on_device(state: dict | None, param: torch.Tensor) -> None:
    """A parameter's Adam ``step`` where torch's fused kernel reads it: a float32 tensor on
    the parameter's device (torch keeps it on the host for its foreach kernels)."""
    step = (state or {}).get("step")
    if isinstance(step, torch.Tensor) and (step.device != param.device
                                           or step.dtype != torch.float32):
        state["step"] = step.to(param.device, torch.float32)
