"""``AdapterSpec``: what LoRA or DoRA adapts and how (pure), and the sites of a model it picks.

Field names and defaults are Megatron-Bridge's (``megatron/bridge/peft/lora.py``):
``target_modules`` names Megatron-Core linear layers (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``) or wildcard patterns over full module names
(``"decoder.layers.0.*.linear_qkv"``, layers numbered globally); ``dim`` is the rank,
``alpha / dim`` the scale. The canonical variant names the parts of the fused layers instead
(``linear_q``, ``linear_k``, ``linear_v``, ``linear_fc1_gate``, ``linear_fc1_up``): each part
gets its own adapter, which is Hugging Face peft's layout (one adapter per projection).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

import msgspec

from mbridge.specs import Spec

FUSED_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
CANONICAL_TARGETS = ("linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_gate",
                     "linear_fc1_up", "linear_fc2")
_PART_NAMES = frozenset(CANONICAL_TARGETS) - frozenset(FUSED_TARGETS)


class AdapterSpec(Spec, frozen=True, kw_only=True):
    """LoRA (``scheme="lora"``) or DoRA (``"dora"``: a learnt magnitude per output row).

    ``dropout_position``: ``"pre"`` drops the adapter's input, ``"post"`` its output.
    ``lora_A_init_method``: ``"xavier"`` or ``"kaiming"``; ``lora_B_init_method``: ``"zero"``
    (the adapted model starts equal to the base) or ``"xavier"``.
    """

    scheme: Literal["lora", "dora"] = "lora"
    target_modules: tuple[str, ...] = FUSED_TARGETS
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: Literal["pre", "post"] = "pre"
    exclude_modules: tuple[str, ...] = ()
    lora_A_init_method: Literal["xavier", "kaiming"] = "xavier"
    lora_B_init_method: Literal["zero", "xavier"] = "zero"

    def __post_init__(self):
        # users pass lists (Megatron-Bridge's habit); a frozen spec holds tuples to hash
        for name in ("target_modules", "exclude_modules"):
            msgspec.structs.force_setattr(self, name, tuple(getattr(self, name)))
        if self.dim < 1:
            raise ValueError(f"dim={self.dim}; the adapter rank must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}; use a probability in [0, 1)")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one linear layer, e.g. "
                             "['linear_qkv']")
        names = {t for t in self.target_modules if not _is_pattern(t)}
        if names & _PART_NAMES and names & {"linear_qkv", "linear_fc1"}:
            raise ValueError(f"target_modules {sorted(names)} mix fused layers and their parts; "
                             "name linear_qkv/linear_fc1 or their parts (linear_q, ...), not both")

    @property
    def scale(self) -> float:
        """``alpha / dim``, the factor on ``B @ A`` (peft's ``scaling``)."""
        return self.alpha / self.dim

    @property
    def canonical(self) -> bool:
        """Whether fused layers get one adapter per part: a target names a part or is a
        pattern ending in one (``"*.layers.2.*.linear_q"``)."""
        return any(t.endswith(p) for t in self.target_modules for p in _PART_NAMES)

    def selects(self, module: str) -> bool:
        """Whether the full module name (``decoder.layers.3.self_attention.linear_qkv``; a part
        as ``decoder.layers.3.self_attention.linear_q``) is adapted: its last name is a
        target or a pattern matches it, and no exclusion does."""
        def hit(names):
            return any(module.rsplit(".", 1)[-1] == n if not _is_pattern(n) else
                       _matches(n, module) for n in names)
        return hit(self.target_modules) and not hit(self.exclude_modules)


def _is_pattern(name: str) -> bool:
    return "*" in name or "." in name


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")) + "$")


def _matches(pattern: str, module: str) -> bool:
    """Megatron-Bridge's wildcard match: ``*`` is any run of characters, anchored at the end
    (``"*.linear_qkv"`` matches every layer's ``linear_qkv``); an exact full name matches
    itself."""
    return bool(_regex(pattern).match(module)) and (
        "*" in pattern or module == pattern)
