"""The facade users of Megatron-Bridge know: ``AutoBridge`` and ``GPTModelProvider``.

    bridge = AutoBridge.from_hf_pretrained("path/to/hf_dir")
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False,
                                               pre_wrap_hook=add_adapters)
    bridge.save_hf_pretrained(model, "out_dir")

It holds settings and names only: building, loading and converting are the shell's
(``shell.model.provide``, ``shell.weights``, ``shell.convert``), on explicit process groups
(``shell.dist``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from mbridge import config as mconfig
from mbridge import peft
from mbridge.architectures import registry
from mbridge.io.hf import HFWriter, copy_side_files, parse_size
from mbridge.io.output import atomic_dir, check_output
from mbridge.sharding.plan import stage_layer_counts
from mbridge.shell import adapters as shell_adapters
from mbridge.shell import convert, dist
from mbridge.shell import model as mmodel
from mbridge.shell.weights import HFWeights, McoreWeights, Weights, open_hf, open_mcore_weights
from mbridge.specs import ModelSpec, ParallelSpec, check_model_fits


class AutoBridge:
    """A model's HF config, optionally its weights (an HF checkpoint or a Megatron-Core
    distributed checkpoint), and the recipe to move it to and from Megatron-Core."""

    def __init__(self, hf_config: dict[str, Any], weights: Weights | None = None):
        self.hf_config = hf_config
        self.weights = weights
        self.architecture = registry.architecture_of(hf_config)
        self.spec: ModelSpec = registry.from_hf_config(hf_config)

    @property
    def checkpoint(self):
        """The HF checkpoint the weights come from, or None."""
        return self.weights.checkpoint if isinstance(self.weights, HFWeights) else None

    @classmethod
    def from_hf_pretrained(cls, path: str | os.PathLike, **_ignored) -> AutoBridge:
        """Open an HF directory (config.json + safetensors). Nothing is read beyond headers."""
        weights = open_hf(path)
        return cls(weights.hf_config, weights)

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any]) -> AutoBridge:
        """A bridge with no weights (for random-init models or export only)."""
        return cls(dict(hf_config))

    @classmethod
    def from_megatron_checkpoint(cls, path: str | os.PathLike,
                                 hf_config: str | os.PathLike | None = None) -> AutoBridge:
        """A bridge whose weights are a Megatron-Core distributed checkpoint carrying its HF
        config (``mbridge convert import`` writes one; ``hf_config``: a directory holding
        config.json for checkpoints that carry none), checked against that config:
        providers load it at any TP/PP/VPP/EP."""
        weights = open_mcore_weights(path, hf_config)
        return cls(weights.hf_config, weights)

    from_mcore_checkpoint = from_megatron_checkpoint

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
        """Copy this bridge's weights into live chunks (built on any groups)."""
        if self.weights is None:
            raise ValueError("this bridge has no weights; use from_hf_pretrained or "
                             "from_megatron_checkpoint")
        groups = mmodel.groups_of(model)
        self.weights.load(mmodel.unwrap(model), parallel or groups.parallel, groups)

    def export_hf_weights(self, model: list,
                          cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream ``(hf name, tensor)`` for the whole model on every rank of its groups (for
        weight sync). Parameters no mapping names (adapters a pre-wrap hook added) are not
        exported."""
        model = mmodel.unwrap(model if isinstance(model, list) else [model])
        groups = mmodel.groups_of(model)
        for name, tensor in convert.iter_hf(model, self.mapping(groups.parallel), self.spec,
                                            groups):
            yield name, tensor.cpu() if cpu else tensor

    def save_hf_pretrained(self, model: list, path: str | os.PathLike, *,
                           shard_size: int | str = "5GB", overwrite: bool = False,
                           merge_adapters: bool = False) -> None:
        """Write config.json, sharded safetensors with index, and the source's tokenizer and
        generation files. Every rank must call it; global rank 0 writes, atomically. An
        existing ``path`` is replaced only with ``overwrite=True``, and never when it is, holds
        or lies inside the checkpoint the weights came from (``mbridge.io.output``).
        ``merge_adapters``: write the weights with the model's LoRA/DoRA adapters merged in
        (the live model keeps its weights and adapters)."""
        if merge_adapters:
            with shell_adapters.merged(model):
                return self.save_hf_pretrained(model, path, shard_size=shard_size,
                                               overwrite=overwrite)
        writer_rank = not tdist.is_initialized() or tdist.get_rank() == 0
        shard_bytes = parse_size(shard_size)
        inputs = [self._source(), self._side_files()]
        # every rank checks (the same files), so all refuse before the collective export
        check_output(path, inputs=inputs, overwrite=overwrite)
        if tdist.is_initialized():  # all have checked before rank 0 creates path: at TP=1 the
            tdist.barrier()         # export needs no collective, so rank 0 can finish first
        if not writer_rank:
            for _ in self.export_hf_weights(model):
                pass
            tdist.barrier()
            return
        with atomic_dir(path, inputs=inputs, overwrite=overwrite) as tmp:
            writer = HFWriter(tmp, shard_bytes)
            for name, tensor in self.export_hf_weights(model):
                writer.add(name, tensor)
            writer.finish()
            (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2) + "\n")
            copy_side_files(self._side_files(), tmp)
        if tdist.is_initialized():
            tdist.barrier()

    def save_hf_adapter(self, model: list, path: str | os.PathLike, *,
                        overwrite: bool = False) -> None:
        """Write the model's adapters as Hugging Face peft does (``adapter_config.json`` and
        ``adapter_model.safetensors``, DoRA magnitudes included), gathered from any layout.
        Every rank must call it; global rank 0 writes, atomically (an existing ``path`` is
        replaced only with ``overwrite=True``)."""
        inputs = [self._source(), self._side_files()]
        check_output(path, inputs=inputs, overwrite=overwrite)
        adapter = shell_adapters.spec_of(model)
        if adapter is None:
            raise ValueError("the model has no adapters; provide it with pre_wrap_hook=LoRA(...) "
                             "or load_hf_adapter first")
        tensors = {k: v.cpu() for k, v in shell_adapters.iter_adapter(model, adapter, self.spec)}
        if not tdist.is_initialized() or tdist.get_rank() == 0:
            base = str(self.checkpoint.path) if self.checkpoint is not None else None
            with atomic_dir(path, inputs=inputs, overwrite=overwrite) as tmp:
                save_file(tensors, tmp / peft.WEIGHTS, metadata={"format": "pt"})
                (tmp / peft.CONFIG).write_text(
                    json.dumps(peft.peft_config(adapter, self.spec, base), indent=2) + "\n")
        if tdist.is_initialized():
            tdist.barrier()

    def load_hf_adapter(self, model: list, path: str | os.PathLike, seed: int = 0) -> list:
        """Load a peft LoRA/DoRA adapter directory into the model at its layout, exactly. A
        model without adapters gets one adapter per projection the file holds (the
        canonical variant); a model with adapters must hold the same ones. Returns the
        chunks."""
        path = Path(path)
        for name in (peft.CONFIG, peft.WEIGHTS):
            if not (path / name).is_file():
                raise ValueError(f"{path} has no {name}; point at a directory peft's "
                                 "save_pretrained wrote")
        cfg = json.loads((path / peft.CONFIG).read_text())
        tree = load_file(path / peft.WEIGHTS)
        wanted = peft.adapter_from_peft(cfg, tree.keys(), self.spec)
        have = shell_adapters.spec_of(model)
        if have is None:
            model = shell_adapters.apply(model, wanted, self.spec, seed)
            have = wanted
        elif (have.scheme, have.dim, have.alpha) != (wanted.scheme, wanted.dim, wanted.alpha):
            raise ValueError(f"the model's adapters are {have.scheme} dim={have.dim} "
                             f"alpha={have.alpha}, the file's {wanted.scheme} dim={wanted.dim} "
                             f"alpha={wanted.alpha}; provide the model with matching adapters")
        shell_adapters.load_adapter(model, tree, have, self.spec)
        return model

    def _source(self):
        """The checkpoint directory the weights came from, or None."""
        if isinstance(self.weights, HFWeights):
            return self.weights.checkpoint.path
        if isinstance(self.weights, McoreWeights):
            return self.weights.path
        return None

    def _side_files(self):
        if isinstance(self.weights, HFWeights):
            return self.weights.checkpoint.path
        if isinstance(self.weights, McoreWeights):
            hf_dir = self.weights.path / "hf"
            return hf_dir if hf_dir.is_dir() else None
        return None


@dataclass
class GPTModelProvider:
    """Mutable settings (Megatron-Bridge's names) -> Megatron-Core model chunks with the
    bridge's weights loaded. Set the sizes, call ``finalize()``, then provide."""

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
    _pre_wrap_hooks: list = field(default_factory=list, repr=False)

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
        parallel = self.parallel_spec()
        check_model_fits(self.spec, parallel)
        stage_layer_counts(self.spec.num_layers, parallel)
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"params_dtype={self.params_dtype!r}; use float32, bfloat16 or float16")
        mconfig.transformer_config_kwargs(self.spec, parallel, self.params_dtype)
        self._parallel = parallel
        return self

    def register_pre_wrap_hook(self, hook, prepend: bool = False) -> None:
        """Run ``hook(chunks)`` on every model this provider builds, after the weights are
        loaded and before DDP wrapping (Megatron-Bridge's name)."""
        self._pre_wrap_hooks.insert(0, hook) if prepend else self._pre_wrap_hooks.append(hook)

    def provide_distributed_model(self, wrap_with_ddp: bool = False, ddp_config=None,
                                  use_te: bool | None = None, load_weights: bool = True,
                                  pre_wrap_hook=None, groups: dist.Groups | None = None) -> list:
        """This rank's chunks with the bridge's weights loaded. ``groups``: the process groups
        to build on (``dist.new_groups(parallel)`` for a second layout in the same world);
        None starts (or joins) the world and Megatron-Core's groups for this layout.
        ``pre_wrap_hook``: a callable or a list, applied to the chunks after the weights are
        loaded and before DDP wrapping (after hooks registered with
        ``register_pre_wrap_hook``); a hook may add parameters no checkpoint holds."""
        if self._parallel != self.parallel_spec():
            self.finalize()
        parallel = self._parallel
        if groups is None:
            groups = dist.init(parallel, seed=self.seed)
        elif groups.parallel.replace(vocab_multiple=parallel.vocab_multiple) != parallel:
            raise ValueError(f"groups were made for {groups.parallel}, the provider asks for "
                             f"{parallel}")
        hooks = list(self._pre_wrap_hooks)
        hooks += pre_wrap_hook if isinstance(pre_wrap_hook, (list, tuple)) else [pre_wrap_hook]
        # hooks that need the model's spec (LoRA, DoRA) say so with ``bind``
        hooks = [h.bind(self.spec) if hasattr(h, "bind") else h for h in hooks]
        weights = self.bridge.weights if self.bridge is not None and load_weights else None
        return mmodel.provide(
            self.spec, parallel, groups, weights=weights, dtype=self.params_dtype,
            use_te=use_te, attention=self.attention_backend,
            config_extra=dict(self.extra_config, sequence_parallel=self.sequence_parallel),
            pre_wrap_hook=[h for h in hooks if h is not None], wrap_with_ddp=wrap_with_ddp,
            ddp_config=ddp_config)
