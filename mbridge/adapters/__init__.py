"""Parameter-efficient fine-tuning, the pure part: LoRA/DoRA specs (``AdapterSpec``), where
adapters go (``site``), their keys, layouts and mappings to Hugging Face peft's files
(``mapping``), and merging into the base weights at any TP (``merge``). The shell applies
them to live models (``shell/adapters.py``); users take ``LoRA``/``DoRA`` from ``mbridge.peft``.
"""

from mbridge.adapters.mapping import Adapted, layouts, mapping, selection, shapes
from mbridge.adapters.merge import dora_factor, lora_delta, merge, row_norm_sq, site_delta
from mbridge.adapters.site import DENSE_SITES, Site, fuse_fn, sites, split_fn
from mbridge.adapters.spec import CANONICAL_TARGETS, FUSED_TARGETS, AdapterSpec

__all__ = ["CANONICAL_TARGETS", "DENSE_SITES", "FUSED_TARGETS", "Adapted", "AdapterSpec", "Site",
           "dora_factor", "fuse_fn", "layouts", "lora_delta", "mapping", "merge", "row_norm_sq",
           "selection", "shapes", "site_delta", "sites", "split_fn"]
