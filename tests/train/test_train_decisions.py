"""Pure decisions: clipping, skipping bad steps, seeds, cadence, checkpoint retention and
data sampling, with hypothesis where there is a law to hold."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.train import cadence, decision
from mbridge.train.config import ConfigError
from mbridge.train.sampling import microbatch_indices, num_microbatches

finite = st.floats(0.0, 1e6, allow_nan=False)


@given(norm=finite, max_norm=st.floats(1e-3, 1e3))
def test_clipping_bounds_the_norm_and_never_scales_up(norm, max_norm):
    coeff = decision.clip_coefficient(norm, max_norm)
    assert 0.0 < coeff <= 1.0
    assert norm * coeff <= max_norm * (1 + 1e-9)
    if norm + 1e-6 <= max_norm:  # Megatron's epsilon: max_norm / (norm + 1e-6)
        assert coeff == 1.0


def test_clipping_matches_megatron_on_tensors():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    from mbridge.shell.cpu_shim import cuda_as_cpu

    with cuda_as_cpu():
        clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=norm)
    coeff = decision.clip_coefficient(norm, 0.5)
    assert all(torch.equal(p.grad, g * coeff) for p, g in zip(params, grads))
    assert decision.clip_coefficient(norm, 0.0) == 1.0  # clip_grad=0 disables clipping


@pytest.mark.parametrize("loss,norm,inf", [(math.nan, 1.0, False), (1.0, math.inf, False),
                                           (1.0, math.nan, False), (1.0, 1.0, True)])
def test_non_finite_steps_are_skipped_or_raise(loss, norm, inf):
    update = decision.decide_update(loss=loss, grad_norm=norm, clip_grad=1.0, found_inf=inf)
    assert update.skip and update.reason
    with pytest.raises(FloatingPointError, match="skip_nonfinite"):
        decision.decide_update(loss=loss, grad_norm=norm, clip_grad=1.0, found_inf=inf,
                               skip_nonfinite=False)


def test_finite_steps_are_clipped_not_skipped():
    update = decision.decide_update(loss=2.0, grad_norm=4.0, clip_grad=1.0)
    assert not update.skip and update.clip_coeff == pytest.approx(0.25)


@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10**7))
def test_step_seed_is_a_pure_function(seed, step):
    s = decision.step_seed(seed, step)
    assert 0 <= s < 2**31 and s == decision.step_seed(seed, step)


def test_step_seeds_differ_across_steps():
    assert len({decision.step_seed(1234, k) for k in range(10_000)}) == 10_000


@settings(deadline=None)
@given(interval=st.integers(1, 50), steps=st.integers(1, 300))
def test_cadence_fires_every_interval(interval, steps):
    fired = [s for s in range(steps + 1) if cadence.should_log(s, interval)]
    assert fired == list(range(interval, steps + 1, interval))
    saves = [s for s in range(1, steps + 1)
             if cadence.should_save(s, interval, last=s == steps)]
    assert saves[-1] == steps and set(saves) >= set(fired)
    assert not any(cadence.should_save(s, interval, saving=False) for s in range(steps + 1))


def test_eval_and_stop():
    assert cadence.should_eval(10, 5, 2) and not cadence.should_eval(10, 5, 0)
    assert not cadence.should_eval(7, 5, 2) and cadence.should_eval(7, 5, 2, last=True)
    assert not cadence.should_eval(7, None, 2, last=True)
    assert cadence.stop_reason(9, 10) is None
    assert "train_iters" in cadence.stop_reason(10, 10)
    assert "exit_interval" in cadence.stop_reason(4, 10, exit_interval=4)
    assert "SIGTERM" in cadence.stop_reason(3, 10, signal="SIGTERM")


@given(steps=st.sets(st.integers(1, 10**6), max_size=20), keep=st.integers(-1, 25))
def test_retention_keeps_the_newest(steps, keep):
    gone = cadence.to_delete(steps, keep)
    kept = sorted(set(steps) - set(gone))
    if keep < 0:
        assert gone == ()
    else:
        assert kept == sorted(steps)[-max(keep, 1):] if steps else kept == []


@given(steps=st.sets(st.integers(1, 100), max_size=20), keep=st.integers(1, 25),
       current=st.integers(1, 100))
def test_retention_never_deletes_the_checkpoint_just_written(steps, keep, current):
    """Issue 16, finding 5: a run saving step ``current`` into a directory that holds higher
    steps deleted its own new checkpoint (and the tracker named it)."""
    steps = steps | {current}
    gone = set(cadence.to_delete(steps, keep, current=current))
    assert current not in gone and not any(s > current for s in gone)
    older = sorted(s for s in steps if s <= current)
    assert sorted(set(older) - gone) == older[-keep:]


def test_checkpoint_names_round_trip():
    names = [cadence.checkpoint_name(s) for s in (20, 5, 1000)] + ["other", "iter_12", ".tmp"]
    assert cadence.checkpoint_steps(names) == (5, 20, 1000)
    assert cadence.checkpoint_name(10) == "iter_0000010"


@st.composite
def batch_settings(draw):
    mbs, dp = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return mbs, dp, mbs * dp * draw(st.integers(1, 5))


@given(batch_settings(), st.integers(0, 10**6))
def test_sampling_covers_the_global_batch_once(setting, consumed):
    mbs, dp, gbs = setting
    per_rank = [microbatch_indices(consumed, global_batch_size=gbs, micro_batch_size=mbs,
                                   dp_size=dp, dp_rank=r) for r in range(dp)]
    flat = sorted(i for rank in per_rank for mb in rank for i in mb)
    assert flat == list(range(consumed, consumed + gbs))
    assert all(len(mb) == mbs for rank in per_rank for mb in rank)
    # resuming at the next batch reads what an uninterrupted run reads next
    nxt = microbatch_indices(consumed + gbs, global_batch_size=gbs, micro_batch_size=mbs,
                             dp_size=dp, dp_rank=0)
    assert nxt[0][0] == consumed + gbs


def test_sampling_rejects_indivisible_batches():
    assert num_microbatches(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        num_microbatches(6, 2, 2)
