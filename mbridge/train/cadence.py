"""When to log, evaluate, checkpoint and stop; which checkpoints to keep. Pure functions of
the step count (``step`` = updates completed, Megatron's ``iteration``).

    should_save(10, save_interval=5, last=False) -> True
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def is_due(step: int, interval: int | None) -> bool:
    """True every ``interval`` steps (never when interval is None or <= 0)."""
    return bool(interval) and interval > 0 and step > 0 and step % interval == 0


def should_log(step: int, log_interval: int, *, last: bool = False) -> bool:
    return is_due(step, log_interval) or (last and step > 0)


def should_eval(step: int, eval_interval: int | None, eval_iters: int, *,
                last: bool = False) -> bool:
    """Evaluate every ``eval_interval`` steps and after the last one, if there is a
    validation budget (``eval_iters`` > 0)."""
    return eval_iters > 0 and (is_due(step, eval_interval) or (last and bool(eval_interval)))


def should_save(step: int, save_interval: int | None, *, last: bool = False,
                saving: bool = True) -> bool:
    """Checkpoint every ``save_interval`` steps and at the end of the run."""
    return saving and step > 0 and (is_due(step, save_interval) or last)


def stop_reason(step: int, train_iters: int, exit_interval: int | None = None,
                signal: str | None = None) -> str | None:
    """Why training stops after ``step`` updates, or None to go on."""
    if step >= train_iters:
        return f"reached train.train_iters={train_iters}"
    if is_due(step, exit_interval):
        return f"reached train.exit_interval={exit_interval}"
    if signal:
        return f"received {signal}"
    return None


_ITER = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    """Megatron-LM's directory name: ``checkpoint_name(10) -> "iter_0000010"``."""
    return f"iter_{step:07d}"


def checkpoint_steps(names: Iterable[str]) -> tuple[int, ...]:
    """Steps of the checkpoint directories among ``names``, ascending."""
    return tuple(sorted(int(m.group(1)) for m in map(_ITER.match, names) if m))


def to_delete(steps: Iterable[int], keep: int, *, current: int | None = None) -> tuple[int, ...]:
    """Which checkpoints to delete to keep the newest ``keep`` (``keep`` < 0: keep all).
    With ``current`` (the step just saved) only the steps up to it count: the newest is the
    one just written, never deleted, and checkpoints of higher steps (left by an earlier run
    this one resumed before) are not this run's to remove.
    ``to_delete([5, 10, 15], 2) -> (5,)``; ``to_delete([5, 10, 15], 1, current=10) -> (5,)``"""
    ordered = sorted(s for s in steps if current is None or s <= current)
    if keep < 0 or len(ordered) <= keep:
        return ()
    return tuple(ordered[: len(ordered) - max(keep, 1)])
