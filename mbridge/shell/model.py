"""Build Megatron-Core ``GPTModel`` chunks for this rank from a ModelSpec and ParallelSpec.

Each architecture names its layer builder (``Architecture.layer_builder``); ``BUILDERS``
maps the name to a ``Builder``: ``layers`` gives the layer spec GPTModel takes for one
virtual stage, ``finish`` adjusts the built chunk (rotary frequencies; for Gemma, embedding
scale and logit soft-capping). ``"gpt"``: Transformer Engine's spec when TE is installed and
CUDA is present, else Megatron-Core's local spec with SDPA attention; ``"gpt_block"``:
Megatron-Core's decoder block spec (MoE or dense MLP per layer, multi-latent attention).
Rotary frequencies are set from ``rope.rope_inv_freq`` so every rope variant HF supports
rotates identically here.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from mbridge import config as mconfig
from mbridge.architectures import registry
from mbridge.rope import rope_inv_freq
from mbridge.sharding.dist_checkpoint import checkpoint_renames
from mbridge.shell import cpu_shim, dist, fast_optimizer, vlm
from mbridge.shell.module_spec import building, built_class, submodules_of
from mbridge.specs import ModelSpec, ParallelSpec, torch_dtype

_ACTIVATIONS = {"silu": torch.nn.functional.silu,
                "gelu_tanh": partial(torch.nn.functional.gelu, approximate="tanh")}


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def transformer_config(spec: ModelSpec, parallel: ParallelSpec, dtype: str = "float32", **extra):
    """``TransformerConfig`` (``MLATransformerConfig`` for multi-latent attention)."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer import transformer_config as mtc

    kwargs = mconfig.transformer_config_kwargs(spec, parallel, dtype)
    activations = {**_ACTIVATIONS, "quick_gelu": quick_gelu}
    kwargs["activation_func"] = activations[kwargs["activation_func"]]
    kwargs["params_dtype"] = torch_dtype(kwargs["params_dtype"])
    kwargs["pipeline_dtype"] = torch_dtype(kwargs["pipeline_dtype"])
    cpu = not torch.cuda.is_available()
    # The fusions below need Apex or Transformer Engine kernels; the TE spec brings its own.
    kwargs.update(use_cpu_initialization=cpu, masked_softmax_fusion=False,
                  bias_activation_fusion=False, gradient_accumulation_fusion=False,
                  apply_rope_fusion=False, persist_layer_norm=False)
    if cpu and kwargs.get("moe_token_dispatcher_type") == "alltoall":
        kwargs["moe_token_dispatcher_type"] = "allgather"  # alltoall needs CUDA streams
    kwargs.update(extra)
    if kwargs.pop("multi_latent_attention", False):
        return mtc.MLATransformerConfig(**kwargs)
    return mtc.TransformerConfig(**kwargs)


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


@dataclass(frozen=True)
class Builder:
    """How the shell builds one architecture's layers: ``layers(spec, cfg, use_te=, attention=,
    vp_stage=, pp_rank=)`` -> the layer spec GPTModel takes; ``finish(model, spec)`` after
    GPTModel is built (rotary frequencies and anything else the layers need). ``te``: whether
    ``layers`` has a Transformer Engine variant; without one the local spec is used even
    where TE is installed (asking for ``use_te=True`` is an error)."""

    layers: Callable
    finish: Callable
    te: bool = True


def _gpt_layers(spec: ModelSpec, cfg, *, use_te: bool, attention: str, vp_stage, pp_rank):
    return layer_spec(spec, use_te, attention)


def _block_layers(spec: ModelSpec, cfg, *, use_te: bool, attention: str, vp_stage, pp_rank):
    return block_spec(cfg, use_te, attention, vp_stage, pp_rank)


def set_rope(model, spec: ModelSpec) -> None:
    """Rotary frequencies computed as transformers does (``rope.rope_inv_freq``): on the
    model, or with multi-latent attention on each layer's attention (over its rope dims)."""
    if spec.mla is None:
        model.rotary_pos_emb.inv_freq = rope_inv_freq(spec.rope, spec.head_dim)
        return
    inv_freq = rope_inv_freq(spec.rope, spec.mla.qk_rope_head_dim)
    for layer in model.decoder.layers:
        layer.self_attention.rotary_pos_emb.inv_freq = inv_freq.clone()


BUILDERS: dict[str, Builder | str] = {
    "gpt": Builder(_gpt_layers, set_rope),
    "gpt_block": Builder(_block_layers, set_rope),
    # architectures whose layers Megatron-Core lacks: a shell module with ``layers`` and
    # ``finish``, imported when first used (it subclasses Megatron-Core's modules, and
    # ``import mbridge`` does not import Megatron-Core)
    "gemma": "mbridge.shell.gemma",
}


def builder_of(spec: ModelSpec) -> Builder:
    name = registry.get(spec.architecture).layer_builder
    if name not in BUILDERS:
        raise ValueError(f"{spec.architecture} names layer builder {name!r}, which the shell "
                         f"does not have (known: {', '.join(sorted(BUILDERS))})")
    entry = BUILDERS[name]
    if isinstance(entry, str):
        module = importlib.import_module(entry)
        entry = BUILDERS[name] = Builder(module.layers, module.finish,
                                         getattr(module, "TE", False))
    return entry


def build_chunks(spec: ModelSpec, parallel: ParallelSpec, pp_rank: int, *,
                 dtype: str = "float32", use_te: bool | None = None, attention: str = "sdpa",
                 device: torch.device | str | None = None, pg_collection=None,
                 skip_init: bool = False, modalities: bool = True, **config_extra) -> list:
    """This pipeline rank's model chunks (one per virtual stage), on ``device``, on the
    process groups ``pg_collection`` (Megatron-Core's ``ProcessGroupCollection``; None: the
    groups ``parallel_state`` holds). ``skip_init``: leave the weights as allocated (they
    are loaded next): see ``skip_init_config``."""
    from megatron.core.models.gpt import GPTModel

    cpu_shim.apply()  # Megatron-Core's CUDA-only calls, bridged on a machine without CUDA
    cpu_shim.bridge_missing_te()  # and its unguarded uses of TE, on any device
    fast_optimizer.install()  # the distributed optimizer's per-parameter copies as one
    build = builder_of(spec)
    te = use_te if use_te is not None else have_te()
    # TE's MLA spec replicates the down-projections and fuses the latent norms into the
    # up-projections; mbridge's MLA layouts follow the local spec (works on GPU too)
    local_only = "multi-latent attention" if spec.mla is not None else \
        None if build.te else spec.architecture
    if local_only and te:
        if use_te:
            raise NotImplementedError(f"{local_only} with Transformer Engine's layer spec is "
                                      "not supported yet; use use_te=False")
        te = False
    if spec.moe is not None and te:
        config_extra.setdefault("moe_grouped_gemm", True)  # TEGroupedMLP
    if skip_init:
        config_extra = {**skip_init_config(te), **config_extra}
    cfg = transformer_config(spec, parallel, dtype, **config_extra)
    chunks = []
    for vp in range(parallel.vpp_size):
        first = pp_rank == 0 and vp == 0
        last = pp_rank == parallel.pp - 1 and vp == parallel.vpp_size - 1
        vp_stage = vp if parallel.vpp else None
        lspec = build.layers(spec, cfg, use_te=te, attention=attention, vp_stage=vp_stage,
                             pp_rank=pp_rank)
        extra = {} if pg_collection is None else dict(pg_collection=pg_collection)
        params = dict(config=cfg, transformer_layer_spec=lspec, pre_process=first,
                      post_process=last, vp_stage=vp_stage,
                      **mconfig.gpt_model_kwargs(spec, parallel), **extra)
        if spec.vision is None:
            model = GPTModel(**params)
        else:  # MIMO: the vision modality (first chunk) beside the GPTModel
            model = vlm.build(spec.vision, spec.hidden_size, params, first and modalities)
        build.finish(vlm.language_model(model), spec)
        if not cfg.perform_initialization:
            mark_tensor_parallel(model)
        cast_torch_norms(model, cfg.params_dtype)
        if device is not None:
            model.to(device)
        chunks.append(model)
    return chunks


def cast_torch_norms(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The local spec's norms are plain ``torch.nn.RMSNorm``/``LayerNorm``, which Megatron-Core's
    ``WrappedTorchNorm`` builds in float32 whatever ``params_dtype`` says (TE's norms follow it).
    Cast them, as Megatron-LM's ``Float16Module`` would, so a bf16 model is bf16 throughout: its
    export keeps the checkpoint's dtype, and on GPU the norm takes the fused kernel (a float32
    weight on bf16 input falls back to the unfused one)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(dtype)


def block_spec(cfg, use_te: bool, attention: str, vp_stage: int | None, pp_rank: int):
    """This stage's layer specs for MoE and multi-latent attention models: Megatron-Core's
    ``get_gpt_decoder_block_spec`` (MoE or dense MLP per layer from ``moe_layer_freq``),
    with the local spec's core attention swapped as ``layer_spec`` does and its
    ``SequentialMLP`` experts for ``GroupedSequentialMLP`` (shell/experts.py: the same
    parameters, one grouped product per linear instead of a loop over the experts)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=use_te,
                                       normalization="RMSNorm", vp_stage=vp_stage,
                                       pp_rank=pp_rank)
    if use_te:
        return block
    if attention not in ("sdpa", "megatron"):
        raise ValueError(f"attention={attention!r}; use 'sdpa' or 'megatron'")
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from mbridge.shell.experts import GroupedSequentialMLP
    from mbridge.shell.fast_layers import SDPAttention

    layers = []
    for layer in block.layer_specs:  # the same spec object serves many layers: copy it
        layer = copy.deepcopy(layer)
        sub = layer.submodules
        if attention == "sdpa":
            sub.self_attention.submodules.core_attention = SDPAttention
        # checkpoint names as Transformer Engine's spec writes them (sharding/dist_checkpoint)
        sub.sharded_state_dict_keys_map = checkpoint_renames(
            issubclass(built_class(sub.mlp), MoELayer), cfg.multi_latent_attention)
        moe = submodules_of(sub.mlp)
        experts = getattr(moe, "experts", None)
        if experts is not None and built_class(experts) is SequentialMLP:
            moe.experts = building(experts, GroupedSequentialMLP)  # same parameters
        layers.append(layer)
    block.layer_specs = layers
    return block


def wrap_ddp(chunks: list, ddp_config=None) -> list:
    """Wrap chunks in Megatron-Core's DistributedDataParallel (gradient buffers, overlap).
    DDP synchronises over the data-parallel groups ``dist.init`` started."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = ddp_config or DistributedDataParallelConfig()
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c)
            for c in chunks]


def unwrap(chunks: list) -> list:
    """The GPTModel chunks inside DDP wrappers (chunks that are not wrapped pass through)."""
    return [getattr(c, "module", c) for c in chunks]


def groups_of(chunks) -> dist.Groups:
    """The groups a built model runs on: the ``pg_collection`` Megatron-Core's GPTModel keeps
    and the layout its config states (DDP-wrapped chunks too)."""
    chunk = unwrap(chunks)[0]
    cfg = chunk.config
    parallel = ParallelSpec(tp=cfg.tensor_model_parallel_size,
                            pp=cfg.pipeline_model_parallel_size,
                            vpp=cfg.virtual_pipeline_model_parallel_size,
                            ep=cfg.expert_model_parallel_size,
                            etp=cfg.expert_tensor_parallel_size or 1,
                            cp=cfg.context_parallel_size,
                            first_stage_layers=cfg.num_layers_in_first_pipeline_stage,
                            last_stage_layers=cfg.num_layers_in_last_pipeline_stage)
    return dist.Groups(parallel, chunk.pg_collection)


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    """An init method that leaves the tensor as allocated (its values are loaded next);
    returns it, as torch.nn.init's do (Megatron-Core assigns the result in places)."""
    return tensor


def skip_init_config(te: bool) -> dict:
    """Config settings that build a model without drawing random weights (every parameter is
    loaded next, and ``convert.load_hf`` checks it). Local layers: ``perform_initialization=
    False``, which also skips Megatron-Core's CPU init path (a float32 master weight, split,
    cast and copy per parameter: most of a 1B import's time) and the tensor-parallel
    attributes it sets, which ``mark_tensor_parallel`` restores (without them gradient norms
    are wrong at TP=2: NaN, seen). Transformer Engine's layers keep their own init path,
    with no-op init methods."""
    if not te:
        return dict(perform_initialization=False)
    return dict.fromkeys(("init_method", "output_layer_init_method", "embedding_init_method"),
                         _no_init)


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """The tensor-parallel attributes Megatron-Core's init path sets on the weights of its
    parallel layers (``tensor_parallel/layers.py``: ``set_tensor_model_parallel_attributes``
    in ``_initialize_affine_weight_cpu``/``_gpu``), for a model built with
    ``perform_initialization=False``: column-parallel linears and the vocab-parallel
    embedding split dim 0, row-parallel linears dim 1; stride 1, except an MLP's gated
    ``linear_fc1`` (stride 2, ``[gate; up]`` per rank: ``transformer/mlp.py``)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.mlp import MLP

    dims = ((layers.VocabParallelEmbedding, 0), (layers.ColumnParallelLinear, 0),
            (layers.RowParallelLinear, 1))
    gated = {id(m.linear_fc1) for m in model.modules()
             if isinstance(m, MLP) and m.config.gated_linear_unit and not m.config.use_kitchen}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        dim = next((d for cls, d in dims if isinstance(module, cls)), None)
        if dim is None or weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        stride = 2 if id(module) in gated else 1
        layers.set_tensor_model_parallel_attributes(weight, True, dim, stride)


Hook = Callable[[list], list | None]


def provide(spec: ModelSpec, parallel: ParallelSpec, groups, *, weights=None,
            dtype: str = "float32", use_te: bool | None = None, attention: str = "sdpa",
            config_extra: dict | None = None, pre_wrap_hook: Hook | list[Hook] | None = None,
            wrap_with_ddp: bool = False, ddp_config=None) -> list:
    """Build this rank's chunks on ``groups`` (``dist.Groups``), load ``weights``
    (``shell.weights``; None: Megatron-Core's random init), apply the pre-wrap hooks in order
    (each takes the chunk list and returns it, a new one, or None for "unchanged"; a hook may
    add parameters no checkpoint holds, such as adapters), then wrap in DDP if asked."""
    chunks = build_chunks(spec, parallel, groups.rank.pp, dtype=dtype, use_te=use_te,
                          attention=attention, device=dist.device(),
                          pg_collection=groups.collection, skip_init=weights is not None,
                          **(config_extra or {}))
    if weights is not None:
        weights.load(chunks, parallel, groups)
    hooks = pre_wrap_hook if isinstance(pre_wrap_hook, (list, tuple)) else [pre_wrap_hook]
    for hook in (h for h in hooks if h is not None):
        out = hook(chunks)
        chunks = chunks if out is None else list(out)
    return wrap_ddp(chunks, ddp_config) if wrap_with_ddp else chunks
