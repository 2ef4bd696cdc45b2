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
the same positions, ``tokens_per_expert`` stays on the device (the grouped experts take
``offs = cumsum`` there), and the combine is Megatron-Core's own ``unpermute`` (a
``scatter_add``). Router, aux losses and experts are unchanged, so outputs and gradients
equal Megatron-Core's (tests/moe/test_moe_dispatch.py).

``use_sorted_dispatch(model)`` swaps it into every MoE layer where it applies; layers it
does not serve (EP or expert-TP > 1, token dropping or capacity padding, quantization
padding, shared experts overlapped inside the dispatcher, fused permutes, CUDA graphs)
keep Megatron-Core's dispatcher.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.transformer.moe.moe_utils import unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


def sorted_routes(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """Flat positions ``expert * T + token`` of the True entries of ``routing_map``
    [T, E], expert-major and tokens ascending within an expert, as ``masked_select`` over
    ``routing_map.T`` orders them: [T * topk], with no host sync (each row holds ``topk``
    True entries)."""
    tokens = routing_map.shape[0]
    unrouted = routing_map.T.reshape(-1).logical_not().to(torch.uint8)
    return torch.argsort(unrouted, stable=True)[: tokens * topk]


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
        self.hidden_shape_before_permute = tokens.shape
        self.routing_map = routing_map
        n, experts = routing_map.shape
        flat = sorted_routes(routing_map, self.topk)
        expert, token = flat // n, flat % n
        self.sorted_indices = token
        self.tokens_per_expert = routing_map.sum(dim=0).long()
        permuted_probs = probs.reshape(-1).index_select(0, token * experts + expert)
        return tokens.index_select(0, token), permuted_probs

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
        out = unpermute(hidden_states, self.sorted_indices,
                        restore_shape=self.hidden_shape_before_permute,
                        routing_map=self.routing_map, fused=False)
        self.routing_map = self.sorted_indices = None
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


def use_sorted_dispatch(model: torch.nn.Module) -> int:
    """Give every MoE layer of ``model`` (a GPTModel chunk, DDP-wrapped or not) that it
    serves a ``SortedTokenDispatcher``; returns how many layers it swapped."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    swapped = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        old = layer.token_dispatcher
        if isinstance(old, SortedTokenDispatcher) or serves(
                layer.config, old.ep_size, old.tp_size) is not None:
            continue
        layer.token_dispatcher = SortedTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, config=layer.config,
            pg_collection=SimpleNamespace(  # the groups the base class reads
                ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group))
        swapped += 1
    return swapped

