"""mbridge: exact Hugging Face <-> Megatron-Core conversion and training on Megatron-Core.

Public API: ``AutoBridge`` and ``GPTModelProvider`` (the facade), the specs, and the pure
layers ``mbridge.mappings``, ``mbridge.sharding`` and ``mbridge.config``.
"""

from mbridge.bridge import AutoBridge, GPTModelProvider
from mbridge.specs import MLASpec, ModelSpec, MoESpec, ParallelSpec, RankSpec, RopeSpec

__all__ = ["AutoBridge", "GPTModelProvider", "MLASpec", "ModelSpec", "MoESpec", "ParallelSpec",
           "RankSpec", "RopeSpec"]
__version__ = "0.1.0"
