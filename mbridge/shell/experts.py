"""Grouped-GEMM experts without Transformer Engine.

Megatron-Core's local spec runs an MoE layer's experts as ``SequentialMLP``: a Python loop of
two matrix products per expert (128 experts: 256 small GEMMs and a host sync per layer), and
its grouped variants need TE (``TEGroupedMLP``) or the ``grouped_gemm`` extension
(``GroupedMLP``). ``GroupedSequentialMLP`` keeps everything of ``SequentialMLP`` except the
forward: the same ``local_experts.{j}.linear_fc{1,2}`` parameters (so conversion, distributed
checkpoints, tensor-parallel attributes and DDP see exactly what they see for SequentialMLP),
the same router and token dispatcher before it (tokens arrive sorted by local expert, with
``tokens_per_expert`` counts), and one grouped product per linear over all local experts:
``torch._grouped_mm`` on CUDA with bf16 on Hopper or newer, a loop over the experts
elsewhere (CPU, other dtypes: one custom op, ``mbridge::looped_mm``, so that a compiled layer
keeps it in its graph). ``tokens_per_expert`` may live on the host or the device (the
static-shape dispatcher of shell/dispatch.py keeps it there: no host sync on the grouped
path). The weights are stacked per forward (one copy, about 10% of
the experts' time at the Qwen3-30B-A3B shape); the activation, per-token probabilities and
biases follow ``MLP.forward``'s unfused path line by line.

``stack_experts`` (a pre-wrap hook, opt-in) holds each linear's expert weights as one
parameter ``weight{1,2}`` [E, out, in] instead, so the forward stacks nothing and DDP, the
clipping norm and Adam see 2 expert parameters a layer instead of 2E; ``state_dict``,
``sharded_state_dict`` and ``load_state_dict`` still show ``local_experts.{j}.linear_fc{i}.
weight`` (views of it), so conversion and checkpoints read and write what they did
(tests/moe/test_moe_stacked.py). Optimizer-state distributed checkpoints of a stacked model
are not covered by tests.

Stacked experts under Megatron-Core's DDP add their weight gradients into the gradient
buffer (``main_grad``) in the backward's GEMM, as Megatron-Core's gradient-accumulation
fusion does for its linears with TE or Apex (``MainGradGroupedLinear``; shell/wgrad.py: a
Triton kernel on CUDA); DDP's hook then has no add to do. Opt-in
(``stack_experts(chunks, fuse_wgrad_accumulation=True)``, or the attribute on a module): the
kernel is checked under Triton's interpreter and its bookkeeping bit for bit on the CPU, but
it has not yet run on a GPU. Off, autograd's gradient and the hook's add stay.

Expert linears take no tensor-parallel collective here: Megatron-Core marks an expert's
linears ``explicit_expert_comm`` when EP or expert-TP > 1 (the dispatcher does the
communication), and at EP = expert-TP = 1 they have none to do. Experts with a LoRA/DoRA
adapter run ``SequentialMLP``'s per-expert loop, which calls each linear and so its hook.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from mbridge.shell.wgrad import accumulate_grouped_wgrad, group_counts, looped_wgrad


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` serves these inputs: CUDA, bf16, compute capability 9.0
    or newer (the kernel torch ships is Hopper's), and a torch that has it."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and _hopper_or_newer(x.device.index))


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as a constant
def _hopper_or_newer(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[j-1]:offs[j]`` of ``x`` [T, k] times ``w[j]`` [k, n], as one [T, n] tensor.
    ``torch._grouped_mm`` where usable, else ``looped_mm`` (one product per group)."""
    if grouped_mm_usable(x) and x.shape[0] > 0:
        out = torch._grouped_mm(x, w, offs=offs)
        if out.requires_grad and not torch.compiler.is_compiling():
            # its backward rejects a broadcast gradient (stride 0, seen); a compiled graph
            # hands it the gradient its own kernels wrote
            out.register_hook(lambda grad: grad.contiguous())
        return out
    return looped_mm(x, w, offs)


@torch.library.custom_op("mbridge::looped_mm", mutates_args=())
def looped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``grouped_mm`` as a loop of products: [T, k] x [G, k, n] -> [T, n]. One opaque op, so
    a compiled graph keeps it whole (the group sizes it reads on the host are its own)."""
    parts = torch.split(x, group_counts(offs))
    return torch.cat([p @ w[j] for j, p in enumerate(parts)], dim=0)


@torch.library.custom_op("mbridge::looped_mm_wgrad", mutates_args=())
def looped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``looped_mm``: ``x_j^T @ grad_j`` per group, [G, k, n]."""
    return looped_wgrad(x, grad, offs)


@looped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@looped_mm_wgrad.register_fake
def _(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _looped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _looped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    dx = looped_mm(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = looped_mm_wgrad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


looped_mm.register_autograd(_looped_mm_backward, setup_context=_looped_mm_setup)


def per_token(rows: torch.Tensor, offs: torch.Tensor, total: int) -> torch.Tensor:
    """``rows[j]`` repeated for each of group ``j``'s tokens: [T, n] (no host sync)."""
    expert = torch.searchsorted(offs, torch.arange(total, device=offs.device, dtype=offs.dtype),
                                right=True)
    return rows[expert]


class GroupedSequentialMLP(SequentialMLP):
    """``SequentialMLP`` with its experts' products grouped (module docstring)."""

    # stacked under DDP: weight gradients added into main_grad by the backward (opt-in:
    # ``stack_experts(chunks, fuse_wgrad_accumulation=True)``; its speed is unmeasured)
    fuse_wgrad_accumulation = False

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        cfg = self.config
        if cfg.fp8 or cfg.fp4 or self.num_local_experts == 1 or self._hooked():
            if self.stacked:
                raise NotImplementedError("stacked experts (stack_experts) run the grouped "
                                          "path only: no adapters, fp8 or single expert")
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        x, probs = permuted_local_hidden_states, permuted_probs
        if cfg.moe_apply_probs_on_input:  # as SequentialMLP
            assert cfg.moe_router_topk == 1, \
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
        fc1 = [e.linear_fc1 for e in self.local_experts]
        fc2 = [e.linear_fc2 for e in self.local_experts]
        h = self._linear(1, x, offs)
        if fc1[0].bias is not None:
            h = h + per_token(torch.stack([m.bias for m in fc1]), offs, x.shape[0])
        h = self._activation(h, probs)
        out = self._linear(2, h, offs)
        if fc2[0].bias is not None:  # MLP.forward: an expert's bias is scaled by its prob
            bias = per_token(torch.stack([m.bias for m in fc2]), offs, x.shape[0])
            out = (out + bias * probs.unsqueeze(-1)).to(out.dtype)
        return out, None

    def _linear(self, i: int, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """``linear_fc{i}`` of every expert over its rows. A stacked weight under
        Megatron-Core's DDP (``main_grad``) adds its gradient into ``main_grad`` in its
        backward (``MainGradGroupedLinear``; outside a compiled graph) unless
        ``fuse_wgrad_accumulation`` is off."""
        w = self._weights(i)  # [E, out, in]
        if (self.fuse_wgrad_accumulation and self.stacked and w.requires_grad
                and torch.is_grad_enabled() and hasattr(w, "main_grad")
                and hasattr(w, "grad_added_to_main_grad")):
            return _main_grad_linear(x, w, offs)
        return grouped_mm(x, w.transpose(1, 2), offs)

    @property
    def stacked(self) -> bool:
        """Whether the experts' weights are held stacked (``stack_experts``)."""
        return "weight1" in self._parameters

    def _weights(self, i: int) -> torch.Tensor:
        """``linear_fc{i}``'s weights of all local experts, [E, out, in]: the stacked
        parameter, or a stack (a copy) of the per-expert ones."""
        if self.stacked:
            return self._parameters[f"weight{i}"]
        return torch.stack([getattr(e, f"linear_fc{i}").weight for e in self.local_experts])

    def stack(self) -> bool:
        """Hold each linear's expert weights as one parameter ``weight{i}`` [E, out, in]
        (its tensor-parallel attributes those of an expert's weight, the split dim moved
        past the expert dim), presented per expert (``local_experts.{j}.linear_fc{i}.
        weight``, views of it) by ``state_dict``, ``sharded_state_dict`` and
        ``load_state_dict``. Only where the grouped path is all there is: EP = expert-TP = 1,
        no biases, adapters, fp8 or single expert. Returns whether it stacked."""
        cfg, linears = self.config, [(e.linear_fc1, e.linear_fc2) for e in self.local_experts]
        if (self.stacked or cfg.fp8 or cfg.fp4 or self.num_local_experts == 1
                or self._hooked() or self.ep_group.size() != 1 or self.tp_group.size() != 1
                or any(m.bias is not None for pair in linears for m in pair)):
            return False
        for i in (1, 2):
            per_expert = [pair[i - 1] for pair in linears]
            first = per_expert[0].weight
            stacked = torch.nn.Parameter(torch.stack([m.weight.detach() for m in per_expert]),
                                         requires_grad=first.requires_grad)
            for attr, value in vars(first).items():  # tensor_model_parallel, allreduce, ...
                setattr(stacked, attr, value)
            if hasattr(first, "partition_dim"):
                stacked.partition_dim = first.partition_dim + 1
            self.register_parameter(f"weight{i}", stacked)
            for j, m in enumerate(per_expert):
                m.register_parameter("weight", None)  # state_dict skips it; the hook adds
                m.register_state_dict_post_hook(_expert_view(self, i, j))
        self.register_state_dict_post_hook(_drop_stacked)
        self.register_load_state_dict_pre_hook(_load_per_expert)
        return True

    def _hooked(self) -> bool:
        """Whether an expert linear carries an adapter (``shell/adapters.py``: a submodule
        ``adapter`` and a forward hook), which only the per-expert loop runs. Other hooks
        (DDP's forward pre-hooks with ``overlap_param_gather``) keep the grouped path."""
        return any("adapter" in m._modules for e in self.local_experts
                   for m in (e.linear_fc1, e.linear_fc2))

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``MLP.forward``'s unfused activation with ``per_token_scale=probs``."""
        cfg = self.config
        if cfg.gated_linear_unit:
            x_glu, x_linear = torch.chunk(h, 2, dim=-1)
            if (val := cfg.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            h = cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)
        else:
            h = cfg.activation_func(h)
        return (h * probs.unsqueeze(-1)).to(h.dtype)


class MainGradGroupedLinear(torch.autograd.Function):
    """``x_e @ weight[e].T`` over each expert's rows (``weight`` [E, out, in], a stacked
    parameter under Megatron-Core's DDP) whose backward adds the weight gradient into
    ``weight.main_grad`` in the GEMM (``wgrad.accumulate_grouped_wgrad``) and gives autograd
    a placeholder, with ``grad_added_to_main_grad`` set so that DDP's hook skips its add:
    Megatron-Core's gradient-accumulation fusion (``LinearWithGradAccumulationAndAsync
    Communication``), grouped. The placeholder still reaches the parameter, so DDP's hook
    runs (and with ``overlap_grad_reduce`` marks the bucket ready)."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        ctx.save_for_backward(x, offs)
        ctx.weight = weight
        return grouped_mm(x, weight.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, grad):
        x, offs = ctx.saved_tensors
        weight = ctx.weight
        grad = grad.contiguous()
        dx = grouped_mm(grad, weight, offs) if ctx.needs_input_grad[0] else None
        accumulate_grouped_wgrad(weight.main_grad, grad, x, offs)
        weight.grad_added_to_main_grad = True
        zero = getattr(weight, "zero_out_wgrad", False)  # as Megatron-Core's linear
        return dx, (torch.zeros_like if zero else torch.empty_like)(weight), None


@torch.compiler.disable  # a compiled layer calls out here: the backward writes main_grad
def _main_grad_linear(x, weight, offs):
    return MainGradGroupedLinear.apply(x, weight, offs)


def _expert_view(owner: GroupedSequentialMLP, i: int, j: int):
    """A state-dict hook of expert ``j``'s ``linear_fc{i}``: its ``weight`` entry, a view of
    the stacked parameter (detached, as ``state_dict`` gives; it shares the storage, so a
    distributed checkpoint loads into it in place)."""

    def hook(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "weight"] = owner._parameters[f"weight{i}"].detach()[j]
        if prefix + "_extra_state" in state_dict:  # the weight first, as the module has it
            state_dict.move_to_end(prefix + "_extra_state")

    return hook


def _drop_stacked(module, state_dict, prefix, local_metadata):
    """The stacked parameters leave the state dict (the experts' views name them)."""
    for i in (1, 2):
        state_dict.pop(f"{prefix}weight{i}", None)


def _load_per_expert(module, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs):
    """``load_state_dict``: the per-expert weights, stacked, load into ``weight{i}``."""
    for i in (1, 2):
        names = [f"{prefix}local_experts.{j}.linear_fc{i}.weight"
                 for j in range(module.num_local_experts)]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}weight{i}"] = torch.stack([state_dict.pop(n) for n in names])


def stack_experts(chunks, fuse_wgrad_accumulation: bool = False) -> None:
    """A pre-wrap hook (``provide_distributed_model(pre_wrap_hook=stack_experts)``: before
    DDP, whose buffers then hold one parameter per linear per layer): stack the grouped
    experts' weights wherever ``GroupedSequentialMLP.stack`` applies (``.stacked`` says).
    ``fuse_wgrad_accumulation``: the stacked weights' gradients go into DDP's buffer in the
    backward (module docstring; ``functools.partial`` makes the hook)."""
    for m in (m for c in chunks for m in c.modules() if isinstance(m, GroupedSequentialMLP)):
        if m.stack():
            m.fuse_wgrad_accumulation = fuse_wgrad_accumulation
