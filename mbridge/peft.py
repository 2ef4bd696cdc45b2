"""LoRA and DoRA for Megatron-Core models, exchanged with Hugging Face peft.

    from mbridge.peft import LoRA, DoRA, CanonicalLoRA
    model = provider.provide_distributed_model(pre_wrap_hook=LoRA(dim=16, alpha=32))
    bridge.save_hf_adapter(model, "adapter_dir")           # peft's adapter files
    bridge.load_hf_adapter(model, "adapter_dir")           # any layout, exactly
    bridge.save_hf_pretrained(model, "merged", merge_adapters=True)

``LoRA``, ``DoRA`` and ``CanonicalLoRA`` are ``adapters.AdapterSpec``s (Megatron-Bridge's
fields and defaults) that are also pre-wrap hooks: the provider calls them with the chunks
and the model's spec after the weights are loaded. ``LoRA`` adapts the fused linears
(``linear_qkv``, ``linear_fc1``) with one adapter each; ``CanonicalLoRA`` gives every
projection its own (peft's layout: ``linear_q``, ``linear_k``, ``linear_v``,
``linear_fc1_gate``, ``linear_fc1_up``), which is what an adapter trained with peft loads
into. This module also reads and writes peft's ``adapter_config.json``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec

from mbridge.adapters import CANONICAL_TARGETS, AdapterSpec, selection
from mbridge.adapters.site import part_name
from mbridge.keys import peft_module
from mbridge.shell import adapters as shell_adapters
from mbridge.specs import ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class LoRA(AdapterSpec, frozen=True, kw_only=True):
    """LoRA as a pre-wrap hook: ``LoRA(target_modules=[...], dim=32, alpha=32, dropout=0.0,
    dropout_position="pre", exclude_modules=[])``."""

    def __call__(self, chunks: list, spec: ModelSpec | None = None, seed: int = 0) -> list:
        if spec is None:
            raise ValueError(f"{type(self).__name__} needs the model's spec: pass it as a "
                             "pre_wrap_hook to provide_distributed_model, or call it with "
                             "spec=bridge.spec")
        return shell_adapters.apply(chunks, plain(self), spec, seed)

    def bind(self, spec: ModelSpec):
        """This hook with the model's spec filled in (the provider calls it)."""
        return partial(self, spec=spec)


class DoRA(LoRA, frozen=True, kw_only=True):
    """DoRA (weight-decomposed LoRA: a learnt magnitude per output row); alpha 64 by default,
    as Megatron-Bridge."""

    scheme: str = "dora"
    alpha: float = 64


class CanonicalLoRA(LoRA, frozen=True, kw_only=True):
    """LoRA with one adapter per projection of the fused linears (peft's layout)."""

    target_modules: tuple[str, ...] = CANONICAL_TARGETS


def plain(adapter: AdapterSpec) -> AdapterSpec:
    """The plain ``AdapterSpec`` of a hook (what the shell and the mappings hold)."""
    return AdapterSpec(**msgspec.structs.asdict(adapter))


def peft_config(adapter: AdapterSpec, spec: ModelSpec,
                base_model: str | None = None) -> dict[str, Any]:
    """peft's ``adapter_config.json`` for ``adapter`` on ``spec``: the HF projections it
    adapts (short names when every layer has the same, else full module names)."""
    modules = [a.hf(j) for a in selection(adapter, spec) for j in a.parts]
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = {m for m in _hf_modules(spec) if m.rsplit(".", 1)[-1] in short}
    uniform = every == set(modules)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": adapter.dim, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "target_modules": short if uniform else sorted(modules), "use_dora":
        adapter.scheme == "dora", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "lora_bias": False,
    }


_UNSUPPORTED = {"use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
                "alpha_pattern": {}, "layer_replication": None, "target_parameters": None}


def adapter_from_peft(cfg: dict[str, Any], tensor_keys, spec: ModelSpec) -> AdapterSpec:
    """The canonical ``AdapterSpec`` that holds a peft LoRA/DoRA adapter (its config and its
    tensors' keys) on ``spec``: one adapter per projection the file holds. ValueError naming
    the setting mbridge cannot hold."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_type={cfg.get('peft_type')!r}; only LORA adapters (LoRA, DoRA) "
                         "are supported")
    if cfg.get("target_parameters"):
        raise ValueError(f"the adapter sets target_parameters={cfg['target_parameters']!r}: "
                         "peft's stacked-experts form (transformers 5's gate_up_proj/down_proj),"
                         " which mbridge does not read yet; use per-expert adapters "
                         "(model.layers.{i}.mlp.experts.{e}.gate_proj/up_proj/down_proj, what "
                         "peft saves for the per-expert model)")
    for name, default in _UNSUPPORTED.items():
        if cfg.get(name, default) not in (default, None, {}, False, "none"):
            raise ValueError(f"the adapter sets {name}={cfg[name]!r}, which mbridge does not "
                             f"support yet; use an adapter with {name}={default!r}")
    every = AdapterSpec(scheme="dora" if cfg.get("use_dora") else "lora",
                        target_modules=CANONICAL_TARGETS, dim=int(cfg["r"]),
                        alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout")
                                                                       or 0.0))
    found = {m for m, _ in filter(None, map(peft_module, tensor_keys))}
    names = {}
    for a in selection(every, spec):
        for j in a.parts:
            full = part_name(a.layer, a.site, a.site.parts[j], a.expert) \
                if len(a.site.parts) > 1 else a.module
            names[a.hf(j)] = full
    unknown = sorted(found - names.keys())
    if unknown:
        raise ValueError(f"the adapter adapts {unknown[:3]}, which are not linears mbridge "
                         f"adapts in {spec.architecture} (q/k/v/o, gate/up/down projections"
                         "; per-expert names model.layers.{i}.mlp.experts.{e}.gate_proj for "
                         "experts)")
    if not found:
        raise ValueError("the adapter file holds no lora_A/lora_B tensors")
    return every.replace(target_modules=_targets(names, found))


def _targets(names: dict[str, str], found: set[str]) -> tuple[str, ...]:
    """``target_modules`` selecting the mcore modules of the HF modules ``found``
    (``names``: HF module -> mcore module or part): a last name where every module of that
    name is found (``linear_fc2``), full names for the rest (a pattern each, matched
    against every module: keep the list short on models with many experts)."""
    by_name: dict[str, list[str]] = {}
    for hf, mc in names.items():
        by_name.setdefault(mc.rsplit(".", 1)[-1], []).append(hf)
    out = []
    for name, hfs in by_name.items():
        hit = [names[h] for h in hfs if h in found]
        out += [name] if len(hit) == len(hfs) else hit
    return tuple(out)


def _hf_modules(spec: ModelSpec) -> list[str]:
    """Every HF module mbridge can adapt in ``spec``, part by part."""
    every = AdapterSpec(target_modules=CANONICAL_TARGETS)
    return [a.hf(j) for a in selection(every, spec) for j in a.parts]
