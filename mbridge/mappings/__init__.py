"""Pure mappings between HF and mcore trees: combinators, tensor ops, one file per
architecture, and the registry keyed by HF architecture name."""

from mbridge.mappings import (  # noqa: F401  (register)
    deepseek_v3,
    gpt_oss,
    llama,
    mistral,
    mixtral,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from mbridge.mappings.core import Mapping, Tree, at, chain, fuse, per_layer, rename
from mbridge.mappings.registry import Architecture, architecture_of, get, register, supported

__all__ = ["Architecture", "Mapping", "Tree", "architecture_of", "at", "chain", "fuse", "get",
           "per_layer", "register", "rename", "supported"]
