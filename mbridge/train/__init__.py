"""Training on Megatron-Core: the pure parts (run config, schedules, decisions, state, step,
recipes) live here; ``mbridge.training.pretrain`` binds them to Megatron-Core through
``mbridge.shell``.

    from mbridge.train import recipes
    from mbridge.training import pretrain
    state = pretrain(recipes.tiny_llama_pretrain())

Launch: ``torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llama_pretrain``.
Importing this package pulls in neither torch.distributed nor megatron.core.
"""

from __future__ import annotations

from mbridge.train.config import ConfigError, RunConfig, apply_overrides
from mbridge.train.state import TrainState
from mbridge.train.step import Metrics, Runtime, step

__all__ = ["ConfigError", "Metrics", "RunConfig", "Runtime", "TrainState", "apply_overrides",
           "step"]
