"""Learning-rate and weight-decay schedules equal Megatron-Core's OptimizerParamScheduler
(the reference, run as is) at every step, for every decay style, over generated settings."""

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.train import recipes
from mbridge.train.config import ConfigError, apply_overrides
from mbridge.train.schedule import Schedule, from_config, lr_at, weight_decay_at


def megatron(s: Schedule):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = SimpleNamespace(param_groups=[{}])
    return OptimizerParamScheduler(
        opt, init_lr=s.init_lr, max_lr=s.max_lr, min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_steps, lr_decay_steps=s.decay_steps, lr_decay_style=s.style,
        start_wd=s.start_wd, end_wd=s.end_wd, wd_incr_steps=s.wd_incr_steps,
        wd_incr_style=s.wd_style, wsd_decay_steps=s.wsd_decay_steps,
        lr_wsd_decay_style=s.wsd_style), opt


@st.composite
def schedules(draw):
    decay = draw(st.integers(2, 200))
    warmup = draw(st.integers(0, decay - 1))
    max_lr = draw(st.floats(1e-5, 1.0))
    style = draw(st.sampled_from(["constant", "linear", "cosine", "inverse-square-root", "WSD"]))
    wd_style = draw(st.sampled_from(["constant", "linear", "cosine"]))
    start_wd = draw(st.floats(0.0, 0.1))
    return Schedule(
        max_lr=max_lr, min_lr=draw(st.floats(0.0, 1.0)) * max_lr,
        init_lr=draw(st.floats(0.0, 1.0)) * max_lr, warmup_steps=warmup, decay_steps=decay,
        style=style, wsd_decay_steps=draw(st.integers(1, decay)),
        wsd_style=draw(st.sampled_from(["linear", "cosine", "exponential", "minus_sqrt"])),
        start_wd=start_wd,
        end_wd=start_wd if wd_style == "constant" else start_wd + draw(st.floats(0.0, 0.1)),
        wd_incr_steps=draw(st.integers(1, 300)), wd_style=wd_style)


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_schedule_equals_megatron_scheduler(s):
    ref, opt = megatron(s)
    for step in range(0, s.decay_steps + 20):
        if step:
            ref.step(1)
        assert lr_at(s, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        assert weight_decay_at(s, step) == pytest.approx(opt.param_groups[0]["weight_decay"],
                                                         rel=1e-12, abs=1e-15)


def test_warmup_cosine_by_hand():
    s = Schedule(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(s, 0) == 0.0 and lr_at(s, 5) == 0.5 and lr_at(s, 10) == 1.0
    assert lr_at(s, 60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(s, 110) == pytest.approx(0.1) and lr_at(s, 500) == 0.1
    wsd = Schedule(max_lr=1.0, warmup_steps=0, decay_steps=100, style="WSD", wsd_decay_steps=20,
                   wsd_style="linear")
    assert lr_at(wsd, 80) == 1.0 and lr_at(wsd, 90) == pytest.approx(0.5)


def test_from_config_defaults_and_errors():
    cfg = recipes.tiny_llama_pretrain()
    s = from_config(cfg)
    assert (s.max_lr, s.min_lr, s.warmup_steps, s.decay_steps) == (3e-3, 3e-4, 3, 30)
    frac = from_config(apply_overrides(cfg, ["scheduler.lr_warmup_iters=0",
                                             "scheduler.lr_warmup_fraction=0.1"]))
    assert frac.warmup_steps == 3
    for bad, words in [(["scheduler.lr_warmup_iters=30"], "warmup"),
                       (["optimizer.min_lr=1.0"], "min_lr"),
                       (["scheduler.lr_decay_style=WSD"], "lr_wsd_decay_iters"),
                       (["scheduler.lr_warmup_fraction=0.1"], "not both")]:
        with pytest.raises(ConfigError, match=words):
            from_config(apply_overrides(cfg, bad))
    assert math.isclose(lr_at(s, 3), 3e-3)
