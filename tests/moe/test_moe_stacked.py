"""Stacked experts (``experts.stack_experts``, a pre-wrap hook): each MoE layer's expert
weights held as one parameter per linear, ``weight{1,2}`` [E, out, in], on real Megatron-Core
models (fp32, CPU). What the model shows outside is unchanged: ``state_dict`` (names, order,
values), ``sharded_state_dict`` (keys, global shapes, offsets, replica ids, data), HF export
(bit for bit against the checkpoint), ``load_state_dict`` and distributed checkpoints in
either direction between stacked and per-expert models. A training pass gives the same loss
and gradients bit for bit (the stacked gradient is the per-expert ones, stacked), and three
steps with DDP and the distributed optimizer give the same losses and exported weights
bit for bit without clipping (Adam is elementwise), within 1e-6 with clipping (the gradient
norm sums per parameter, in another grouping); with ``fuse_wgrad_accumulation`` the stacked
weights' gradients are added into DDP's buffer by their backward (``MainGradGroupedLinear``,
the CPU loop of shell/wgrad.py), and the buffers hold what autograd and DDP's hook put there.
Layouts it does not serve (biased experts: GPT-OSS) keep per-expert parameters.
"""

import re
from functools import partial

import pytest
import torch
from test_moe_dispatch import build, train_pass
from test_moe_parity import tensors

from mbridge.shell.experts import GroupedSequentialMLP, stack_experts

NAMES = ["deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe"]


def described(sharded: dict) -> dict:
    """What a distributed checkpoint records of each entry (and the data it writes)."""
    out = {}
    for k, t in sharded.items():
        data = getattr(t, "data", None)
        out[k] = (type(t).__name__, t.key, tuple(getattr(t, "global_shape", ())),
                  tuple(getattr(t, "global_offset", ())), getattr(t, "replica_id", None),
                  None if not isinstance(data, torch.Tensor) else data.clone())
    return out


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            for x, y in zip(a[k], b[k], strict=True)) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_stacked_model_shows_per_expert_weights(name, moe_dirs, tmp_path):
    bridge, chunk = build(moe_dirs[name], {})
    before = {k: v.clone() for k, v in chunk.state_dict().items() if v is not None}
    sharded = described(chunk.sharded_state_dict())
    experts = [m for m in chunk.modules() if isinstance(m, GroupedSequentialMLP)]
    attrs = [{i: dict(vars(getattr(m.local_experts[0], f"linear_fc{i}").weight))
              for i in (1, 2)} for m in experts]
    stack_experts([chunk])
    assert experts and all(m.stacked for m in experts)
    assert not any(m.stack() for m in experts)  # stacked already
    after = {k: v for k, v in chunk.state_dict().items() if v is not None}
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert same(described(chunk.sharded_state_dict()), sharded)
    names = {n for n, _ in chunk.named_parameters()}
    assert not any("local_experts" in n for n in names)
    for m, expert in zip(experts, attrs, strict=True):
        w1, w2 = m.weight1, m.weight2
        e, f, h = m.num_local_experts, m.config.moe_ffn_hidden_size, m.config.hidden_size
        assert w1.shape == (e, 2 * f, h) and w2.shape == (e, h, f)
        assert (w1.tensor_model_parallel, w1.partition_dim, w1.partition_stride) == (True, 1, 2)
        assert w2.partition_dim == 2  # the split dim past the expert dim; the rest as before
        assert vars(w1) == {**expert[1], "partition_dim": 1}
        assert vars(w2) == {**expert[2], "partition_dim": 2}
    bridge.save_hf_pretrained([chunk], tmp_path / "out")
    src, dst = tensors(moe_dirs[name]), tensors(tmp_path / "out")
    assert src.keys() == dst.keys()
    assert all(src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]) for k in src)


def test_biased_experts_stay_per_expert(moe_dirs):
    _, chunk = build(moe_dirs["gpt_oss"], {})
    stack_experts([chunk])
    assert not any(m.stacked for m in chunk.modules() if isinstance(m, GroupedSequentialMLP))
    assert any("local_experts" in n for n, _ in chunk.named_parameters())


def stacked_grads(grads: dict, experts: int) -> dict:
    """Per-expert gradients as the stacked model names and holds them."""
    out = {}
    for n, g in grads.items():
        m = re.match(r"(.*)\.local_experts\.(\d+)\.linear_fc([12])\.weight$", n)
        if m is None:
            out[n] = g
        elif m[2] == "0":
            out[f"{m[1]}.weight{m[3]}"] = torch.stack(
                [grads[f"{m[1]}.local_experts.{j}.linear_fc{m[3]}.weight"]
                 for j in range(experts)])
    return out


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe", "qwen3_moe"])
def test_stacked_training_pass_is_exact(name, moe_dirs):
    bridge, chunk = build(moe_dirs[name], {"moe_aux_loss_coeff": 1e-2})
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    want = train_pass(chunk, ids)
    stack_experts([chunk])
    got = train_pass(chunk, ids)
    assert torch.equal(got[0], want[0])
    assert got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    grads = stacked_grads(want[2], bridge.spec.moe.num_experts)
    assert got[2].keys() == grads.keys()
    assert all(torch.equal(got[2][k], grads[k]) for k in grads)


def test_load_state_dict_and_dist_checkpoint_both_ways(moe_dirs, tmp_path):
    from megatron.core import dist_checkpointing

    from mbridge.shell import dist_checkpoint

    _, plain = build(moe_dirs["qwen3_moe"], {})
    _, stacked = build(moe_dirs["qwen3_moe"], {})
    stack_experts([stacked])
    reference = {k: v.clone() for k, v in plain.state_dict().items() if v is not None}
    with torch.no_grad():
        for p in stacked.parameters():
            p.zero_()
    stacked.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(v, reference[k]) for k, v in stacked.state_dict().items()
               if v is not None)
    for source, target, d in [(stacked, plain, "s2p"), (plain, stacked, "p2s")]:
        (tmp_path / d).mkdir()
        dist_checkpointing.save({"model0": source.sharded_state_dict()}, str(tmp_path / d))
        with torch.no_grad():
            for p in target.parameters():
                p.add_(1.0)
        dist_checkpoint.load([target], tmp_path / d)
        loaded = {k: v for k, v in target.state_dict().items() if v is not None}
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), d


def train_steps(model_dir, stack: bool, clip: float, steps: int = 3, fuse: bool = False):
    """Losses of ``steps`` optimizer steps with DDP and the distributed optimizer (fp32),
    and the model's state dict afterwards."""
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mbridge import AutoBridge
    from mbridge.shell.cpu_shim import cuda_as_cpu

    # a pass outside the schedule (tests before) left a 0-d scale the schedule cannot copy into
    MoEAuxLossAutoScaler.main_loss_backward_scale = None

    bridge = AutoBridge.from_hf_pretrained(model_dir)
    provider = bridge.to_megatron_provider()
    provider.extra_config.update(moe_aux_loss_coeff=1e-2)
    provider.finalize()
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True)
    hook = partial(stack_experts, fuse_wgrad_accumulation=fuse) if stack else None
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp,
                                               pre_wrap_hook=hook)
    model[0].config.finalize_model_grads_func = finalize_model_grads
    with cuda_as_cpu():
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=clip,
            use_distributed_optimizer=True, params_dtype=torch.float32), model)
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)

    def forward_step(data_iterator, chunk):
        out = chunk(ids, pos, attention_mask=None, labels=ids)
        return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

    losses = []
    for _ in range(steps):
        model[0].zero_grad_buffer()
        opt.zero_grad()
        with cuda_as_cpu():
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=None, model=model,
                num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=False)
            ok, _, _ = opt.step()
        assert ok
        losses.append(out[0]["loss"])
    state = {k: v.clone() for k, v in model[0].module.state_dict().items() if v is not None}
    stacked = [m for m in model[0].modules() if isinstance(m, GroupedSequentialMLP)
               and m.stacked]
    # fused: the stacked weights' gradients went into DDP's buffer in their backward
    assert bool(stacked) == stack and all(
        m.weight1.grad_added_to_main_grad == m.weight2.grad_added_to_main_grad == fuse
        for m in stacked)
    return torch.stack(losses), state


@pytest.mark.slow
@pytest.mark.parametrize("clip, fuse", [(0.0, False), (0.0, True), (1e-2, True)])
def test_stacked_training_steps_match(clip, fuse, moe_dirs):
    want, want_state = train_steps(moe_dirs["qwen3_moe"], False, clip)
    got, got_state = train_steps(moe_dirs["qwen3_moe"], True, clip, fuse=fuse)
    assert want[-1] < want[0]  # it trained
    assert got_state.keys() == want_state.keys()
    if clip == 0.0:
        assert torch.equal(got, want)
        assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    else:
        assert torch.allclose(got, want, rtol=1e-6, atol=0)
        assert all(torch.allclose(got_state[k], want_state[k], rtol=0, atol=1e-6)
                   for k in want_state)
