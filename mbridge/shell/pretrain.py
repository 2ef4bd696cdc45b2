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
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as tdist

from mbridge import config as mconfig
from mbridge.io.hf import CheckpointError
from mbridge.shell import checkpoint, data, dist, weights
from mbridge.shell.logger import TrainLogger, check_wandb
from mbridge.train import cadence
from mbridge.train.config import ConfigError, RunConfig, adapter_spec
from mbridge.train.plan import RunPlan, check_sections, parallel_spec, plan_run
from mbridge.train.state import TrainState
from mbridge.train.step import Metrics, step


def resolve_model(cfg: RunConfig):
    """(ModelSpec, weights or None, HF config dict, HF source dir or None) for the run."""
    if cfg.model.spec is not None:
        return cfg.model.spec, None, mconfig.to_hf_config(cfg.model.spec), None
    path = Path(cfg.model.hf_path)
    try:
        found = weights.open_weights(path)
    except (CheckpointError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"model.hf_path={cfg.model.hf_path}: {e}") from None
    hf_source = path if isinstance(found, weights.HFWeights) else None
    return found.spec, found, found.hf_config, hf_source


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
    plan = plan_run(cfg, model[0], world)
    data.check_paths(cfg)
    data.check_splits(cfg)
    resume = _resume_path(cfg)
    checkpoint.check_save_target(cfg.checkpoint.save, resume)
    return Checked(model, plan, resume)


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


def pretrain(cfg: RunConfig, *, on_step: Callable[[Metrics], None] | None = None) -> TrainState:
    """Train as ``cfg`` says, resuming from ``checkpoint.load`` when it holds a checkpoint.
    Every rank calls it (under torchrun, or alone as a one-rank run). Returns the final
    TrainState; ``on_step`` sees every step's Metrics."""
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
                          "model.hf_path; set it, or peft.adapters_only_checkpoint=false")
    groups = dist.init(plan.parallel, seed=cfg.rng.seed)
    dist.set_random_seed(cfg.rng.seed, groups)  # before the model is built: its weights
    runtime = MegatronRuntime(spec, plan, groups, model=cfg.model, optimizer=cfg.optimizer,
                              ddp=cfg.parallel, mixed_precision=cfg.mixed_precision,
                              micro_batch_size=cfg.train.micro_batch_size,
                              weights=source if resume is None or adapters_only else None,
                              peft=peft, seed=cfg.rng.seed)
    state = TrainState(seed=cfg.rng.seed, model=runtime.model, optimizer=runtime.optimizer)
    if resume is not None:
        c = cfg.checkpoint
        state = state.with_progress(checkpoint.load(resume, runtime, optim=c.load_optim,
                                                    rng=c.load_rng, adapters_only=adapters_only))
    train_ds, valid_ds = data.build(cfg, spec.vocab_size)
    dp_rank = groups.dp_rank
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    log = TrainLogger(cfg, spec, rank=tdist.get_rank(), world_size=world,
                      start_step=state.step, device_name=device)
    if resume is not None:
        log.note(f"resumed from {resume} at step {state.step}")
    train_step = functools.partial(step, runtime=runtime, config=plan.step)
    save = functools.partial(_save, cfg, runtime, hf_config=hf_config,
                             spec_json=spec.to_json(), hf_source=hf_source,
                             adapters_only=adapters_only)
    stop = _StopSignal()
    try:
        reason = cadence.stop_reason(state.step, cfg.train.train_iters)
        while reason is None:
            start = time.perf_counter()
            batch = data.batch_at(train_ds, state.consumed_samples, cfg, plan, dp_rank)
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


def _eval_and_save(cfg, plan, runtime, valid_ds, dp_rank, state, log, save, *, last) -> None:
    t = cfg.train
    if valid_ds is not None and cadence.should_eval(state.step, t.eval_interval, t.eval_iters,
                                                    last=last):
        loss = runtime.evaluate(data.validation_batches(valid_ds, cfg, plan, dp_rank))
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
