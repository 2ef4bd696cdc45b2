"""Tensor ops in inverse pairs. Each infers per-rank sizes from shapes, so the same op turns
a TP shard of the HF tensors into the TP shard of the fused tensor."""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF q ``[heads*d, ...]``, k, v ``[groups*d, ...]`` -> Megatron-Core's grouped layout
    ``[groups * (heads/groups + 2) * d, ...]``: per group its q heads, then k, then v
    (see megatron/core/transformer/attention.py, ``SelfAttention.get_query_key_value_tensors``).
    Works for weights and biases alike."""
    groups = k.shape[0] // head_dim
    rest = q.shape[1:]
    parts = [x.reshape(groups, -1, *rest) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads_per_group: int, head_dim: int):
    """Inverse of ``fuse_qkv``:
    ``split_qkv(fuse_qkv(q, k, v, d), heads // groups, d) == (q, k, v)``."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(-1, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[ffn, h]`` twice -> ``[2*ffn, h]``, gate first (Megatron-Core's ``linear_fc1``
    with ``gated_linear_unit``)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    """Inverse of ``fuse_gate_up``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
