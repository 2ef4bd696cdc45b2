"""Learning-rate and weight-decay schedules as pure functions of the step.

The same curves as Megatron-Core's ``OptimizerParamScheduler`` (``optimizer_param_scheduler.py``):
linear warmup from ``init_lr`` to ``max_lr`` over ``warmup_steps``, then constant, linear,
cosine, inverse-square-root or WSD (warmup-stable-decay: flat until the last
``wsd_decay_steps``, then linear/cosine/exponential/minus_sqrt) down to ``min_lr`` at
``decay_steps``, and ``min_lr`` after. As in Megatron, the update made at step ``k`` (0-based,
counting successful updates) uses ``lr_at(schedule, k)``, so with warmup the first update
uses ``init_lr``.

    lr_at(Schedule(max_lr=1.0, warmup_steps=10, decay_steps=100), 5) -> 0.5
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from mbridge.train.config import ConfigError, RunConfig


class Schedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_lr: float
    min_lr: float = 0.0
    init_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 1
    style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    wsd_decay_steps: int | None = None
    wsd_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"
    start_wd: float = 0.0
    end_wd: float = 0.0
    wd_incr_steps: int = 1
    wd_style: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self):
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ConfigError(f"need 0 <= optimizer.min_lr ({self.min_lr}) <= optimizer.lr "
                              f"({self.max_lr})")
        if self.init_lr > self.max_lr:
            raise ConfigError(f"scheduler.lr_warmup_init ({self.init_lr}) exceeds "
                              f"optimizer.lr ({self.max_lr})")
        if self.decay_steps <= 0 or self.warmup_steps >= self.decay_steps:
            raise ConfigError(f"warmup ({self.warmup_steps} iters) must be shorter than the "
                              f"decay ({self.decay_steps} iters); lower "
                              "scheduler.lr_warmup_iters or raise scheduler.lr_decay_iters")
        if self.style == "WSD" and not (self.wsd_decay_steps or 0) > 0:
            raise ConfigError("lr_decay_style=WSD needs scheduler.lr_wsd_decay_iters > 0")
        if self.wd_style == "constant" and self.start_wd != self.end_wd:
            raise ConfigError("weight_decay_incr_style=constant needs start_weight_decay == "
                              "end_weight_decay")


def _decay_coeff(s: Schedule, step: int) -> float:
    """Fraction of (max_lr - min_lr) left at ``step``, after warmup, before decay_steps."""
    ratio = (step - s.warmup_steps) / (s.decay_steps - s.warmup_steps)
    if s.style == "linear":
        return 1.0 - ratio
    if s.style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    anneal_start = s.decay_steps - s.wsd_decay_steps
    if step <= anneal_start:
        return 1.0
    wsd = (step - anneal_start) / s.wsd_decay_steps
    return {"linear": lambda: 1.0 - wsd,
            "cosine": lambda: 0.5 * (math.cos(math.pi * wsd) + 1.0),
            "exponential": lambda: 2.0 * math.pow(0.5, wsd) - 1.0,
            "minus_sqrt": lambda: 1.0 - math.sqrt(wsd)}[s.wsd_style]()


def lr_at(s: Schedule, step: int) -> float:
    """Learning rate for the update made at (0-based) ``step``."""
    if s.warmup_steps > 0 and step <= s.warmup_steps:
        return s.init_lr + (s.max_lr - s.init_lr) * step / s.warmup_steps
    if s.style == "constant":
        return s.max_lr
    if step > s.decay_steps:
        return s.min_lr
    if s.style == "inverse-square-root":
        lr = s.max_lr * max(s.warmup_steps, 1) ** 0.5 / max(step, 1) ** 0.5
        return max(s.min_lr, lr)
    return s.min_lr + _decay_coeff(s, step) * (s.max_lr - s.min_lr)


def weight_decay_at(s: Schedule, step: int) -> float:
    """Weight decay for the update made at ``step`` (constant, or rising start -> end)."""
    if step > s.wd_incr_steps or s.wd_style == "constant":
        return s.end_wd
    ratio = step / s.wd_incr_steps
    coeff = ratio if s.wd_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
    return s.start_wd + coeff * (s.end_wd - s.start_wd)


def from_config(cfg: RunConfig) -> Schedule:
    """The Schedule a run config asks for (iterations; defaults as Megatron-Bridge's)."""
    sch, opt, iters = cfg.scheduler, cfg.optimizer, cfg.train.train_iters
    decay = sch.lr_decay_iters if sch.lr_decay_iters is not None else iters
    warmup = sch.lr_warmup_iters
    if sch.lr_warmup_fraction is not None:
        if sch.lr_warmup_iters:
            raise ConfigError("set scheduler.lr_warmup_iters or scheduler.lr_warmup_fraction, "
                              "not both")
        warmup = int(sch.lr_warmup_fraction * decay)
    start_wd = opt.weight_decay if sch.start_weight_decay is None else sch.start_weight_decay
    end_wd = opt.weight_decay if sch.end_weight_decay is None else sch.end_weight_decay
    return Schedule(max_lr=opt.lr, min_lr=opt.min_lr, init_lr=sch.lr_warmup_init,
                    warmup_steps=warmup, decay_steps=decay, style=sch.lr_decay_style,
                    wsd_decay_steps=sch.lr_wsd_decay_iters, wsd_style=sch.lr_wsd_decay_style,
                    start_wd=start_wd, end_wd=end_wd, wd_incr_steps=iters,
                    wd_style=sch.weight_decay_incr_style)
