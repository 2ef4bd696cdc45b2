"""Where a model's weights come from, and loading them into live chunks.

``open_weights(path)`` reads a directory (an HF checkpoint, or a Megatron-Core distributed
checkpoint that carries its HF config: ``mbridge convert import`` or a training save) into a
``Weights``: the ModelSpec, the HF config, and ``load(chunks, parallel, groups)``. Both the
facade (``AutoBridge``) and the training shell load through it.

- ``HFWeights``: each rank reads only its slices of the safetensors (``convert.load_hf``);
  every parameter must come from the checkpoint (the models are built without random init).
- ``McoreWeights``: ``dist_checkpointing.load`` at the chunks' layout, whatever layout the
  checkpoint was saved at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbridge.architectures import registry
from mbridge.io.checks import open_mcore
from mbridge.io.hf import HFCheckpoint
from mbridge.io.mcore import INFO, TRACKER, resolve
from mbridge.shell import convert, dist_checkpoint
from mbridge.shell.dist import Groups
from mbridge.specs import ModelSpec, ParallelSpec


@dataclass(frozen=True)
class HFWeights:
    """An HF checkpoint (``config.json`` + safetensors)."""

    checkpoint: HFCheckpoint
    spec: ModelSpec

    @property
    def hf_config(self) -> dict[str, Any]:
        return self.checkpoint.config

    def load(self, chunks, parallel: ParallelSpec, groups: Groups, part=None) -> None:
        arch = registry.get(self.spec.architecture)
        mapping = arch.mapping(self.spec, parallel.vocab_multiple,
                               **arch.options_for(self.checkpoint.keys()))
        convert.load_hf(chunks, self.checkpoint, mapping, self.spec, parallel, groups.rank,
                        part=part)


@dataclass(frozen=True)
class McoreWeights:
    """A Megatron-Core distributed checkpoint carrying its HF config (``hf/config.json``)."""

    path: Path
    spec: ModelSpec
    hf_config: dict[str, Any]

    def load(self, chunks, parallel: ParallelSpec, groups: Groups, part=None) -> None:
        if part is not None:
            raise NotImplementedError("loading one module of a MIMO layout from a distributed "
                                      "checkpoint is not supported yet; start from the HF "
                                      "checkpoint")
        dist_checkpoint.load(chunks, self.path)


Weights = HFWeights | McoreWeights


def open_hf(path: str | os.PathLike) -> HFWeights:
    """An HF directory, validated (headers only)."""
    ckpt = HFCheckpoint(path)
    return HFWeights(ckpt, registry.from_hf_config(ckpt.config))


def open_mcore_weights(path: str | os.PathLike,
                       hf_config: str | os.PathLike | None = None) -> McoreWeights:
    """A distributed checkpoint (or a training save directory), checked against its HF config
    (or the config in ``hf_config``): every tensor the model needs, in its shape."""
    _, cfg, spec, _ = open_mcore(path, hf_config)
    return McoreWeights(resolve(path), spec, cfg)


def open_weights(path: str | os.PathLike) -> Weights:
    """HF checkpoint or distributed checkpoint, told apart by ``mbridge.json``."""
    path = Path(path)
    if (path / INFO).is_file() or (path / TRACKER).is_file():
        return open_mcore_weights(path)
    return open_hf(path)


__all__ = ["HFWeights", "McoreWeights", "Weights", "open_hf", "open_mcore_weights",
           "open_weights"]
