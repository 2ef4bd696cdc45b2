"""``pretrain(config)``: the training loop, top to bottom. Every check that can fail runs
before the model is built (config, data paths, checkpoint to resume, W&B); then the loop
calls the pure ``step`` and lets ``mbridge.train.cadence`` decide when to log, evaluate,
checkpoint and stop. SIGTERM/SIGINT stop it after the current step, with a checkpoint when
``checkpoint.save`` is set.

    torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llama_pretrain
    from mbridge.training import pretrain            # the same from Python
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as tdist

from mbridge import config as mconfig
from mbridge.io.hf import CheckpointError
from mbridge.io.mcore import HF_DIR
from mbridge.shell import checkpoint, data, dist, image_text, mimo_checkpoint, sft, weights
from mbridge.shell.logger import TrainLogger, check_wandb
from mbridge.specs import ParallelSpec
from mbridge.train import cadence
from mbridge.train.config import ConfigError, RunConfig, adapter_spec
from mbridge.train.plan import RunPlan, check_sections, mimo_config, parallel_spec, plan_run
from mbridge.train.state import TrainState
from mbridge.train.step import Metrics, step


def resolve_model(cfg: RunConfig):
    """(ModelSpec, weights or None, HF config dict, HF source dir or None) for the run: from
    ``checkpoint.pretrained_checkpoint`` when set, else ``model.spec`` or ``model.hf_path``."""
    if cfg.model.spec is not None:
        return cfg.model.spec, None, mconfig.to_hf_config(cfg.model.spec), None
    key, path = "model.hf_path", cfg.model.hf_path
    if cfg.checkpoint.pretrained_checkpoint is not None:
        key, path = "checkpoint.pretrained_checkpoint", cfg.checkpoint.pretrained_checkpoint
    path = Path(path)
    mcore = key != "model.hf_path" and (path / "metadata.json").is_file()
    if mcore and cfg.model.hf_path is None and not (path / HF_DIR).is_dir():
        raise ConfigError(f"{key}={path} is a distributed checkpoint without {HF_DIR}/"
                          "config.json (Megatron-LM's): set model.hf_path to a directory "
                          "holding its HF config.json")
    try:
        if key != "model.hf_path" and cfg.model.hf_path is not None:  # a Megatron-LM checkpoint
            found = weights.open_mcore_weights(path, cfg.model.hf_path)
        else:
            found = weights.open_weights(path)
    except (CheckpointError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"{key}={path}: {e}") from None
    hf_source = path if isinstance(found, weights.HFWeights) else None
    return found.spec, found, found.hf_config, hf_source


def tokenizer_dir(cfg: RunConfig, source) -> Path | None:
    """``data.tokenizer``, else the tokenizer beside the weights (an HF directory, or the
    ``hf/`` files a distributed checkpoint carries)."""
    if cfg.data.tokenizer is not None:
        return Path(cfg.data.tokenizer)
    if isinstance(source, weights.HFWeights):
        return source.checkpoint.path
    if isinstance(source, weights.McoreWeights) and (source.path / HF_DIR).is_dir():
        return source.path / HF_DIR
    return Path(cfg.model.hf_path) if cfg.model.hf_path else None


@dataclass
class DataContext:
    """What a dataset provider (``build_datasets(context) -> (train, valid, test)``) gets:
    the run config, the model's spec, the tokenizer directory (None when none is known), and
    ``note(text)`` to put a line in the training log. A dataset is a sequence of samples,
    each a dict of ``tokens``, ``labels``, ``loss_mask`` and ``position_ids``; one with a
    ``collate(samples)`` method makes its own micro-batches."""

    config: RunConfig
    spec: object
    tokenizer_dir: Path | None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)


def _provider(cfg: RunConfig, dataset_provider, spec):
    if dataset_provider is not None:
        return dataset_provider
    if cfg.data.dataset_root is not None and spec.vision is not None:
        return image_text.build_datasets
    if cfg.data.dataset_root is not None:
        sft.check_root(cfg)
        return sft.build_datasets
    return None


def check_backend(cfg: RunConfig) -> None:
    """Sequence and context parallelism need Transformer Engine's layers: Megatron-Core's
    local norm refuses sequence parallelism and its local attention has no context-parallel
    path."""
    from mbridge.shell.model import have_te

    if have_te():
        return
    if cfg.model.sequence_parallel:
        raise ConfigError("model.sequence_parallel=true needs Transformer Engine (and CUDA); "
                          "Megatron-Core's local layers do not support it")
    if cfg.model.context_parallel_size > 1:
        raise ConfigError("model.context_parallel_size > 1 needs Transformer Engine (and CUDA); "
                          "Megatron-Core's local attention has no context-parallel path")


def _resume_path(cfg: RunConfig) -> Path | None:
    c = cfg.checkpoint
    if c.load is None:
        return None
    path = checkpoint.latest(c.load)
    if path is None and c.exit_on_missing_checkpoint:
        raise CheckpointError(f"checkpoint.load={c.load} holds no checkpoint "
                              "(checkpoint.exit_on_missing_checkpoint=true)")
    return path


class Checked(NamedTuple):
    model: tuple  # resolve_model's (spec, weights, hf config, hf source)
    plan: RunPlan
    resume: Path | None


def check(cfg: RunConfig, world: int | None = None) -> Checked:
    """Every check of ``cfg`` that needs no process group, Transformer Engine or W&B: the
    sections, the model (``model.hf_path`` is opened), the plan on ``world`` ranks (default:
    the model-parallel size, the smallest world it fits), data paths and splits, the
    checkpoint to resume and the save directory. ``--print-config`` runs it too, so it never
    shows a config that cannot run."""
    check_sections(cfg)
    model = resolve_model(cfg)
    if world is None:
        p = parallel_spec(cfg)
        world = p.tp * p.pp * p.cp
        mimo = mimo_config(cfg)
        if mimo is not None:  # the world the modules' rank ranges span
            world = max(m.ranks.stop for m in mimo.module_parallelisms.values()) * p.cp
    plan = plan_run(cfg, model[0], world)
    check_vision(cfg, model[0], tokenizer_dir(cfg, model[1]))
    data.check_paths(cfg)
    data.check_splits(cfg)
    if cfg.data.dataset_root is not None:
        sft.check_root(cfg)
    resume = _resume_path(cfg)
    own = plan.mimo if plan.mimo is not None and plan.mimo.deployment_mode != "homogeneous" \
        else None
    mimo_checkpoint.check_resume(resume, own, load_optim=cfg.checkpoint.load_optim)
    checkpoint.check_save_target(cfg.checkpoint.save, resume)
    return Checked(model, plan, resume)


def check_vision(cfg: RunConfig, spec, processor_dir) -> None:
    """The freeze keys name parts a model has; a vision-language model trains on image-text
    records (``data.dataset_root``) made by its processor."""
    m = cfg.model
    frozen = [k for k in ("freeze_language_model", "freeze_vision_model",
                          "freeze_vision_projection") if getattr(m, k)]
    if spec.vision is None:
        if frozen:
            raise ConfigError(f"model.{frozen[0]}=true, but {spec.architecture} has no vision "
                              "model; these keys are for vision-language models")
        return
    if len(frozen) == 3:
        raise ConfigError("model.freeze_language_model, freeze_vision_model and "
                          "freeze_vision_projection are all true: nothing would train")
    if cfg.data.dataset_root is None:
        raise ConfigError(f"{spec.architecture} trains on image-text records: set "
                          "data.dataset_root (training.jsonl with 'images' and 'text', see "
                          "docs/vision_language.md)")
    if cfg.model.sequence_parallel:
        raise ConfigError("model.sequence_parallel=true is not supported for vision-language "
                          "models yet (the image features enter the full sequence)")
    if cfg.model.context_parallel_size > 1:
        raise ConfigError("model.context_parallel_size > 1 is not supported for "
                          "vision-language models yet")
    image_text.check_processor(processor_dir)


class _StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can stop cleanly after the current step."""

    def __init__(self):
        self.name: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal, if any rank got one (all ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.name else 0.0], device=dist.device())
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return (self.name or "a stop signal on another rank") if flag.item() else None

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def pretrain(cfg: RunConfig, *, on_step: Callable[[Metrics], None] | None = None,
             forward_step: Callable | None = None,
             dataset_provider: Callable | None = None) -> TrainState:
    """Train as ``cfg`` says, resuming from ``checkpoint.load`` when it holds a checkpoint.
    Every rank calls it (under torchrun, or alone as a one-rank run). Returns the final
    TrainState; ``on_step`` sees every step's Metrics.

    ``forward_step(data_iterator, model) -> (output, loss_func)`` replaces the default
    forward step (Megatron-Core's contract; ``loss_func(output)`` returns the loss sum, the
    token count and ``{"lm loss": stack([sum, count])}``). ``dataset_provider(DataContext)
    -> (train, valid, test)`` replaces the datasets ``data`` describes."""
    from mbridge.shell.runtime import MegatronRuntime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    checked = check(cfg, world)
    spec, source, hf_config, hf_source = checked.model
    plan, resume = checked.plan, checked.resume
    check_backend(cfg)
    check_wandb(cfg)
    peft = None if cfg.peft is None else adapter_spec(cfg.peft)
    adapters_only = peft is not None and cfg.peft.adapters_only_checkpoint
    if adapters_only and source is None:
        raise ConfigError("peft.adapters_only_checkpoint=true needs the base weights from "
                          "model.hf_path or checkpoint.pretrained_checkpoint; set one, or "
                          "peft.adapters_only_checkpoint=false")
    provider = _provider(cfg, dataset_provider, spec)
    context = DataContext(cfg, spec, tokenizer_dir(cfg, source))
    datasets = provider(context) if provider is not None else None
    modules = _own_module_layouts(cfg, plan, peft, forward_step)
    # modules with their own layouts make their own groups: parallel_state gets the trivial
    # layout (its RNG tracker and globals), nothing reads its groups
    groups = dist.init(ParallelSpec() if modules else plan.parallel, seed=cfg.rng.seed)
    dist.set_random_seed(cfg.rng.seed, groups)  # before the model is built: its weights
    if modules:
        from mbridge.shell.mimo import MimoRuntime

        if resume is not None:  # the checkpoint's weights (HF files: any layout)
            source = mimo_checkpoint.open_weights(resume)
        runtime = MimoRuntime(spec, plan, model=cfg.model, optimizer=cfg.optimizer,
                              ddp=cfg.parallel, mixed_precision=cfg.mixed_precision,
                              micro_batch_size=cfg.train.micro_batch_size, weights=source,
                              seed=cfg.rng.seed)
    else:
        runtime = MegatronRuntime(spec, plan, groups, model=cfg.model, optimizer=cfg.optimizer,
                                  ddp=cfg.parallel, mixed_precision=cfg.mixed_precision,
                                  micro_batch_size=cfg.train.micro_batch_size,
                                  weights=source if resume is None or adapters_only else None,
                                  peft=peft, seed=cfg.rng.seed, forward_step=forward_step)
    state = TrainState(seed=cfg.rng.seed, model=runtime.model, optimizer=runtime.optimizer)
    if resume is not None:
        c = cfg.checkpoint
        if modules:
            progress = mimo_checkpoint.load(resume, runtime, optim=c.load_optim, rng=c.load_rng)
        else:
            progress = checkpoint.load(resume, runtime, optim=c.load_optim, rng=c.load_rng,
                                       adapters_only=adapters_only)
        state = state.with_progress(progress)
    train_ds, valid_ds = datasets[:2] if datasets else data.build(cfg, spec.vocab_size)
    dp_rank = groups.dp_rank
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    log = TrainLogger(cfg, spec, rank=tdist.get_rank(), world_size=world,
                      start_step=state.step, device_name=device)
    for line in context.notes:
        log.note(line)
    if resume is not None:
        log.note(f"resumed from {resume} at step {state.step}")
    train_step = functools.partial(step, runtime=runtime, config=plan.step)
    save = functools.partial(_save_modules if modules else _save, cfg, runtime,
                             hf_config=hf_config, spec_json=spec.to_json(),
                             hf_source=hf_source, adapters_only=adapters_only)
    stop = _StopSignal()
    try:
        reason = cadence.stop_reason(state.step, cfg.train.train_iters)
        while reason is None:
            start = time.perf_counter()
            if modules:  # each module's DP share (mbridge.train.mimo)
                batch = runtime.batch_at(train_ds, state.consumed_samples)
            else:
                batch = data.batch_at(train_ds, state.consumed_samples, cfg, plan, dp_rank)
                data.check_tokens(batch, spec.vocab_size)
            state, metrics = train_step(state, batch)
            seconds = time.perf_counter() - start
            reason = cadence.stop_reason(state.step, cfg.train.train_iters,
                                         cfg.train.exit_interval, stop.agreed())
            log.step(metrics, seconds, last=reason is not None)
            if on_step is not None:
                on_step(metrics)
            _eval_and_save(cfg, plan, runtime, valid_ds, dp_rank, state, log, save,
                           last=reason is not None)
        log.note(f"stopped after step {state.step}: {reason}")
    finally:
        stop.restore()
        log.close()
    return state


def _own_module_layouts(cfg: RunConfig, plan: RunPlan, peft, forward_step) -> bool:
    """Whether the modules run at their own layouts (``model.module_parallelisms``,
    colocated or heterogeneous: ``shell.mimo``), refusing what that runtime lacks yet."""
    if plan.mimo is None or plan.mimo.deployment_mode == "homogeneous":
        return False
    mode = f"model.deployment_mode={plan.mimo.deployment_mode}"
    if peft is not None or forward_step is not None:
        raise ConfigError(f"{mode} does not support peft or a custom forward_step yet")
    return True


def _eval_and_save(cfg, plan, runtime, valid_ds, dp_rank, state, log, save, *, last) -> None:
    t = cfg.train
    if valid_ds is not None and cadence.should_eval(state.step, t.eval_interval, t.eval_iters,
                                                    last=last):
        if hasattr(runtime, "batch_at"):  # modules with their own layouts
            gbs = cfg.train.global_batch_size
            batches = [runtime.batch_at(valid_ds, i * gbs) for i in range(t.eval_iters)]
        else:
            batches = data.validation_batches(valid_ds, cfg, plan, dp_rank)
        loss = runtime.evaluate(batches)
        log.evaluation(state.step, loss.mean)
    c = cfg.checkpoint
    if cadence.should_save(state.step, c.save_interval, last=last, saving=c.save is not None):
        path = save(state)
        log.note(f"saved checkpoint {path}")


def _save(cfg: RunConfig, runtime, state: TrainState, *, hf_config, spec_json, hf_source,
          adapters_only=False):
    return checkpoint.save(cfg.checkpoint.save, runtime, state.progress(), cfg.to_dict(),
                           hf_config=hf_config, spec_json=spec_json, hf_source=hf_source,
                           keep=cfg.checkpoint.most_recent_k, adapters_only=adapters_only)


def _save_modules(cfg: RunConfig, runtime, state: TrainState, *, hf_config, spec_json,
                  hf_source, adapters_only=False):
    """A MIMO run's checkpoint ``{checkpoint.save}/iter_{step}``: the model as an HF
    directory, one safetensors file per module, and each rank's optimizer and RNG state with
    the progress (``shell.mimo_checkpoint``): ``checkpoint.load`` resumes it exactly,
    ``checkpoint.pretrained_checkpoint`` starts from its weights at any layout."""
    return mimo_checkpoint.save(cfg.checkpoint.save, runtime, state.progress(),
                                hf_config=hf_config, hf_source=hf_source,
                                keep=cfg.checkpoint.most_recent_k)


def finetune(cfg: RunConfig, *, on_step: Callable[[Metrics], None] | None = None,
             forward_step: Callable | None = None,
             dataset_provider: Callable | None = None) -> TrainState:
    """Fine-tune: ``pretrain`` starting from ``checkpoint.pretrained_checkpoint`` (weights
    only; or ``model.hf_path``) rather than random init; ``checkpoint.load`` resumes a
    fine-tuning run exactly. Same arguments as ``pretrain``."""
    if cfg.checkpoint.pretrained_checkpoint is None and cfg.model.hf_path is None:
        raise ConfigError("fine-tuning starts from trained weights: set "
                          "checkpoint.pretrained_checkpoint=DIR (an HF directory or a "
                          "distributed checkpoint)")
    return pretrain(cfg, on_step=on_step, forward_step=forward_step,
                    dataset_provider=dataset_provider)
