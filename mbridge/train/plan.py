"""Check a run config against the model and the world size, and derive what the run needs
(data-parallel size, micro-batches per step, lr schedule, step config). Pure: every
inconsistency is a ConfigError naming the key to change, raised before anything starts.

    plan = plan_run(cfg, spec, world_size=2)   # plan.dp_size, plan.num_microbatches, ...
"""

from __future__ import annotations

import msgspec

from mbridge.sharding.mimo import MimoConfigError, MimoParallelismConfig
from mbridge.sharding.plan import stage_layer_counts
from mbridge.specs import ModelSpec, ParallelSpec, check_model_fits
from mbridge.train import schedule as lr_schedule
from mbridge.train.config import ConfigError, RunConfig
from mbridge.train.sampling import num_microbatches
from mbridge.train.split import split_shares
from mbridge.train.step import StepConfig


class RunPlan(msgspec.Struct, frozen=True, kw_only=True):
    world_size: int
    dp_size: int
    num_microbatches: int
    parallel: ParallelSpec
    step: StepConfig
    mimo: MimoParallelismConfig | None = None  # finalized; None: one layout (no modules)


def mimo_config(cfg: RunConfig) -> MimoParallelismConfig | None:
    """The run's ``MimoParallelismConfig`` (not finalized), None without
    ``model.module_parallelisms``."""
    m = cfg.model
    if m.module_parallelisms is None:
        return None
    return MimoParallelismConfig(llm_module_name=m.llm_module_name,
                                 deployment_mode=m.deployment_mode,
                                 module_parallelisms=dict(m.module_parallelisms))


def parallel_spec(cfg: RunConfig) -> ParallelSpec:
    """The language model's layout: ``model.*_model_parallel_size``, or the language
    module's sizes of ``model.module_parallelisms``."""
    m = cfg.model
    mimo = mimo_config(cfg)
    if mimo is not None and mimo.llm_module_name in mimo.module_parallelisms:
        lm = mimo.module_parallelisms[mimo.llm_module_name]
        _check(m.tensor_model_parallel_size == 1 and m.pipeline_model_parallel_size == 1,
               "model.module_parallelisms gives every module's sizes: leave "
               "model.tensor_model_parallel_size and pipeline_model_parallel_size at 1 and "
               f"set model.module_parallelisms.{mimo.llm_module_name}.tensor_parallel etc.")
        m = msgspec.structs.replace(m, tensor_model_parallel_size=lm.tensor_parallel,
                                    pipeline_model_parallel_size=lm.pipeline_parallel)
    try:
        return ParallelSpec(tp=m.tensor_model_parallel_size, pp=m.pipeline_model_parallel_size,
                            vpp=m.virtual_pipeline_model_parallel_size,
                            ep=m.expert_model_parallel_size, etp=m.expert_tensor_parallel_size,
                            cp=m.context_parallel_size,
                            first_stage_layers=m.num_layers_in_first_pipeline_stage,
                            last_stage_layers=m.num_layers_in_last_pipeline_stage,
                            vocab_multiple=m.make_vocab_size_divisible_by)
    except ValueError as e:
        raise ConfigError(f"model parallel sizes: {e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_sections(cfg: RunConfig) -> None:
    """Checks that need neither the model nor the world size."""
    m, t, d, c = cfg.model, cfg.train, cfg.data, cfg.checkpoint
    if c.pretrained_checkpoint is not None:
        _check(m.spec is None, "checkpoint.pretrained_checkpoint gives the model: unset "
               "model.spec (model.hf_path may name the HF config of a Megatron-LM checkpoint)")
    else:
        _check((m.hf_path is None) != (m.spec is None),
               "set exactly one of model.hf_path (start from an HF checkpoint), model.spec "
               "(random init) and checkpoint.pretrained_checkpoint (fine-tuning)")
    _check(t.train_iters > 0, f"train.train_iters={t.train_iters} must be positive")
    _check(m.seq_length > 0, f"model.seq_length={m.seq_length} must be positive")
    _check(t.eval_iters >= 0, f"train.eval_iters={t.eval_iters} must be >= 0")
    _check(0 <= cfg.rng.seed < 2**31, f"rng.seed={cfg.rng.seed} must be in [0, 2**31)")
    _check(cfg.logging.log_interval > 0,
           f"logging.log_interval={cfg.logging.log_interval} must be positive")
    _check(d.mock + bool(d.blend) + (d.dataset_root is not None) == 1,
           "set one of data.mock=true, data.blend (indexed dataset prefixes) and "
           "data.dataset_root (SFT JSONL files), not several and not none")
    _check(d.sft.pad_to_multiple_of is None or m.pipeline_model_parallel_size == 1,
           "data.sft.pad_to_multiple_of needs model.pipeline_model_parallel_size=1 (pipeline "
           "stages exchange activations of model.seq_length); leave it null")
    _check(d.blend_weights is None or len(d.blend_weights) == len(d.blend),
           f"data.blend_weights has {len(d.blend_weights or ())} weights for "
           f"{len(d.blend)} data.blend paths")
    _check(d.blend_weights is None or all(w > 0 for w in d.blend_weights),
           "data.blend_weights must be positive")
    _check(c.save_interval is None or c.save is not None,
           "checkpoint.save_interval needs checkpoint.save (a directory)")
    _check(m.sequence_parallel is False or m.tensor_model_parallel_size > 1,
           "model.sequence_parallel needs model.tensor_model_parallel_size > 1")
    _check(m.compiled_cross_entropy is not True or m.tensor_model_parallel_size == 1,
           "model.compiled_cross_entropy=true needs model.tensor_model_parallel_size=1 (larger "
           "TP keeps Megatron-Core's vocab-parallel cross entropy)")
    _check(not m.moe_fuse_wgrad_accumulation or m.moe_stacked_experts,
           "model.moe_fuse_wgrad_accumulation=true needs model.moe_stacked_experts=true (the "
           "fused add writes each layer's stacked expert gradient)")
    experts_whole = m.expert_model_parallel_size == 1 and m.expert_tensor_parallel_size == 1
    _check(not m.moe_stacked_experts or experts_whole,
           "model.moe_stacked_experts=true needs model.expert_model_parallel_size=1 and "
           "model.expert_tensor_parallel_size=1")
    _check(m.moe_sorted_dispatch is not True or experts_whole,
           "model.moe_sorted_dispatch=true needs model.expert_model_parallel_size=1 and "
           "model.expert_tensor_parallel_size=1 (leave it null: where it serves)")
    split_shares(d.split)
    lr_schedule.from_config(cfg)


def plan_run(cfg: RunConfig, spec: ModelSpec, world_size: int) -> RunPlan:
    """Check ``cfg`` for ``spec`` on ``world_size`` ranks and derive the run's plan."""
    check_sections(cfg)
    parallel = parallel_spec(cfg)
    mimo = _finalize_mimo(cfg, spec, world_size)  # first: its errors name the module keys
    try:
        check_model_fits(spec, parallel)
        stage_layer_counts(spec.num_layers, parallel)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    moe_keys = [k for k in ("moe_sorted_dispatch", "moe_stacked_experts",
                            "moe_fuse_wgrad_accumulation") if getattr(cfg.model, k) is True]
    _check(spec.moe is not None or not moe_keys,
           f"model.{moe_keys[0] if moe_keys else ''}=true, but {spec.architecture} has no "
           "mixture-of-experts layers")
    _check(cfg.model.seq_length <= spec.max_position_embeddings,
           f"model.seq_length={cfg.model.seq_length} is longer than the model's "
           f"max_position_embeddings={spec.max_position_embeddings}; lower model.seq_length")
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if mimo is not None and mimo.deployment_mode != "homogeneous":
        lm = mimo.module_parallelisms[mimo.llm_module_name]
        world_size = lm.size * parallel.cp  # the language model's share of the world
    _check(world_size % model_parallel == 0,
           f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
           f"sizes ({parallel.tp} x {parallel.pp} x {parallel.cp}); change "
           "model.*_model_parallel_size or --nproc-per-node")
    _check(parallel.cp == 1 or cfg.model.seq_length % (2 * parallel.cp) == 0,
           f"model.seq_length={cfg.model.seq_length} must be divisible by 2 x "
           f"context_parallel_size ({parallel.cp})")
    dp = world_size // model_parallel
    t = cfg.train
    n_micro = num_microbatches(t.global_batch_size, t.micro_batch_size, dp)
    _check(parallel.vpp is None or n_micro >= parallel.pp,
           f"interleaved pipelining needs at least pipeline_model_parallel_size="
           f"{parallel.pp} micro-batches per step, got {n_micro} (global_batch_size / "
           "(micro_batch_size x data-parallel size)); raise train.global_batch_size")
    step = StepConfig(schedule=lr_schedule.from_config(cfg), global_batch_size=t.global_batch_size,
                      seq_length=cfg.model.seq_length, clip_grad=cfg.optimizer.clip_grad,
                      skip_nonfinite=t.skip_nonfinite)
    return RunPlan(world_size=world_size if mimo is None else mimo.world_size, dp_size=dp,
                   num_microbatches=n_micro, parallel=parallel, step=step, mimo=mimo)


def _finalize_mimo(cfg: RunConfig, spec: ModelSpec, world_size: int):
    """``model.module_parallelisms`` finalized on ``world_size`` ranks (ConfigError naming
    the fix), None without it."""
    mimo = mimo_config(cfg)
    if mimo is None:
        return None
    _check(spec.vision is not None, f"model.module_parallelisms lays out the modules of a "
           f"vision-language model; {spec.architecture} has one module: use "
           "model.tensor_model_parallel_size etc.")
    _check(spec.vision.tower == "clip", f"model.module_parallelisms supports LLaVA's CLIP "
           f"tower; {spec.architecture}'s {spec.vision.tower!r} tower (multimodal rope, "
           "image grids) is not supported with a layout per module yet")
    heads = {mimo.llm_module_name: spec.num_heads}
    try:
        mimo = mimo.finalize(world_size, global_batch_size=cfg.train.global_batch_size,
                             num_heads=heads)
    except MimoConfigError as e:
        raise ConfigError(f"model.module_parallelisms: {e}") from None
    _check(set(mimo.module_parallelisms) == {mimo.llm_module_name, "images"},
           f"model.module_parallelisms names modules {sorted(mimo.module_parallelisms)}; a "
           f"vision-language model has 'images' and {mimo.llm_module_name!r}")
    if mimo.deployment_mode != "homogeneous":  # colocated PP > 1: refused by finalize
        for name in mimo.encoder_names:  # the tower runs whole on each of its ranks
            _check(mimo.module_parallelisms[name].pipeline_parallel == 1,
                   f"model.module_parallelisms.{name}.pipeline_parallel="
                   f"{mimo.module_parallelisms[name].pipeline_parallel}: an encoder module "
                   "is not pipelined (its tower runs whole on each of its ranks); set it to 1 "
                   "(the language model may use pipeline_parallel > 1 in heterogeneous mode)")
        _check(cfg.model.context_parallel_size == 1,
               "model.context_parallel_size > 1 is not supported with MIMO layouts")
        _check(cfg.model.virtual_pipeline_model_parallel_size is None,
               "model.virtual_pipeline_model_parallel_size (interleaved stages) is not "
               "supported with MIMO layouts yet; leave it null")
        lm = mimo.module_parallelisms[mimo.llm_module_name]
        _check(lm.pipeline_parallel == 1 or cfg.data.sft.pad_to_multiple_of is None,
               f"data.sft.pad_to_multiple_of needs model.module_parallelisms."
               f"{mimo.llm_module_name}.pipeline_parallel=1 (pipeline stages exchange "
               "activations of model.seq_length); leave it null")
    return mimo
