"""The training step, ``step(state, batch) -> (state, metrics)``, written against a small
``Runtime`` protocol: the runtime computes losses and gradients and applies updates; every
decision (lr, weight decay, clip coefficient, skip) is made here by pure functions.

    train_step = functools.partial(step, runtime=runtime, config=StepConfig(...))
    state, metrics = train_step(state, batch)

``mbridge.shell.runtime.MegatronRuntime`` binds it to Megatron-Core; the tests also run it
against a small pure-torch runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from mbridge.train import decision, schedule
from mbridge.train.state import TrainState


class LossSum(msgspec.Struct, frozen=True):
    """Sum of per-token losses and the number of tokens, over the whole global batch."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / max(self.tokens, 1)


class GradStats(msgspec.Struct, frozen=True):
    """Global L2 norm of the gradients (every rank agrees) and whether the loss scaler saw
    inf/NaN gradients."""

    norm: float
    found_inf: bool = False


class Runtime(Protocol):
    """What a step asks of the machinery that owns the parameters."""

    def forward_backward(self, batch: Any, *, seed: int) -> LossSum:
        """Forward and backward over ``batch`` (this rank's micro-batches) with random
        streams seeded by ``seed``; gradients reduced across data-parallel ranks."""

    def grad_stats(self) -> GradStats:
        """Unscale the gradients and measure them."""

    def apply_update(self, *, lr: float, weight_decay: float, clip_coeff: float) -> None:
        """Scale gradients by ``clip_coeff`` and take an optimizer step."""

    def skip_update(self) -> None:
        """Drop this step's gradients."""

    def loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16 scaling)."""


class StepConfig(msgspec.Struct, frozen=True, kw_only=True):
    schedule: schedule.Schedule
    global_batch_size: int
    seq_length: int
    clip_grad: float = 1.0
    skip_nonfinite: bool = True


class Metrics(msgspec.Struct, frozen=True, kw_only=True):
    """What one step reports. ``step`` counts updates completed after this step."""

    step: int
    loss: float
    lr: float
    weight_decay: float
    grad_norm: float
    clip_coeff: float
    skipped: bool
    loss_scale: float
    tokens: int
    consumed_samples: int
    skip_reason: str = ""


def step(state: TrainState, batch: Any, *, runtime: Runtime,
         config: StepConfig) -> tuple[TrainState, Metrics]:
    """One optimizer step on ``batch``; returns the advanced state and its metrics."""
    lr = schedule.lr_at(config.schedule, state.schedule_step)
    wd = schedule.weight_decay_at(config.schedule, state.schedule_step)
    loss = runtime.forward_backward(batch, seed=decision.step_seed(state.seed, state.step))
    grads = runtime.grad_stats()
    update = decision.decide_update(loss=loss.mean, grad_norm=grads.norm,
                                    clip_grad=config.clip_grad, found_inf=grads.found_inf,
                                    skip_nonfinite=config.skip_nonfinite)
    if update.skip:
        runtime.skip_update()
    else:
        runtime.apply_update(lr=lr, weight_decay=wd, clip_coeff=update.clip_coeff)
    new = state.replace(step=state.step + 1,
                        consumed_samples=state.consumed_samples + config.global_batch_size,
                        skipped_steps=state.skipped_steps + update.skip, lr=lr,
                        loss_scale=runtime.loss_scale())
    metrics = Metrics(step=new.step, loss=loss.mean, lr=lr, weight_decay=wd,
                      grad_norm=grads.norm, clip_coeff=update.clip_coeff, skipped=update.skip,
                      loss_scale=new.loss_scale,
                      tokens=config.global_batch_size * config.seq_length,
                      consumed_samples=new.consumed_samples, skip_reason=update.reason)
    return new, metrics
