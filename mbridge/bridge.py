"""The facade users of Megatron-Bridge know: ``AutoBridge`` and ``GPTModelProvider``.

    bridge = AutoBridge.from_hf_pretrained("path/to/hf_dir")
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    bridge.save_hf_pretrained(model, "out_dir")
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mbridge import config as mconfig
from mbridge.architectures import registry
from mbridge.io.hf import HFCheckpoint, HFWriter, atomic_dir, copy_side_files
from mbridge.specs import ModelSpec, ParallelSpec, check_model_fits


def parse_size(size: int | str) -> int:
    """``"5GB" -> 5 * 10**9``, ``"512MiB" -> 512 * 2**20``, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB or 500MB")
    unit = m.group(2).rstrip("B") or "B"
    base = 1024 if unit.endswith("I") else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I") or "B"]
    return int(float(m.group(1)) * base**power)


class AutoBridge:
    """A Hugging Face checkpoint and the recipe to move it to and from Megatron-Core."""

    def __init__(self, checkpoint: HFCheckpoint | None, hf_config: dict[str, Any]):
        self.checkpoint = checkpoint
        self.hf_config = hf_config
        self.architecture = registry.architecture_of(hf_config)
        self.spec: ModelSpec = self.architecture.from_hf_config(hf_config)
        self.mcore_checkpoint: str | os.PathLike | None = None  # from_mcore_checkpoint sets it

    @classmethod
    def from_hf_pretrained(cls, path: str | os.PathLike, **_ignored) -> AutoBridge:
        """Open an HF directory (config.json + safetensors). Nothing is read beyond headers."""
        ckpt = HFCheckpoint(path)
        return cls(ckpt, ckpt.config)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> AutoBridge:
        """A bridge with no weights (for random-init models or export only)."""
        return cls(None, dict(hf_config))

    @classmethod
    def from_mcore_checkpoint(cls, path: str | os.PathLike) -> AutoBridge:
        """A bridge whose weights are a Megatron-Core distributed checkpoint carrying its HF
        config (``mbridge convert import`` writes one): providers load it at any TP/PP/VPP."""
        from mbridge import offline

        return offline.bridge_from_mcore(cls, path)

    @staticmethod
    def list_supported_models() -> tuple[str, ...]:
        return registry.supported()

    def mapping(self, parallel: ParallelSpec, hf_keys=None):
        """The mapping groups. ``hf_keys``, a checkpoint's keys, picks the options that read
        that checkpoint's layout (e.g. stacked experts); without, the layout
        ``save_pretrained`` writes."""
        options = self.architecture.options_for(hf_keys) if hf_keys is not None else {}
        return self.architecture.mapping(self.spec, parallel.vocab_multiple, **options)

    def to_megatron_provider(self, load_weights: bool = True) -> GPTModelProvider:
        return GPTModelProvider(spec=self.spec, bridge=self if load_weights else None)

    def load_hf_weights(self, model: list, parallel: ParallelSpec | None = None) -> None:
        """Copy this checkpoint's weights into live chunks (``parallel`` from the model)."""
        from mbridge.shell import convert, dist

        if self.mcore_checkpoint is not None:
            from mbridge.shell import dist_checkpoint

            return dist_checkpoint.load(model, self.mcore_checkpoint)
        if self.checkpoint is None:
            raise ValueError("this bridge has no HF weights; use from_hf_pretrained")
        parallel = parallel or _parallel_of(model)
        convert.load_hf(model, self.checkpoint, self.mapping(parallel, self.checkpoint.keys()),
                        self.spec, parallel, dist.rank_spec())

    def export_hf_weights(self, model: list,
                          cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(hf name, tensor)`` for the whole model on every rank (for weight sync)."""
        from mbridge.shell import convert, dist

        model = model if isinstance(model, list) else [model]
        parallel = _parallel_of(model)
        tp_group, pp_group, _ = dist.groups()
        ep_group, etp_group = dist.expert_groups()
        for name, tensor in convert.iter_hf(_unwrap(model), self.mapping(parallel), self.spec,
                                            parallel, dist.rank_spec(), tp_group, pp_group,
                                            ep_group, etp_group):
            yield name, tensor.cpu() if cpu else tensor

    def save_hf_pretrained(self, model: list, path: str | os.PathLike, *,
                           shard_size: int | str = "5GB", overwrite: bool = True) -> None:
        """Write config.json, sharded safetensors with index, and the source's tokenizer and
        generation files. Every rank must call it; global rank 0 writes, atomically."""
        import torch.distributed as tdist

        writer_rank = not tdist.is_initialized() or tdist.get_rank() == 0
        if not writer_rank:
            for _ in self.export_hf_weights(model):
                pass
            tdist.barrier()
            return
        with atomic_dir(path, overwrite=overwrite) as tmp:
            writer = HFWriter(tmp, parse_size(shard_size))
            for name, tensor in self.export_hf_weights(model):
                writer.add(name, tensor)
            writer.finish()
            import json

            (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2) + "\n")
            copy_side_files(self.checkpoint.path if self.checkpoint else None, tmp)
        if tdist.is_initialized():
            tdist.barrier()


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    """An init method that leaves the tensor as allocated (its values are loaded next);
    returns it, as torch.nn.init's do (Megatron-Core assigns the result in places)."""
    return tensor


def _unwrap(model: list) -> list:
    return [getattr(m, "module", m) for m in model]


def _parallel_of(model: list) -> ParallelSpec:
    chunk = _unwrap(model)[0]
    if getattr(chunk, "mbridge_parallel", None) is not None:
        return chunk.mbridge_parallel
    cfg = chunk.config
    return ParallelSpec(tp=cfg.tensor_model_parallel_size, pp=cfg.pipeline_model_parallel_size,
                        vpp=cfg.virtual_pipeline_model_parallel_size,
                        ep=cfg.expert_model_parallel_size,
                        etp=cfg.expert_tensor_parallel_size or 1,
                        cp=cfg.context_parallel_size,
                        first_stage_layers=cfg.num_layers_in_first_pipeline_stage,
                        last_stage_layers=cfg.num_layers_in_last_pipeline_stage)


@dataclass
class GPTModelProvider:
    """Mutable settings (Megatron-Bridge's names) -> Megatron-Core model chunks with the
    bridge's HF weights loaded. Set the sizes, call ``finalize()``, then provide."""

    spec: ModelSpec
    bridge: AutoBridge | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    make_vocab_size_divisible_by: int = 128
    params_dtype: str = "float32"
    attention_backend: str = "sdpa"  # without TE: "sdpa" (fused) or "megatron" (unfused local)
    seed: int = 1234
    extra_config: dict[str, Any] = field(default_factory=dict)
    _parallel: ParallelSpec | None = field(default=None, repr=False)

    def parallel_spec(self) -> ParallelSpec:
        return ParallelSpec(
            tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
            vpp=self.virtual_pipeline_model_parallel_size, ep=self.expert_model_parallel_size,
            etp=self.expert_tensor_parallel_size, cp=self.context_parallel_size,
            first_stage_layers=self.num_layers_in_first_pipeline_stage,
            last_stage_layers=self.num_layers_in_last_pipeline_stage,
            vocab_multiple=self.make_vocab_size_divisible_by)

    def finalize(self) -> GPTModelProvider:
        """Validate the settings against the model; raises ValueError naming what to change."""
        from mbridge.sharding.plan import stage_layer_counts

        parallel = self.parallel_spec()
        check_model_fits(self.spec, parallel)
        stage_layer_counts(self.spec.num_layers, parallel)
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"params_dtype={self.params_dtype!r}; use float32, bfloat16 or float16")
        mconfig.transformer_config_kwargs(self.spec, parallel, self.params_dtype)
        self._parallel = parallel
        return self

    def provide_distributed_model(self, wrap_with_ddp: bool = False, ddp_config=None,
                                  use_te: bool | None = None, load_weights: bool = True) -> list:
        """Start (or join) the process groups, build this rank's chunks, load the HF weights."""
        from mbridge.shell import dist
        from mbridge.shell import model as mmodel

        if self._parallel != self.parallel_spec():
            self.finalize()
        parallel = self._parallel
        rank = dist.init(parallel, seed=self.seed)
        extra = dict(self.extra_config, sequence_parallel=self.sequence_parallel)
        if self.bridge is not None and load_weights:
            # every parameter is overwritten (load_hf checks it), so skip drawing random
            # weights, most of import's time on CPU. Not perform_initialization=False: that
            # also skips Megatron-Core's tensor-parallel attributes on the weights (seen:
            # NaN gradient norms at TP=2).
            for name in ("init_method", "output_layer_init_method", "embedding_init_method"):
                extra.setdefault(name, _no_init)
        chunks = mmodel.build_chunks(self.spec, parallel, rank.pp, dtype=self.params_dtype,
                                     use_te=use_te, attention=self.attention_backend,
                                     device=dist.device(), **extra)
        for chunk in chunks:
            chunk.mbridge_parallel = parallel  # read back by export
        if self.bridge is not None and load_weights:
            self.bridge.load_hf_weights(chunks, parallel)
        if wrap_with_ddp:
            chunks = mmodel.wrap_ddp(chunks, ddp_config)
        return chunks
