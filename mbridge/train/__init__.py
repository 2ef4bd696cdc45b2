"""Training on Megatron-Core: the pure parts (run config, schedules, decisions, state, step,
recipes) live here; ``pretrain`` binds them to Megatron-Core through ``mbridge.shell``.

    from mbridge.train import pretrain, recipes
    state = pretrain(recipes.tiny_llama_pretrain())

Launch: ``torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llama_pretrain``.
Importing this package pulls in neither torch.distributed nor megatron.core.
"""

from __future__ import annotations

from mbridge.train.config import ConfigError, RunConfig, apply_overrides
from mbridge.train.state import TrainState
from mbridge.train.step import Metrics, Runtime, step


def pretrain(config: RunConfig, **kwargs):
    """Train as ``config`` says (see ``mbridge.shell.pretrain.pretrain``); returns the final
    TrainState."""
    from mbridge.shell.pretrain import pretrain as _pretrain

    return _pretrain(config, **kwargs)


__all__ = ["ConfigError", "Metrics", "RunConfig", "Runtime", "TrainState", "apply_overrides",
           "pretrain", "step"]
