"""Pure mappings between HF and mcore trees: the ``Mapping`` pair, its combinators
(``rename``, ``fuse``, ``chain``, ``at``) and tensor ops in inverse pairs. Architectures
(``mbridge.architectures``) are built from these."""

from mbridge.mappings.core import (
    Mapping,
    Tree,
    at,
    chain,
    fuse,
    per_layer,
    rekey,
    rename,
    swap_prefix,
)

__all__ = ["Mapping", "Tree", "at", "chain", "fuse", "per_layer", "rekey", "rename", "swap_prefix"]
