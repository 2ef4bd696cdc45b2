"""``MegatronRuntime``: the ``mbridge.train.step.Runtime`` protocol bound to Megatron-Core.

Model chunks come from ``shell.model.provide`` on the run's process groups (``dist.Groups``)
with weights from ``shell.weights`` (an HF or distributed checkpoint) or random init, wrapped
in Megatron-Core DDP; the optimizer is ``get_megatron_optimizer`` (Adam or SGD, fp32
master weights, the distributed optimizer when ``optimizer.use_distributed_optimizer``);
forward and backward run through ``get_forward_backward_func`` (no pipelining, 1F1B or
interleaved 1F1B as the parallel sizes say) with a per-token loss
(``calculate_per_token_loss``), so losses and gradients are token-weighted means over the
whole global batch whatever the layout. Device-agnostic: NCCL + CUDA when present, gloo +
CPU otherwise (then through ``cpu_shim.cuda_as_cpu``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as tdist

from mbridge import keys
from mbridge.adapters.spec import AdapterSpec
from mbridge.shell import adapters, fast_optimizer
from mbridge.shell.cpu_shim import cuda_as_cpu
from mbridge.shell.dist import Groups
from mbridge.shell.forward import packed_seq_params
from mbridge.shell.model import provide
from mbridge.shell.vlm import language_model
from mbridge.specs import ModelSpec
from mbridge.train.config import ModelConfig, OptimizerConfig, ParallelConfig
from mbridge.train.plan import RunPlan
from mbridge.train.step import GradStats, LossSum

DTYPES = {"fp32": "float32", "bf16_mixed": "bfloat16", "fp16_mixed": "float16"}


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token loss sum, token count, and both for reporting (Megatron-LM's 3-tuple)."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(output.float().reshape(-1) * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}


def freeze(chunks: list, *, model: ModelConfig) -> None:
    """A pre-wrap hook: the parts ``model.freeze_*`` name keep their loaded values (no
    gradient; DDP and the optimizer leave them out). Parts by mcore name (``keys``): the
    vision tower, its projection, everything else (the language model)."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            part = keys.vision_part(name) or "language_model"
            if getattr(model, f"freeze_{part}"):
                param.requires_grad_(False)


def stack_moe_experts(chunks: list, *, fuse: bool) -> None:
    """A pre-wrap hook (``model.moe_stacked_experts``): every MoE layer's experts held as one
    parameter per linear (``experts.stack_experts``; ``fuse``: their weight gradients added
    into DDP's buffer by the backward). ConfigError where a layer's experts cannot be."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mbridge.shell.experts import GroupedSequentialMLP, stack_experts
    from mbridge.train.config import ConfigError

    stack_experts(chunks, fuse_wgrad_accumulation=fuse)
    kept = [type(m.experts).__name__ for c in chunks for m in c.modules()
            if isinstance(m, MoELayer) and not (isinstance(m.experts, GroupedSequentialMLP)
                                                and m.experts.stacked)]
    if kept:
        raise ConfigError(
            f"model.moe_stacked_experts=true, but the experts of {len(kept)} MoE layers "
            f"({kept[0]}) cannot be stacked: Transformer Engine's grouped experts, experts "
            "with biases (GPT-OSS), with LoRA/DoRA adapters, fp8 or a single expert keep "
            "their own parameters; set model.moe_stacked_experts=false")


def sorted_moe_dispatch(chunk, *, required: bool) -> int:
    """``dispatch.use_sorted_dispatch`` on every MoE layer of ``chunk`` it serves (the
    static-shape dispatcher: no host sync; the same routing and sums as Megatron-Core's);
    ``required`` (``model.moe_sorted_dispatch=true``): ConfigError naming why a layer it
    cannot serve. Returns how many layers it swapped."""
    from mbridge.shell.dispatch import unserved, use_sorted_dispatch
    from mbridge.train.config import ConfigError

    if required and (why := unserved(chunk)):
        raise ConfigError(f"model.moe_sorted_dispatch=true, but a MoE layer cannot take it: "
                          f"{why[0]}; leave model.moe_sorted_dispatch null")
    return use_sorted_dispatch(chunk)


def _p2p_settings(plan: RunPlan) -> dict:
    """Interleaved pipelining overlaps its sends and receives (Megatron-LM's default), which
    also makes PP=2 correct: batched P2P there sends to "next" and "prev" on the same peer in
    one batch, which gloo (and NCCL) match in posting order, swapping same-shaped activations
    and gradients; the unbatched path puts the two directions on different groups."""
    interleaved = plan.parallel.vpp is not None
    return dict(overlap_p2p_comm=interleaved, batch_p2p_comm=not interleaved)


def megatron_optimizer(o, dtype: str, chunks, **kwargs):
    """Megatron-Core's optimizer for the run config's ``optimizer`` section ``o`` over the
    model ``chunks`` with ``dtype`` parameters (``kwargs`` to ``get_megatron_optimizer``),
    Adam as torch's fused kernel on CUDA where Apex/TE are absent (one kernel, not ten)."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    config = McoreOptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum, clip_grad=o.clip_grad,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", params_dtype=getattr(torch, dtype),
        use_distributed_optimizer=o.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, chunks, **kwargs)
    fast_optimizer.use_fused_adam(optimizer)
    return optimizer


class MegatronRuntime:
    """Owns the model chunks and the optimizer; implements the training Runtime protocol."""

    def __init__(self, spec: ModelSpec, plan: RunPlan, groups: Groups, *, model: ModelConfig,
                 optimizer: OptimizerConfig, ddp: ParallelConfig, mixed_precision: str,
                 micro_batch_size: int, weights=None, peft: AdapterSpec | None = None,
                 seed: int = 0, forward_step=None):
        """Build the model on ``groups`` at ``plan.parallel`` (weights loaded from ``weights``,
        a ``shell.weights`` source, or random init) and its optimizer. Takes the run config's
        ``model``, ``optimizer`` and ``parallel`` (DDP) sections, ``mixed_precision`` and
        ``train.micro_batch_size``: nothing else of it. ``peft``: LoRA/DoRA adapters added
        before DDP wrapping (drawn from ``seed``); the base is frozen, so DDP and the
        optimizer hold the adapters only."""
        self.spec, self.plan, self.groups = spec, plan, groups
        self.model_cfg, self.optim_cfg, self.ddp_cfg = model, optimizer, ddp
        self.micro_batch_size = micro_batch_size
        self.forward_step = forward_step or self._forward_step  # Megatron-Core's contract
        m = model
        dtype = DTYPES[mixed_precision]
        extra = dict(calculate_per_token_loss=True, init_method_std=m.init_method_std,
                     hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
                     sequence_parallel=m.sequence_parallel, **_p2p_settings(plan))
        hook = [partial(freeze, model=model)]
        if peft is not None:
            hook.append(partial(adapters.apply, adapter=peft, spec=spec, seed=seed))
        if m.moe_stacked_experts:  # after the adapters: experts carrying one stay per expert
            hook.append(partial(stack_moe_experts, fuse=m.moe_fuse_wgrad_accumulation))
        self.peft = peft
        self.model = provide(spec, plan.parallel, groups, weights=weights, dtype=dtype,
                             config_extra=extra, wrap_with_ddp=True,
                             ddp_config=self._ddp_config(), pre_wrap_hook=hook)
        self._speed_up(m)
        self.config = self.model[0].config
        self._bind_sync_funcs()
        with cuda_as_cpu():
            self.optimizer = self._build_optimizer(dtype)
        self.config.grad_scale_func = self.optimizer.scale_loss  # fp16 loss scaling

    def _speed_up(self, m) -> None:
        """The one-GPU fast path the run config asks for (benchmarks/train_throughput.py,
        benchmarks/moe_throughput.py)."""
        from mbridge.shell.fast_layers import (
            compile_layers,
            fuse_output_wgrad,
            use_fused_cross_entropy,
        )

        fused = m.compiled_cross_entropy
        if fused is None:
            fused = torch.cuda.is_available() and m.tensor_model_parallel_size == 1
        fuse_out = m.output_gradient_accumulation_fusion
        if fuse_out is None:
            fuse_out = torch.cuda.is_available()
        for chunk in self.model:
            if m.moe_sorted_dispatch is not False:  # before compiling: the layers change
                sorted_moe_dispatch(chunk, required=m.moe_sorted_dispatch is True)
            gpt = language_model(chunk.module)
            if fused and gpt.post_process:
                use_fused_cross_entropy(gpt)
            if fuse_out and gpt.post_process and not fuse_output_wgrad(gpt) \
                    and m.output_gradient_accumulation_fusion:
                raise ValueError("model.output_gradient_accumulation_fusion=true needs an "
                                 "output layer of its own that is trained (this one is tied "
                                 "to the embedding or frozen)")
            if m.compile_layers:
                compile_layers(gpt)

    def _ddp_config(self):
        from megatron.core.distributed import DistributedDataParallelConfig

        p = self.ddp_cfg
        return DistributedDataParallelConfig(
            grad_reduce_in_fp32=p.grad_reduce_in_fp32, overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather, bucket_size=p.bucket_size,
            use_distributed_optimizer=self.optim_cfg.use_distributed_optimizer)

    def _bind_sync_funcs(self) -> None:
        """Gradient finalisation and overlap hooks, as Megatron-LM's ``training.py`` sets them."""
        from megatron.core.distributed import finalize_model_grads

        c, ddp = self.config, self.model[0].ddp_config
        c.finalize_model_grads_func = finalize_model_grads
        one = len(self.model) == 1
        if ddp.overlap_grad_reduce:
            funcs = [m.no_sync for m in self.model]
            c.no_sync_func = funcs[0] if one else funcs
            c.grad_sync_func = [m.start_grad_sync for m in self.model]
            c.grad_sync_func = c.grad_sync_func[0] if one else c.grad_sync_func
        if ddp.overlap_param_gather:
            c.param_sync_func = [m.start_param_sync for m in self.model]
            c.param_sync_func = c.param_sync_func[0] if one else c.param_sync_func

    def _build_optimizer(self, dtype: str):
        return megatron_optimizer(self.optim_cfg, dtype, self.model)

    # ---- the Runtime protocol -------------------------------------------------------------

    def forward_backward(self, batch, *, seed: int) -> LossSum:
        self._reseed(seed)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self._run(batch, forward_only=False)

    def grad_stats(self) -> GradStats:
        with cuda_as_cpu():
            found_inf = bool(self.optimizer.prepare_grads())
            norm = self.optimizer.get_grad_norm()
        return GradStats(norm=float("inf") if norm is None else float(norm), found_inf=found_inf)

    def apply_update(self, *, lr: float, weight_decay: float, clip_coeff: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
        if clip_coeff < 1.0:
            grads = [p.grad for p in self._main_params() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, clip_coeff)
        with cuda_as_cpu():
            self.optimizer.step_with_ready_grads()

    def skip_update(self) -> None:
        """Nothing to undo: gradients are zeroed at the start of the next step."""

    def loss_scale(self) -> float:
        with cuda_as_cpu():
            return float(self.optimizer.get_loss_scale())

    # ---- evaluation and helpers -----------------------------------------------------------

    def evaluate(self, batches) -> LossSum:
        """Token-weighted mean loss over ``batches`` (each a list of micro-batches)."""
        for chunk in self.model:
            chunk.eval()
        total, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for batch in batches:
                    out = self._run(batch, forward_only=True)
                    total, tokens = total + out.total, tokens + out.tokens
        finally:
            for chunk in self.model:
                chunk.train()
        return LossSum(total=total, tokens=tokens)

    def _main_params(self):
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            yield from opt.get_parameters()

    def _reseed(self, seed: int) -> None:
        from mbridge.shell.dist import set_random_seed

        set_random_seed(seed, self.groups)

    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        if self.plan.parallel.cp > 1:
            from megatron.core.utils import get_batch_on_this_cp_rank

            mb = get_batch_on_this_cp_rank(dict(mb))
        extra = {}
        if "cu_seqlens" in mb:  # packed documents: attention and rope stay inside each
            extra["packed_seq_params"] = packed_seq_params(
                mb["cu_seqlens"], self.groups.collection.cp, device=mb["tokens"].device)
        for name in ("pixel_values", "image_grid_thw"):  # a vision-language model's images
            if name in mb:  # (the first stage reads the pixels, every stage the grids)
                extra[name] = mb[name]
        output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"], **extra)
        return output, partial(_loss_func, mb["loss_mask"])

    def _run(self, batch, *, forward_only: bool) -> LossSum:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        device = next(self.model[0].parameters()).device
        # the boundaries stay on the host: packed_seq_params reads them there, no sync
        batch = [{k: v if k == "cu_seqlens" else v.to(device, non_blocking=True)
                  for k, v in mb.items()} for mb in batch]
        iterators = [iter(batch) for _ in self.model]
        with cuda_as_cpu():
            outputs = get_forward_backward_func()(
                forward_step_func=self.forward_step,
                data_iterator=iterators if len(self.model) > 1 else iterators[0],
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=len(batch), seq_length=self.model_cfg.seq_length,
                micro_batch_size=self.micro_batch_size, forward_only=forward_only)
        summed = torch.zeros(2, dtype=torch.float64, device=device)
        for out in outputs or []:
            summed += out["lm loss"].to(torch.float64)
        # Only the last pipeline stage has losses: sum over the pipeline, then over data
        # (and context) parallel ranks, so every rank reports the global batch's loss.
        tdist.all_reduce(summed, group=self.groups.pp)
        tdist.all_reduce(summed, group=self.groups.collection.dp_cp)
        return LossSum(total=float(summed[0]), tokens=int(summed[1]))
