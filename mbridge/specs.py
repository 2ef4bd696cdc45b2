"""Immutable specs: the plain data every pure function in mbridge takes.

A spec is a frozen ``msgspec.Struct``: hashable, JSON-encodable, never holds tensors.
``ModelSpec`` is the normalised architecture (the same fields whatever the HF family),
``ParallelSpec`` the parallel layout, ``RankSpec`` one rank's coordinates in that layout.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every spec: frozen, strict about unknown fields, JSON round-trippable."""

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str):
        return msgspec.json.decode(data, type=cls)

    def replace(self, **changes):
        return msgspec.structs.replace(self, **changes)


class RopeSpec(Spec, frozen=True, kw_only=True):
    """Rotary embedding. ``kind`` follows HF ``rope_type``: default, linear, llama3."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelSpec(Spec, frozen=True, kw_only=True):
    """A decoder-only LLM, normalised across HF families.

    Shapes follow from it: q is ``[num_heads * head_dim, hidden]``, k and v
    ``[num_kv_heads * head_dim, hidden]``, the Megatron fused qkv
    ``[num_kv_heads * (num_heads // num_kv_heads + 2) * head_dim, hidden]``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec()
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    activation: Literal["silu"] = "silu"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


class ParallelSpec(Spec, frozen=True, kw_only=True):
    """Parallel sizes. ``first_stage_layers``/``last_stage_layers`` give an uneven pipeline
    split (Megatron-Core's ``num_layers_in_first/last_pipeline_stage``)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    vocab_multiple: int = 128

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "etp", "cp", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.vpp is not None and (self.vpp < 1 or self.pp == 1 and self.vpp > 1):
            raise ValueError(f"vpp={self.vpp} needs pipeline parallel size > 1 (pp={self.pp})")

    @property
    def vpp_size(self) -> int:
        return self.vpp or 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


class RankSpec(Spec, frozen=True, kw_only=True):
    """One rank's coordinates in a ``ParallelSpec``."""

    tp: int = 0
    pp: int = 0
    ep: int = 0
    etp: int = 0


def check_model_fits(model: ModelSpec, parallel: ParallelSpec) -> None:
    """Raise a ValueError naming what to change if ``parallel`` cannot host ``model``."""
    if model.num_kv_heads % parallel.tp:
        raise ValueError(
            f"num_query_groups={model.num_kv_heads} is not divisible by tensor parallel size "
            f"{parallel.tp}; pick a tensor parallel size that divides {model.num_kv_heads}"
        )
    if model.ffn_hidden_size % parallel.tp:
        raise ValueError(
            f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by tensor parallel "
            f"size {parallel.tp}"
        )
