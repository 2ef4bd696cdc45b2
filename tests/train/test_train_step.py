"""The pure step against a small runtime written in plain torch (least squares with SGD): the
step's decisions (lr, clipping, skipping) show in the parameters it leaves behind."""

import functools
import math

import pytest
import torch

from mbridge.train.schedule import Schedule, lr_at
from mbridge.train.state import Progress, TrainState
from mbridge.train.step import GradStats, LossSum, StepConfig, step


class LeastSquares:
    """Runtime protocol over ``w`` for batches ``(x [n, d], y [n])``: loss sum((x w - y)^2)."""

    def __init__(self, dim: int = 3):
        self.w = torch.zeros(dim, requires_grad=True)
        self.opt = torch.optim.SGD([self.w], lr=0.0)
        self.seeds = []

    def forward_backward(self, batch, *, seed):
        self.seeds.append(seed)
        self.opt.zero_grad()
        x, y = batch
        loss = ((x @ self.w - y) ** 2).sum()
        (loss / len(y)).backward()
        return LossSum(total=float(loss), tokens=len(y))

    def grad_stats(self):
        return GradStats(norm=float(self.w.grad.norm()))

    def apply_update(self, *, lr, weight_decay, clip_coeff):
        self.w.grad.mul_(clip_coeff)
        for g in self.opt.param_groups:
            g["lr"], g["weight_decay"] = lr, weight_decay
        self.opt.step()

    def skip_update(self):
        pass

    def loss_scale(self):
        return 1.0


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5])


SCHEDULE = Schedule(max_lr=0.1, warmup_steps=2, decay_steps=50, style="cosine")


def make(clip=0.0):
    rt = LeastSquares()
    cfg = StepConfig(schedule=SCHEDULE, global_batch_size=8, seq_length=1, clip_grad=clip)
    return rt, functools.partial(step, runtime=rt, config=cfg)


def test_steps_follow_the_schedule_and_learn():
    rt, train = make()
    state, losses = TrainState(seed=7), []
    for k in range(30):
        state, m = train(state, data(seed=k))
        losses.append(m.loss)
        assert m.lr == lr_at(SCHEDULE, k) and m.step == k + 1 and not m.skipped
    assert state.step == 30 and state.consumed_samples == 240 and state.skipped_steps == 0
    assert losses[0] > 1.0 and losses[-1] < 1e-2 * losses[0]
    assert len(set(rt.seeds)) == 30  # a fresh random stream every step


def test_a_non_finite_step_is_skipped_and_does_not_advance_the_schedule():
    rt, train = make()
    state = TrainState()
    for k in range(3):
        state, _ = train(state, data(seed=k))
    before = rt.w.detach().clone()
    x, y = data(seed=3)
    state, m = train(state, (x, y * math.nan))
    assert m.skipped and "non-finite" in m.skip_reason
    assert torch.equal(rt.w.detach(), before)
    assert (state.step, state.skipped_steps, state.schedule_step) == (4, 1, 3)
    state, m = train(state, data(seed=4))
    assert m.lr == lr_at(SCHEDULE, 3)  # the lr the skipped step would have used


def test_clipping_scales_the_update():
    rt, train = make(clip=0.01)
    x, y = data()
    state = TrainState(step=5)  # past warmup, lr > 0
    state, m = train(state, (x, y))
    rt2, _ = make()
    loss = ((x @ rt2.w - y) ** 2).mean()
    loss.backward()
    grad = rt2.w.grad
    assert m.clip_coeff == pytest.approx(0.01 / (float(grad.norm()) + 1e-6))
    assert torch.allclose(rt.w.detach(), -m.lr * m.clip_coeff * grad, rtol=1e-6)
    assert float(rt.w.detach().norm()) <= m.lr * 0.01 * (1 + 1e-5)


def test_progress_round_trips_through_json():
    import msgspec

    state = TrainState(step=3, consumed_samples=24, skipped_steps=1, lr=0.5, seed=9,
                       model=object())
    progress = msgspec.json.decode(msgspec.json.encode(state.progress()), type=Progress)
    resumed = TrainState(model="handle").with_progress(progress)
    assert resumed.progress() == state.progress() and resumed.model == "handle"
