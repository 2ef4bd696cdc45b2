"""A token dispatcher with no host sync, for MoE layers at expert-parallel size 1 and
expert-tensor-parallel size 1 (one GPU; or TP/DP without expert sharding).

At EP = expert-TP = 1 no token leaves its rank, yet Megatron-Core's dispatchers still read
the routing back to the host: the all-to-all dispatcher copies ``tokens_per_expert`` to the
host and waits for it (``_maybe_dtoh_and_synchronize``, before permutation 2 when there are
several local experts) and sorts its chunks by host-side split sizes; the all-gather one
calls ``tokens_per_expert.cpu()``; and both permute with ``masked_select`` (``moe_utils.
permute``), whose output size the host must learn first. Each is a device-to-host sync per
layer and per pass, which stalls the launch queue.

``SortedTokenDispatcher`` makes the same permutation with static shapes. Dropless top-k
routing sends every token to exactly ``k`` experts, so ``T * k`` rows are dispatched; the
True entries of ``routing_map.T`` in flat order (what ``masked_select`` picks: expert-major,
tokens ascending within an expert) are the first ``T * k`` of a stable argsort of its
complement. Rows are gathered with ``index_select`` as ``permute`` does, probabilities from
the same positions, and ``tokens_per_expert`` stays on the device (the grouped experts take
``offs = cumsum`` there). Both sums over a token's ``k`` rows, the combine's forward and the
dispatch gather's backward, are gathers of each token's rows added in the rows' order
(``gather_sum``) instead of Megatron-Core's ``scatter_add``/``index_add`` (GPU atomics, 8 rows
into a token, 1.2 ms a layer-pass at the Qwen3-30B-A3B shape): on the CPU the same sums in
the same order, bit for bit; on the GPU deterministic, and one fused kernel in a compiled
layer, which sums in fp32. Router, aux losses and experts are unchanged, so outputs and
gradients equal Megatron-Core's (tests/moe/test_moe_dispatch.py).

``use_sorted_dispatch(model)`` swaps it into every MoE layer where it applies; layers it
does not serve (EP or expert-TP > 1, token dropping or capacity padding, quantization
padding, shared experts overlapped inside the dispatcher, fused permutes, CUDA graphs)
keep Megatron-Core's dispatcher.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


def sorted_routes(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """Flat positions ``expert * T + token`` of the True entries of ``routing_map``
    [T, E], expert-major and tokens ascending within an expert, as ``masked_select`` over
    ``routing_map.T`` orders them: [T * topk], with no host sync (each row holds ``topk``
    True entries)."""
    tokens = routing_map.shape[0]
    unrouted = routing_map.T.reshape(-1).logical_not().to(torch.uint8)
    return torch.argsort(unrouted, stable=True)[: tokens * topk]


def gather_sum(rows: torch.Tensor, by_token: torch.Tensor) -> torch.Tensor:
    """``out[t] = rows[by_token[t, 0]] + rows[by_token[t, 1]] + ...``, added left to right
    (``scatter_add``'s order on the CPU when ``by_token[t]`` ascends): [T, H]."""
    out = rows.index_select(0, by_token[:, 0])
    for j in range(1, by_token.shape[1]):
        out = out + rows.index_select(0, by_token[:, j])
    return out


class _Permute(torch.autograd.Function):
    """``tokens[token]``: each token's row repeated for its ``k`` routes; the backward sums
    a token's ``k`` row gradients with ``gather_sum`` (``index_select``'s own backward is
    an ``index_add``)."""

    @staticmethod
    def forward(ctx, tokens, token, by_token):
        ctx.save_for_backward(by_token)
        return tokens.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        by_token, = ctx.saved_tensors
        return gather_sum(grad, by_token), None, None


class _Unpermute(torch.autograd.Function):
    """The combine: a token's ``k`` expert rows summed (``gather_sum``); the backward hands
    each row its token's gradient (a gather)."""

    @staticmethod
    def forward(ctx, rows, token, by_token):
        ctx.save_for_backward(token)
        return gather_sum(rows, by_token)

    @staticmethod
    def backward(ctx, grad):
        token, = ctx.saved_tensors
        return grad.index_select(0, token), None, None


class SortedTokenDispatcher(MoETokenDispatcher):
    """Megatron-Core's dispatch at EP = expert-TP = 1 with static shapes (module
    docstring). Same constructor as Megatron-Core's dispatchers."""

    def __init__(self, num_local_experts: int, local_expert_indices: list[int], config,
                 pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(f"SortedTokenDispatcher serves expert-parallel size 1 and "
                             f"expert-tensor-parallel size 1, not EP={self.ep_size}, "
                             f"expert-TP={self.tp_size}")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.topk = config.moe_router_topk

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor):
        """Tokens [S, B, H] and probs [T, E] -> rows [T * k, H] sorted by expert, and their
        probabilities [T * k]."""
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, self.hidden_shape[-1])
        n, experts = routing_map.shape
        flat = sorted_routes(routing_map, self.topk)
        expert, token = flat // n, flat % n
        # row r serves token[r]; a token's k rows, in row order (experts ascending)
        self.token = token
        self.by_token = torch.argsort(token, stable=True).view(n, self.topk)
        self.tokens_per_expert = routing_map.sum(dim=0).long()
        permuted_probs = probs.reshape(-1).index_select(0, token * experts + expert)
        return _Permute.apply(tokens, token, self.by_token), permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert rows [T * k, H] summed back into their tokens: [S, B, H]."""
        out = _Unpermute.apply(hidden_states, self.token, self.by_token)
        self.token = self.by_token = None
        return out.view(self.hidden_shape)


def serves(config, ep_size: int, expert_tp_size: int) -> str | None:
    """Why ``SortedTokenDispatcher`` cannot replace this layer's dispatcher, or None."""
    reasons = {
        "expert-parallel size > 1": ep_size != 1,
        "expert-tensor-parallel size > 1": expert_tp_size != 1,
        "token dropping (moe_expert_capacity_factor)": config.moe_expert_capacity_factor
        is not None,
        "capacity padding": config.moe_pad_expert_input_to_capacity,
        "quantization padding": config.moe_router_padding_for_quantization,
        "shared experts overlapped in the dispatcher": config.moe_shared_expert_overlap,
        "fused permutes (Transformer Engine)": config.moe_permute_fusion,
        "CUDA graphs": getattr(config, "cuda_graph_impl", "none") != "none",
        "flex dispatcher": config.moe_token_dispatcher_type == "flex",
    }
    return next((why for why, hit in reasons.items() if hit), None)


def _unswapped(model: torch.nn.Module):
    """(layer, why it cannot be served or None) for every MoE layer of ``model`` without a
    ``SortedTokenDispatcher``."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for layer in model.modules():
        old = getattr(layer, "token_dispatcher", None)
        if isinstance(layer, MoELayer) and not isinstance(old, SortedTokenDispatcher):
            yield layer, serves(layer.config, old.ep_size, old.tp_size)


def unserved(model: torch.nn.Module) -> list[str]:
    """Why ``use_sorted_dispatch`` leaves each MoE layer of ``model`` it leaves."""
    return [why for _, why in _unswapped(model) if why is not None]


def use_sorted_dispatch(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` (a GPTModel chunk, DDP-wrapped or not) that it
    serves a ``SortedTokenDispatcher``; returns how many layers it swapped."""
    swapped = 0
    for layer, why in list(_unswapped(model)):
        if why is not None:
            continue
        old = layer.token_dispatcher
        layer.token_dispatcher = SortedTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, config=layer.config,
            pg_collection=SimpleNamespace(  # the groups the base class reads
                ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group))
        swapped += 1
    return swapped

