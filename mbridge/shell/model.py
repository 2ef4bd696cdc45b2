"""Build Megatron-Core ``GPTModel`` chunks for this rank from a ModelSpec and ParallelSpec.

Layer spec: Transformer Engine's when TE is installed and CUDA is present, Megatron-Core's
local spec otherwise. Rotary frequencies are set from ``config.rope_inv_freq`` so every rope
variant HF supports rotates identically here.
"""

from __future__ import annotations

import torch

from mbridge import config as mconfig
from mbridge.specs import ModelSpec, ParallelSpec

_ACTIVATIONS = {"silu": torch.nn.functional.silu}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def transformer_config(spec: ModelSpec, parallel: ParallelSpec, dtype: str = "float32", **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = mconfig.transformer_config_kwargs(spec, parallel, dtype)
    kwargs["activation_func"] = _ACTIVATIONS[kwargs["activation_func"]]
    kwargs["params_dtype"] = _DTYPES[kwargs["params_dtype"]]
    kwargs["pipeline_dtype"] = _DTYPES[kwargs["pipeline_dtype"]]
    cpu = not torch.cuda.is_available()
    kwargs.update(use_cpu_initialization=cpu, masked_softmax_fusion=not cpu,
                  bias_activation_fusion=False, gradient_accumulation_fusion=False,
                  apply_rope_fusion=False, persist_layer_norm=not cpu)
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def layer_spec(spec: ModelSpec, use_te: bool | None = None, attention: str = "sdpa"):
    """TE's spec when TE is usable; otherwise the local spec with ``attention="sdpa"``
    (mbridge's fused attention, shell/fast_layers.py) or ``"megatron"`` (Megatron-Core's
    unfused DotProductAttention)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te if use_te is not None else have_te():
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    if attention == "sdpa":
        from mbridge.shell.fast_layers import fast_local_spec

        return fast_local_spec(spec.qk_norm)
    if attention != "megatron":
        raise ValueError(f"attention={attention!r}; use 'sdpa' or 'megatron'")
    return specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")


def build_chunks(spec: ModelSpec, parallel: ParallelSpec, pp_rank: int, *,
                 dtype: str = "float32", use_te: bool | None = None, attention: str = "sdpa",
                 device: torch.device | str | None = None, **config_extra) -> list:
    """This pipeline rank's model chunks (one per virtual stage), on ``device``."""
    from megatron.core.models.gpt import GPTModel

    cfg = transformer_config(spec, parallel, dtype, **config_extra)
    lspec = layer_spec(spec, use_te, attention)
    chunks = []
    for vp in range(parallel.vpp_size):
        first = pp_rank == 0 and vp == 0
        last = pp_rank == parallel.pp - 1 and vp == parallel.vpp_size - 1
        model = GPTModel(cfg, lspec, pre_process=first, post_process=last,
                         vp_stage=vp if parallel.vpp else None,
                         **mconfig.gpt_model_kwargs(spec, parallel))
        model.rotary_pos_emb.inv_freq = mconfig.rope_inv_freq(spec.rope, spec.head_dim)
        if device is not None:
            model.to(device)
        chunks.append(model)
    return chunks


def wrap_ddp(chunks: list, ddp_config=None) -> list:
    """Wrap chunks in Megatron-Core's DistributedDataParallel (gradient buffers, overlap)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = ddp_config or DistributedDataParallelConfig()
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c)
            for c in chunks]
