"""mbridge: exact Hugging Face <-> Megatron-Core conversion and training on Megatron-Core.

Public API: ``AutoBridge`` and ``GPTModelProvider`` (the facade), the specs, the pure layers
(``mbridge.keys``, ``mbridge.sharding``, ``mbridge.mappings``, ``mbridge.architectures``,
``mbridge.config``, ``mbridge.train``), ``mbridge.offline`` and ``mbridge.verify``
(checkpoint to checkpoint), ``mbridge.training.pretrain`` and ``mbridge.testing`` (property
tests for mappings). ``docs/architecture.md`` maps the layers.
"""

from mbridge.bridge import AutoBridge, GPTModelProvider
from mbridge.specs import MLASpec, ModelSpec, MoESpec, ParallelSpec, RankSpec, RopeSpec

__all__ = ["AutoBridge", "GPTModelProvider", "MLASpec", "ModelSpec", "MoESpec", "ParallelSpec",
           "RankSpec", "RopeSpec"]
__version__ = "0.1.0"
