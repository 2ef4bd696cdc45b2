"""Load a Megatron-Core distributed checkpoint into live model chunks, at their layout.

``dist_checkpointing.load(model.sharded_state_dict(), dir)`` reads from the checkpoint's
global tensors exactly the slices this rank's chunks hold (any TP/PP/VPP), so the same
checkpoint (written offline by ``mbridge convert import`` or by training) serves every layout.
Vocabulary tensors are ``allow_shape_mismatch`` in Megatron-Core: rows the checkpoint lacks
(TP padding) stay zero.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from mbridge.io import safe_load
from mbridge.shell.model import unwrap


def load(chunks: Sequence[torch.nn.Module], directory: str | os.PathLike) -> None:
    """Load ``directory`` into ``chunks`` (this rank's model chunks, DDP-wrapped or not).
    Every rank of the job calls it."""
    from megatron.core import dist_checkpointing

    modules = unwrap(chunks)
    # Megatron-LM's convention for virtual pipeline chunks: one sub-dict per chunk.
    sharded = {f"model{v}": m.sharded_state_dict() for v, m in enumerate(modules)}
    with safe_load.megatron_loading(directory):  # loading runs no code from the checkpoint
        state = dist_checkpointing.load(sharded, str(directory))
    for v, module in enumerate(modules):
        module.load_state_dict(state[f"model{v}"], strict=True)
