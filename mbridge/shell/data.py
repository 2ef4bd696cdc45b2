"""Training data: Megatron-Core's ``GPTDataset`` over indexed datasets (``prefix.bin`` +
``prefix.idx``, blended by weight) or its ``MockGPTDataset``, read in the order
``mbridge.train.sampling`` decides from consumed samples, so a resumed run reads exactly
what an uninterrupted one would.

Every rank builds the same datasets (deterministic in the seed); the builder writes its
index caches under ``data.path_to_cache`` (default: beside the data) on rank 0 first.
Validation reads the same first ``eval_iters`` global batches of the validation split at
every evaluation, so validation losses are comparable across a run.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from mbridge.train.config import ConfigError, RunConfig
from mbridge.train.plan import RunPlan
from mbridge.train.sampling import microbatch_indices
from mbridge.train.split import unused_splits

# Megatron-Core's .idx header (indexed_dataset.py _IndexWriter): magic, version <Q, dtype
# code <B, sequence count <Q, document count <Q (document_indices, which starts with a 0)
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


class TokenInfo:
    """The little of a tokenizer GPTDataset needs: vocabulary size and special token ids."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        # part of the dataset cache key (Megatron-Core hashes its config's description)
        self.unique_identifiers = {"class": "mbridge.TokenInfo", "vocab_size": vocab_size,
                                   "eod": eod}


def check_paths(cfg: RunConfig) -> None:
    """Every data.blend prefix has its .bin and .idx; raise ConfigError naming the missing."""
    for prefix in cfg.data.blend:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise ConfigError(f"data.blend: {prefix}{' and '.join(missing)} not found (an "
                              f"indexed dataset is a prefix with .bin and .idx files; make one "
                              "with `mbridge data preprocess`)")


def document_count(prefix: str) -> int:
    """Documents in the indexed dataset ``prefix`` (read from its .idx header)."""
    path = Path(prefix + ".idx")
    with path.open("rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size or head[:9] != _IDX_MAGIC:
        raise ConfigError(f"data.blend: {path} is not a Megatron-Core index file (make the "
                          "dataset again with `mbridge data preprocess`)")
    return _IDX_HEADER.unpack(head)[4] - 1


def check_splits(cfg: RunConfig) -> frozenset:
    """The splits to leave out of the build (``mbridge.train.split.unused_splits``); raises
    ConfigError before anything is built when data.split gives a split the run reads no
    documents of data.blend's datasets."""
    counts = {} if cfg.data.mock else {p: document_count(p) for p in cfg.data.blend}
    return unused_splits(cfg.data.split, counts, eval_iters=cfg.train.eval_iters)


def build(cfg: RunConfig, vocab_size: int):
    """(train, valid) datasets sized for the whole run."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d, t = cfg.data, cfg.train
    blend = None
    if d.blend:
        blend = (list(d.blend), list(d.blend_weights) if d.blend_weights else None)
    config = GPTDatasetConfig(
        random_seed=cfg.rng.seed, sequence_length=cfg.model.seq_length, blend=blend,
        split=d.split, path_to_cache=d.path_to_cache,
        tokenizer=TokenInfo(vocab_size, d.eod_token_id), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=d.eod_mask_loss, create_attention_mask=False,
        mid_level_dataset_surplus=0.005)
    unused = check_splits(cfg)
    config.split_matrix = [None if i in unused else m for i, m in enumerate(config.split_matrix)]
    sizes = [t.train_iters * t.global_batch_size, max(t.eval_iters, 1) * t.global_batch_size, 0]
    cls = MockGPTDataset if d.mock else GPTDataset
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    except (AssertionError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot build the datasets from data.blend={list(d.blend)}: "
                          f"{e or type(e).__name__}") from None
    if valid is None and t.eval_iters:
        raise ConfigError(f"data.split={d.split!r} leaves no validation data but "
                          f"train.eval_iters={t.eval_iters}; give the validation split a share "
                          "or set train.eval_iters=0")
    return train, valid


def collate(dataset, indices) -> dict[str, torch.Tensor]:
    samples = [dataset[i % len(dataset)] for i in indices]
    return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask",
                                                            "position_ids")}


def batch_at(dataset, consumed: int, cfg: RunConfig, plan: RunPlan, dp_rank: int) -> list:
    """This rank's micro-batches of the global batch starting at sample ``consumed``."""
    t = cfg.train
    return [collate(dataset, idx) for idx in microbatch_indices(
        consumed, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
        dp_size=plan.dp_size, dp_rank=dp_rank)]


def validation_batches(dataset, cfg: RunConfig, plan: RunPlan, dp_rank: int) -> list:
    gbs = cfg.train.global_batch_size
    return [batch_at(dataset, i * gbs, cfg, plan, dp_rank) for i in range(cfg.train.eval_iters)]
