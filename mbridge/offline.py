"""Offline conversion between an HF checkpoint and a Megatron-Core distributed checkpoint
(``torch_dist``): no model instantiated, no process group, no GPU, one mapping group
(the embedding, one decoder layer, or the tail) in memory at a time.

    from mbridge import offline
    offline.import_hf("hf_dir", "mcore_dir", dtype="bfloat16")   # HF -> dist checkpoint
    offline.export_hf("mcore_dir", "hf_out", shard_size="5GB")    # dist checkpoint -> HF
    report = offline.verify("hf_dir", "mcore_dir", logits=True)   # every tensor (+ logits)

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mbridge import config as mconfig
from mbridge.architectures import registry
from mbridge.io.hf import CheckpointError, HFCheckpoint, atomic_dir, copy_side_files
from mbridge.io.hf_stream import HFStreamWriter
from mbridge.io.mcore import (
    HF_DIR,
    McoreReader,
    McoreWriter,
    read_hf_config,
    resolve,
    write_hf_files,
)
from mbridge.keys import split_index
from mbridge.mappings.core import Mapping
from mbridge.mappings.stacked import restack, stacked_counts
from mbridge.sharding.dist_checkpoint import checkpoint_key, extra_state_keys, region, to_chunks
from mbridge.specs import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _progress(enabled: bool, total: int, desc: str):
    """A tqdm bar in bytes (with bytes/s) on stderr, or a no-op."""
    if not enabled:
        return contextlib.nullcontext(_Silent())
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True)


class _Silent:
    def update(self, n: int) -> None:
        pass


def _shape(spec: ModelSpec, mcore_key: str) -> tuple[int, ...]:
    return registry.get(spec.architecture).mcore_shape(spec, mcore_key)


def _meta_mcore(group: Mapping, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.empty(_shape(spec, k), dtype=dtype, device="meta")
            for k in group.mcore_keys}


def hf_shapes(group: Mapping, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The HF shapes ``spec`` implies for ``group``: ``to_hf`` run on meta tensors."""
    meta = _meta_mcore(group, spec, torch.float32)
    return {k: tuple(v.shape) for k, v in group.to_hf(meta).items()}


def check_supported(groups: tuple[Mapping, ...], spec: ModelSpec) -> None:
    """NotImplementedError unless every mcore tensor of the model has a known place in a
    distributed checkpoint (dense decoders: see ``mbridge.sharding.dist_checkpoint``)."""
    unknown = []
    for key in (k for g in groups for k in g.mcore_keys):
        try:
            _shape(spec, key)
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


def _check_paths(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise CheckpointError(f"output {dst} overlaps input {src}; choose a separate directory")


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
    ckpt = HFCheckpoint(hf_dir)
    spec = mconfig.from_hf_config(ckpt.config)
    arch = registry.get(spec.architecture)
    groups = arch.mapping(spec, **arch.options_for(ckpt.keys()))  # e.g. stacked experts
    check_supported(groups, spec)
    unused = check_hf(ckpt, groups, spec)
    _check_paths(hf_dir, mcore_dir)
    cast = DTYPES[dtype] if dtype else None
    total = sum(ckpt.nbytes(k) for g in groups for k in g.hf_keys)
    written, out_dtype = 0, None
    with atomic_dir(mcore_dir, overwrite=overwrite) as tmp, \
            _progress(progress, total, "import") as bar:
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


def _open_mcore(mcore_dir, hf_config_dir=None):
    mcore_dir = resolve(mcore_dir)
    reader = McoreReader(mcore_dir)
    hf_config = read_hf_config(hf_config_dir if hf_config_dir is not None else mcore_dir)
    spec = mconfig.from_hf_config(hf_config)
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
            reg = region(key, _shape(spec, key), spec)
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


def read_mcore_group(reader: McoreReader, group: Mapping,
                     spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The global (TP=1, unpadded) mcore tensors of ``group`` read from the checkpoint."""
    out = {}
    for key in group.mcore_keys:
        shape = _shape(spec, key)
        out[key] = reader.read_region(region(key, shape, spec)).reshape(shape)
    return out


def export_hf(mcore_dir: str | os.PathLike, hf_dir: str | os.PathLike, *,
              shard_size: int | str = "5GB", hf_config: str | os.PathLike | None = None,
              overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Megatron-Core distributed checkpoint -> HF directory (sharded safetensors + index,
    config.json, generation and tokenizer files), written atomically; tensors keep the
    checkpoint's dtype. ``hf_config``: a directory with config.json (and tokenizer files) for
    checkpoints that carry none (e.g. from training)."""
    from mbridge.bridge import parse_size

    reader, cfg, spec, groups = _open_mcore(mcore_dir, hf_config)
    _check_paths(mcore_dir, hf_dir)
    counts = stacked_counts(k for g in groups for k in g.hf_keys)  # rows name[e] -> name

    def meta_hf(group):
        meta = {k: v.to(reader.dtype(checkpoint_key(k, spec)))
                for k, v in _meta_mcore(group, spec, torch.float32).items()}
        return group.to_hf(meta).items()

    entries = [(k, tuple(v.shape), v.dtype)
               for k, v in restack((kv for g in groups for kv in meta_hf(g)), counts)]
    side = Path(hf_config) if hf_config is not None else resolve(mcore_dir) / HF_DIR
    with atomic_dir(hf_dir, overwrite=overwrite) as tmp:
        writer = HFStreamWriter(tmp, entries, parse_size(shard_size))
        try:
            with _progress(progress, writer.total_bytes, "export") as bar:
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


@dataclass
class VerifyReport:
    """What ``verify`` found. ``cast``: tensors equal only after casting the HF tensor to the
    checkpoint's dtype (an import with ``dtype``); ``mismatches``: (name, max |diff|);
    ``unused``: HF tensors the model does not use (import leaves them out)."""

    tensors: int = 0
    identical: int = 0
    cast: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    logits_diff: float | None = None
    atol: float = 1e-4

    @property
    def passed(self) -> bool:
        logits_ok = self.logits_diff is None or self.logits_diff <= self.atol
        return not self.mismatches and not self.problems and logits_ok


def verify(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, *, logits: bool = False,
           atol: float = 1e-4, progress: bool = False) -> VerifyReport:
    """Compare every tensor of ``hf_dir`` with the distributed checkpoint mapped back to HF
    (bit for bit), and with ``logits`` the fp32 logits of both models on CPU (max |diff| <=
    ``atol``; instantiates both models: about 8 bytes per parameter)."""
    ckpt = HFCheckpoint(hf_dir)
    reader, _, spec, groups = _open_mcore(mcore_dir)
    report = VerifyReport(atol=atol)
    hf_spec = mconfig.from_hf_config(ckpt.config)
    if hf_spec != spec:
        report.problems.append(f"configs differ: HF {hf_spec} vs checkpoint {spec}")
        return report
    arch = registry.get(spec.architecture)
    groups = arch.mapping(spec, **arch.options_for(ckpt.keys()))  # read as hf_dir stores it
    report.unused = check_hf(ckpt, groups, spec)
    total = sum(ckpt.nbytes(k) for g in groups for k in g.hf_keys)
    with _progress(progress, total, "verify") as bar:
        for group in groups:
            back = group.to_hf(read_mcore_group(reader, group, spec))
            for key, mine in back.items():
                _compare(report, key, ckpt.read(key), mine)
                bar.update(ckpt.nbytes(key))
            ckpt.close()
    if logits:
        dtype = reader.dtype("embedding.word_embeddings.weight")
        report.logits_diff = logits_diff(hf_dir, mcore_dir, spec, dtype)
    return report


def _compare(report: VerifyReport, key: str, hf: torch.Tensor, mine: torch.Tensor) -> None:
    report.tensors += 1
    if hf.dtype == mine.dtype and torch.equal(hf, mine):
        report.identical += 1
    elif torch.equal(hf.to(mine.dtype), mine):
        report.cast.append(key)
    else:
        report.mismatches.append((key, (hf.float() - mine.float()).abs().max().item()))


def logits_diff(hf_dir: str | os.PathLike, mcore_dir: str | os.PathLike, spec: ModelSpec,
                dtype: torch.dtype = torch.float32, batch: int = 2, seq: int = 16) -> float:
    """Max |diff| of fp32 logits: HF ``transformers`` model vs the Megatron-Core model loaded
    from the distributed checkpoint at TP=1 in this process, on random token ids. The HF
    weights are rounded to ``dtype`` (the checkpoint's) first, so both hold the same values."""
    import warnings

    from transformers import AutoModelForCausalLM

    from mbridge.bridge import AutoBridge
    from mbridge.shell import forward

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    provider = AutoBridge.from_mcore_checkpoint(mcore_dir).to_megatron_provider()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron-Core's and DCP's deprecation notices
        model = provider.finalize().provide_distributed_model()
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size, spec.hidden_size)
    del model
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype,
                                              attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = hf(ids).logits
    return (got - ref).abs().max().item()


def bridge_from_mcore(cls, path: str | os.PathLike, hf_config: str | os.PathLike | None = None):
    """``cls`` (AutoBridge) for the distributed checkpoint at ``path``, checked against its HF
    config; its providers load the checkpoint instead of HF weights."""
    _open_mcore(path, hf_config)
    path = resolve(path)
    bridge = cls(None, read_hf_config(hf_config if hf_config is not None else path))
    bridge.mcore_checkpoint = path
    return bridge
