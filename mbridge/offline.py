"""Offline conversion between an HF checkpoint and a Megatron-Core distributed checkpoint
(``torch_dist``): no model instantiated, no process group, no GPU, one mapping group
(the embedding, one decoder layer, or the tail) in memory at a time.

    from mbridge import offline, verify
    offline.import_hf("hf_dir", "mcore_dir", dtype="bfloat16")   # HF -> dist checkpoint
    offline.export_hf("mcore_dir", "hf_out", shard_size="5GB")    # dist checkpoint -> HF
    report = verify.verify("hf_dir", "mcore_dir", logits=True)    # every tensor (+ logits)

The dist checkpoint holds global shapes and offsets (``mbridge.sharding.dist_checkpoint``
documents the layout), so ``AutoBridge.from_mcore_checkpoint(dir)`` + a provider loads it
at any TP/PP/VPP. CLI: ``mbridge convert import|export|verify`` (``mbridge/offline_cli.py``).

Checkpoints from training: ``export_hf`` reads the model weights of any torch_dist
checkpoint that ``megatron.core.dist_checkpointing.save`` wrote from a ``GPTModel``'s
``sharded_state_dict()`` (at any TP/PP/VPP, nested under any dict keys such as ``"model"``,
next to optimizer state under other keys, which is ignored), given the HF config: in the
checkpoint's ``hf/config.json`` (``mbridge.io.mcore.write_hf_files`` writes it) or a
directory passed as ``hf_config``. A training run's save directory works too: the iteration
that its ``latest_checkpointed_iteration.txt`` names is read (``iter_0000010/``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mbridge import config as mconfig
from mbridge.architectures import registry
from mbridge.io.checks import check_hf, check_supported, mcore_shape, meta_mcore, open_mcore
from mbridge.io.hf import HFCheckpoint, copy_side_files, parse_size
from mbridge.io.hf_stream import HFStreamWriter
from mbridge.io.mcore import (
    HF_DIR,
    McoreReader,
    McoreWriter,
    resolve,
    write_hf_files,
)
from mbridge.io.output import atomic_dir, check_output
from mbridge.mappings.core import Mapping
from mbridge.mappings.stacked import restack, stacked_counts
from mbridge.sharding.dist_checkpoint import checkpoint_key, extra_state_keys, region, to_chunks
from mbridge.specs import ModelSpec, torch_dtype


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar in bytes (with bytes/s) on stderr, or a no-op."""
    if not enabled:
        return contextlib.nullcontext(_Silent())
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True)


class _Silent:
    def update(self, n: int) -> None:
        pass


def _with_dtype(hf_config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The config with its dtype fields (``dtype``, ``torch_dtype``) naming ``dtype``."""
    name = str(dtype).removeprefix("torch.")
    fields = [f for f in ("dtype", "torch_dtype") if f in hf_config] or ["dtype"]
    return {**hf_config, **dict.fromkeys(fields, name)}


def import_hf(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *,
              dtype: str | None = None, overwrite: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """HF checkpoint -> Megatron-Core distributed checkpoint at ``mcore_dir``, written
    atomically. ``dtype`` (float32, bfloat16, float16) casts; None keeps the HF dtypes.
    Returns a summary (spec, tensors, bytes, unused HF keys)."""
    check_output(mcore_dir, inputs=[hf_dir], overwrite=overwrite)  # before reading anything
    ckpt = HFCheckpoint(hf_dir)
    spec = mconfig.from_hf_config(ckpt.config)
    arch = registry.get(spec.architecture)
    groups = arch.mapping(spec, **arch.options_for(ckpt.keys()))  # e.g. stacked experts
    check_supported(groups, spec)
    unused = check_hf(ckpt, groups, spec)
    cast = torch_dtype(dtype) if dtype else None
    total = sum(ckpt.nbytes(k) for g in groups for k in g.hf_keys)
    written, out_dtype = 0, None
    with atomic_dir(mcore_dir, inputs=[hf_dir], overwrite=overwrite) as tmp, \
            progress_bar(progress, total, "import") as bar:
        writer = McoreWriter(tmp)
        for group in groups:
            mcore = group.to_mcore({k: ckpt.read(k) for k in group.hf_keys})
            if cast is not None:  # Megatron-Core keeps the router's expert bias in fp32
                mcore = {k: v if k.endswith("expert_bias") else v.to(cast)
                         for k, v in mcore.items()}
            out_dtype = next(iter(mcore.values())).dtype
            objects = dict.fromkeys(extra_state_keys(mcore, spec))
            written += writer.write(to_chunks(mcore, spec), objects)
            del mcore
            ckpt.close()  # drop the mmaps, so pages read stay out of this process' memory
            bar.update(sum(ckpt.nbytes(k) for k in group.hf_keys))
        writer.finish()
        hf_config = _with_dtype(ckpt.config, cast) if cast is not None else ckpt.config
        write_hf_files(tmp, hf_config, spec.to_json(), ckpt.path)
    return dict(spec=spec, tensors=sum(len(g.hf_keys) for g in groups), bytes=written,
                dtype=str(out_dtype).removeprefix("torch."), unused_hf_keys=unused)


def read_mcore_group(reader: McoreReader, group: Mapping,
                     spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The global (TP=1, unpadded) mcore tensors of ``group`` read from the checkpoint."""
    out = {}
    for key in group.mcore_keys:
        shape = mcore_shape(spec, key)
        out[key] = reader.read_region(region(key, shape, spec)).reshape(shape)
    return out


def export_hf(mcore_dir: str | os.PathLike, hf_dir: str | os.PathLike, *,
              shard_size: int | str = "5GB", hf_config: str | os.PathLike | None = None,
              overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Megatron-Core distributed checkpoint -> HF directory (sharded safetensors + index,
    config.json, generation and tokenizer files), written atomically; tensors keep the
    checkpoint's dtype. ``hf_config``: a directory with config.json (and tokenizer files) for
    checkpoints that carry none (e.g. from training)."""
    shard_bytes = parse_size(shard_size)
    check_output(hf_dir, inputs=[mcore_dir, hf_config], overwrite=overwrite)
    reader, cfg, spec, groups = open_mcore(mcore_dir, hf_config)
    counts = stacked_counts(k for g in groups for k in g.hf_keys)  # rows name[e] -> name

    def meta_hf(group):
        meta = {k: v.to(reader.dtype(checkpoint_key(k, spec)))
                for k, v in meta_mcore(group, spec, torch.float32).items()}
        return group.to_hf(meta).items()

    entries = [(k, tuple(v.shape), v.dtype)
               for k, v in restack((kv for g in groups for kv in meta_hf(g)), counts)]
    side = Path(hf_config) if hf_config is not None else resolve(mcore_dir) / HF_DIR
    with atomic_dir(hf_dir, inputs=[mcore_dir, hf_config], overwrite=overwrite) as tmp:
        writer = HFStreamWriter(tmp, entries, shard_bytes)
        try:
            with progress_bar(progress, writer.total_bytes, "export") as bar:
                hf = (kv for group in groups
                      for kv in group.to_hf(read_mcore_group(reader, group, spec)).items())
                for name, tensor in restack(hf, counts):
                    writer.add(name, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
            writer.finish()
        finally:
            writer.close()
        dtypes = {d for _, _, d in entries}
        out_cfg = _with_dtype(cfg, dtypes.pop()) if len(dtypes) == 1 else cfg
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
        copy_side_files(side if side.is_dir() else None, tmp)
    return dict(spec=spec, tensors=len(entries), bytes=writer.total_bytes,
                shards=len(writer.shards))
