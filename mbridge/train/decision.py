"""Per-step decisions as pure functions: gradient clipping, skipping a bad step, seeds.

    decide_update(loss=2.3, grad_norm=4.0, clip_grad=1.0) -> Update(skip=False, clip_coeff=~0.25)
"""

from __future__ import annotations

import math

import msgspec


class Update(msgspec.Struct, frozen=True, kw_only=True):
    """What to do with this step's gradients: apply them scaled by ``clip_coeff``, or skip
    the update (``reason`` says why)."""

    skip: bool
    clip_coeff: float = 1.0
    reason: str = ""


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """Factor to scale gradients by so their global L2 norm is at most ``max_norm``
    (Megatron-Core's ``max_norm / (norm + 1e-6)``, applied only when below 1; ``max_norm``
    <= 0 disables clipping). ``clip_coefficient(4.0, 1.0) -> 0.2499999...``"""
    if max_norm <= 0:
        return 1.0
    coeff = max_norm / (grad_norm + 1.0e-6)
    return coeff if coeff < 1.0 else 1.0


def decide_update(*, loss: float, grad_norm: float, clip_grad: float,
                  found_inf: bool = False, skip_nonfinite: bool = True) -> Update:
    """Skip when the loss or gradient norm is NaN/inf (or the loss scaler found inf grads),
    else clip. Raises FloatingPointError instead of skipping when ``skip_nonfinite`` is off."""
    bad = [name for name, v in (("loss", loss), ("grad norm", grad_norm)) if not math.isfinite(v)]
    if found_inf:
        bad.append("inf/NaN gradients")
    if bad:
        reason = f"non-finite {', '.join(bad)} (loss={loss}, grad_norm={grad_norm})"
        if not skip_nonfinite:
            raise FloatingPointError(f"{reason}; set train.skip_nonfinite=true to skip such steps")
        return Update(skip=True, reason=reason)
    return Update(skip=False, clip_coeff=clip_coefficient(grad_norm, clip_grad))


def step_seed(seed: int, step: int) -> int:
    """Seed of the random streams (dropout) used at ``step``: a pure function of the run seed
    and the step, so a resumed run draws exactly what an uninterrupted one would.
    Deterministic across processes and Python versions (no ``hash``)."""
    x = (seed * 0x9E3779B1 + step * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return x & 0x7FFFFFFF


def stage_seed(seed: int, pp_rank: int) -> int:
    """The seed of pipeline stage ``pp_rank`` (Megatron-LM's ``_set_random_seed``:
    ``seed + 100 * pp_rank``): stages draw different weights, while the tensor- and
    data-parallel ranks of one stage share it, so data-parallel replicas start identical
    (Megatron-Core's CPU initialisation draws a whole weight and keeps this rank's slice)."""
    return seed + 100 * pp_rank
