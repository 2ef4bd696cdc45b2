"""mbridge: exact Hugging Face <-> Megatron-Core conversion and training on Megatron-Core.

Public API: ``AutoBridge`` and ``GPTModelProvider`` (the facade), the specs, the pure layers
(``mbridge.keys``, ``mbridge.sharding``, ``mbridge.mappings``, ``mbridge.architectures``,
``mbridge.config``, ``mbridge.train``), ``mbridge.offline`` and ``mbridge.verify``
(checkpoint to checkpoint), ``mbridge.training.pretrain`` and ``mbridge.testing`` (property
tests for mappings). ``docs/architecture.md`` maps the layers.

The names are imported on first use (PEP 562), so ``import mbridge.cli`` and
``mbridge --help`` load no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mbridge.bridge import AutoBridge, GPTModelProvider
    from mbridge.specs import MLASpec, ModelSpec, MoESpec, ParallelSpec, RankSpec, RopeSpec

_HOME = {"AutoBridge": "mbridge.bridge", "GPTModelProvider": "mbridge.bridge",
         "MLASpec": "mbridge.specs", "ModelSpec": "mbridge.specs", "MoESpec": "mbridge.specs",
         "ParallelSpec": "mbridge.specs", "RankSpec": "mbridge.specs",
         "RopeSpec": "mbridge.specs"}

__all__ = ["AutoBridge", "GPTModelProvider", "MLASpec", "ModelSpec", "MoESpec", "ParallelSpec",
           "RankSpec", "RopeSpec"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mbridge' has no attribute {name!r}")
