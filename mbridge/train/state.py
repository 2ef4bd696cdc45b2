"""``TrainState``: everything a step needs besides the batch, explicit and immutable.

The counters (step, consumed samples, skipped steps, lr, loss scale, seed) are plain data
that go into checkpoints as JSON. ``model`` and ``optimizer`` are handles to the parameters
and optimizer state the runtime owns (Megatron-Core modules update them in place), so a
state's handles point at the newest parameters; the counters are what makes it a value.

    state = TrainState(seed=1234)
    state.progress()  -> {"step": 0, "consumed_samples": 0, ...}
"""

from __future__ import annotations

from typing import Any

import msgspec


class Progress(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The counters of a TrainState: what a checkpoint stores and a resume restores."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    lr: float = 0.0
    loss_scale: float = 1.0
    seed: int = 1234


class TrainState(msgspec.Struct, frozen=True, kw_only=True):
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    lr: float = 0.0
    loss_scale: float = 1.0
    seed: int = 1234
    model: Any = None
    optimizer: Any = None

    @property
    def schedule_step(self) -> int:
        """Updates actually applied: the position on the lr schedule (Megatron advances its
        scheduler only after a successful update)."""
        return self.step - self.skipped_steps

    def progress(self) -> Progress:
        return Progress(**{f: getattr(self, f) for f in Progress.__struct_fields__})

    def with_progress(self, progress: Progress) -> TrainState:
        return msgspec.structs.replace(self, **msgspec.structs.asdict(progress))

    def replace(self, **changes) -> TrainState:
        return msgspec.structs.replace(self, **changes)
