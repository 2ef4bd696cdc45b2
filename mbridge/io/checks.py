"""Checks of checkpoints on disk against the model their config describes, before any
conversion starts: an HF directory against its ``config.json`` (``check_hf``) and a
Megatron-Core distributed checkpoint against its HF config (``open_mcore``). Each raises
``CheckpointError`` naming every missing or misshaped tensor.
"""

from __future__ import annotations

import torch

from mbridge.architectures import registry
from mbridge.io.hf import CheckpointError, HFCheckpoint
from mbridge.io.mcore import McoreReader, read_hf_config, resolve
from mbridge.keys import split_index
from mbridge.mappings.core import Mapping
from mbridge.sharding.dist_checkpoint import region
from mbridge.specs import ModelSpec


def mcore_shape(spec: ModelSpec, mcore_key: str) -> tuple[int, ...]:
    """The global (TP=1, unpadded) shape the architecture declares for ``mcore_key``."""
    return registry.get(spec.architecture).mcore_shape(spec, mcore_key)


def meta_mcore(group: Mapping, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``group``'s mcore tensors as meta tensors of their global shapes."""
    return {k: torch.empty(mcore_shape(spec, k), dtype=dtype, device="meta")
            for k in group.mcore_keys}


def hf_shapes(group: Mapping, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The HF shapes ``spec`` implies for ``group``: ``to_hf`` run on meta tensors."""
    meta = meta_mcore(group, spec, torch.float32)
    return {k: tuple(v.shape) for k, v in group.to_hf(meta).items()}


def check_supported(groups: tuple[Mapping, ...], spec: ModelSpec) -> None:
    """NotImplementedError unless every mcore tensor of the model has a known place in a
    distributed checkpoint (dense decoders: see ``mbridge.sharding.dist_checkpoint``)."""
    unknown = []
    for key in (k for g in groups for k in g.mcore_keys):
        try:
            mcore_shape(spec, key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise NotImplementedError(
            f"offline conversion of {spec.architecture} is not supported yet: no distributed "
            f"checkpoint layout for {len(unknown)} tensors such as {unknown[:3]}")


def check_hf(ckpt: HFCheckpoint, groups: tuple[Mapping, ...], spec: ModelSpec) -> list[str]:
    """Raise CheckpointError naming every missing or misshaped tensor; return the keys the
    mapping does not use (left out of the conversion)."""
    problems, needed = [], set()
    for group in groups:
        for key, shape in hf_shapes(group, spec).items():
            needed.add(split_index(key)[0])  # "name[e]": row e of a stacked tensor
            if not ckpt.has(key):
                problems.append(f"{key} is missing")
            elif ckpt.shape(key) != shape:
                problems.append(f"{key} has shape {list(ckpt.shape(key))}, the config implies "
                                f"{list(shape)}")
    if problems:
        raise CheckpointError(f"{ckpt.path} does not match its config.json: "
                              + "; ".join(problems[:8])
                              + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return sorted(set(ckpt.keys()) - needed)


def open_mcore(mcore_dir, hf_config_dir=None):
    """(reader, HF config, spec, mapping groups) of a distributed checkpoint, checked: its
    tensors must be those its HF config implies (``hf_config_dir``: a config from elsewhere,
    for checkpoints that carry none)."""
    mcore_dir = resolve(mcore_dir)
    reader = McoreReader(mcore_dir)
    hf_config = read_hf_config(hf_config_dir if hf_config_dir is not None else mcore_dir)
    spec = registry.from_hf_config(hf_config)
    groups = registry.get(spec.architecture).mapping(spec)
    check_supported(groups, spec)
    check_mcore(reader, groups, spec)
    return reader, hf_config, spec, groups


def check_mcore(reader: McoreReader, groups: tuple[Mapping, ...], spec: ModelSpec) -> None:
    """Raise CheckpointError naming every tensor the model needs that the checkpoint lacks or
    holds in another shape (vocabulary tensors may hold padding rows)."""
    problems = []
    for group in groups:
        for key, layout in group.mcore_layouts.items():
            reg = region(key, mcore_shape(spec, key), spec)
            if reg.key not in reader.keys():
                problems.append(f"{reg.key} is missing")
                continue
            have = reader.shape(reg.key)
            padded = layout.vocab_size is not None and have[1:] == reg.global_shape[1:] \
                and have[0] >= reg.global_shape[0]
            if have != reg.global_shape and not padded:
                problems.append(f"{reg.key} has shape {list(have)}, the config implies "
                                f"{list(reg.global_shape)}")
    if problems:
        raise CheckpointError(f"{reader.path} does not match the HF config: "
                              + "; ".join(sorted(set(problems))[:8]))


