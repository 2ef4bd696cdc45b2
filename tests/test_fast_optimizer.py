"""The foreach replacements of Megatron-Core's per-parameter optimizer loops give the same
bits: the distributed optimizer's main -> model parameter copy (shell/fast_optimizer.py),
and gradient clipping's scale (cpu_shim.foreach_scale), on a real Megatron-Core model and
optimizer (one rank, gloo)."""

import torch

from mbridge import GPTModelProvider, ModelSpec
from mbridge.shell import cpu_shim, fast_optimizer

SPEC = ModelSpec(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=32,
                 ffn_hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def test_foreach_param_copy_is_megatrons_copy():
    """bf16 parameters with float32 main shards (with float32 parameters the shards are views
    of the parameters themselves: the copy has nothing to change)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    dtype = "bfloat16"
    provider = GPTModelProvider(spec=SPEC, params_dtype=dtype)
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    with cpu_shim.cuda_as_cpu():
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=dtype == "bfloat16", use_distributed_optimizer=True,
            params_dtype=getattr(torch, dtype)), model)
    inner = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    assert isinstance(inner, DistributedOptimizer)
    assert DistributedOptimizer._copy_main_params_to_model_params is not fast_optimizer.original
    pairs = fast_optimizer._shard_pairs(inner)
    assert len(pairs) == sum(1 for c in model for p in c.parameters())
    g = torch.Generator().manual_seed(3)
    params = [p for c in model for p in c.parameters()]
    for _ in range(2):  # the second time through the cached views
        with torch.no_grad():
            for _, shard in pairs:  # an update that does not round trip through bf16 exactly
                shard.copy_(torch.randn(shard.shape, generator=g) / 3)
        inner._copy_main_params_to_model_params()
        ours = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.zero_()
        fast_optimizer.original(inner)
        assert all(torch.equal(a, p) for a, p in zip(ours, params, strict=True))
        assert any(a.abs().sum() > 0 for a in ours)
    assert inner._mbridge_copy_pairs[1]  # the foreach path ran

def test_foreach_scale_is_megatrons_scale():
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    cpu_shim.bridge_missing_te()
    assert clip_grads.multi_tensor_scale_impl is cpu_shim.foreach_scale
    g = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(*s, generator=g) for s in [(7, 5), (1,), (64,)]]  # noqa: E731
    for scale in (0.37, torch.tensor(0.37), 1.0):
        srcs = make()
        same_ref = [t.clone() for t in srcs]
        mutils.local_multi_tensor_scale(0, None, [same_ref, same_ref], scale)
        cpu_shim.foreach_scale(0, None, [srcs, srcs], scale)  # in place, as clipping calls it
        assert all(torch.equal(a, b) for a, b in zip(srcs, same_ref))
        dsts = [torch.zeros_like(t, dtype=torch.bfloat16) for t in srcs]
        refs = [d.clone() for d in dsts]
        cpu_shim.foreach_scale(0, None, [srcs, dsts], scale)  # fp32 main -> bf16 model
        mutils.local_multi_tensor_scale(0, None, [srcs, refs], scale)
        assert all(torch.equal(a, b) for a, b in zip(dsts, refs))


def _deferrable_release() -> bool:
    """Megatron-Core 0.19 clips parameter groups by their own norms: there the deferred step
    hands over to Megatron-Core's own (the test then checks that hand-over is exact)."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return not hasattr(MegatronOptimizer, "_compute_grad_norms_by_group")


DEFERRABLE = _deferrable_release()


def _no_fallback(_):
    raise AssertionError("the deferred step fell back to Megatron-Core's")


def _trained_copy(clip_grad: float, deferred: bool, chained: bool = False):
    """A tiny fp32 model with a distributed optimizer after one step on fixed data; the
    same initial weights every call. Returns (parameters, main shards, step's return)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    provider = GPTModelProvider(spec=SPEC, params_dtype="float32")
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    with cpu_shim.cuda_as_cpu():
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=clip_grad,
            params_dtype=torch.float32), model)
    ids = torch.randint(0, SPEC.vocab_size, (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    with cpu_shim.cuda_as_cpu():
        model[0].zero_grad_buffer()
        opt.zero_grad()
        model[0](ids, pos, attention_mask=None, labels=ids).float().sum().backward()
        model[0].finish_grad_sync()
        target, name = (opt, "chained_step") if chained else (opt.chained_optimizers[0], "step")
        if deferred and DEFERRABLE:  # and never falling back to Megatron-Core's own step
            fallback = getattr(fast_optimizer, f"original_{name}")
            setattr(fast_optimizer, f"original_{name}", _no_fallback)
            try:
                out = getattr(fast_optimizer, f"deferred_{name}")(target)
            finally:
                setattr(fast_optimizer, f"original_{name}", fallback)
        elif deferred:
            out = getattr(fast_optimizer, f"deferred_{name}")(target)
        else:
            out = getattr(fast_optimizer, f"original_{name}")(target)
    params = [p.detach().clone() for p in model[0].parameters()]
    return params, out


def test_deferred_step_is_megatrons_step():
    """The step with its norm read at the end returns the same norm and leaves the same
    bits as Megatron-Core's, with clipping biting (coefficient below 1) and not, for the
    mixed-precision optimizer and the chained one ``get_megatron_optimizer`` returns."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    fast_optimizer.install()
    assert MixedPrecisionOptimizer.step is not fast_optimizer.original_step
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    assert ChainedOptimizer.step is not fast_optimizer.original_chained_step
    for clip, chained in ((1e-3, False), (1e6, False), (1e-3, True), (1e6, True)):
        ours, (ok, norm, zeros) = _trained_copy(clip, deferred=True, chained=chained)
        ref, (ok_ref, norm_ref, zeros_ref) = _trained_copy(clip, deferred=False, chained=chained)
        assert (ok, zeros) == (ok_ref, zeros_ref) == (True, None if chained else 0)
        assert isinstance(norm, float) and norm == norm_ref > 0
        assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    # the two clips moved the weights differently: clipping took effect in the first
    small, _ = _trained_copy(1e-3, deferred=True)
    large, _ = _trained_copy(1e6, deferred=True)
    assert any(not torch.equal(a, b) for a, b in zip(small, large, strict=True))


def test_clip_on_device_matches_the_host_rule():
    g = torch.Generator().manual_seed(1)
    for norm in (0.5, 3.0, 1e-9, float("inf")):
        grads = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
        ref = [t.clone() for t in grads]
        sq = torch.tensor([norm], dtype=torch.float32) ** 2
        fast_optimizer.clip_on_device(grads, sq, 1.0)
        coeff = 1.0 / (sq.item() ** 0.5 + 1e-6)  # clip_grad_by_total_norm_fp32's rule
        if coeff < 1.0:
            torch._foreach_mul_(ref, coeff)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref, strict=True))
    grads = [torch.ones(3)]
    fast_optimizer.clip_on_device(grads, torch.tensor([float("nan")]), 1.0)
    assert torch.equal(grads[0], torch.ones(3))  # NaN coefficient: not < 1, left alone


def test_fused_adam_leaves_cpu_parameters_and_other_optimizers_alone():
    """``use_fused_adam`` switches only Adam/AdamW groups whose parameters are all on CUDA
    (checked on a GPU: tests/gpu/test_fast_optimizer_gpu.py); the CPU keeps foreach."""
    from types import SimpleNamespace

    from mbridge.shell.fast_optimizer import use_fused_adam

    params = [torch.nn.Parameter(torch.ones(3))]
    adam = torch.optim.AdamW(params, lr=1e-3)
    sgd = torch.optim.SGD(params, lr=1e-3)
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam),
                                                  SimpleNamespace(optimizer=sgd),
                                                  SimpleNamespace(optimizer=None)])
    before = [dict(g) for g in adam.param_groups + sgd.param_groups]
    assert use_fused_adam(chained) == 0
    assert [dict(g) for g in adam.param_groups + sgd.param_groups] == before


def test_fused_step_lands_as_float32_on_the_parameters_device():
    """A resumed run's Adam step (restored on the host, any float dtype) is moved where the
    fused kernel reads it; on a GPU the whole resume: tests/gpu/test_fast_optimizer_gpu.py."""
    from mbridge.shell.fast_optimizer import fused_step_on_device

    p = torch.nn.Parameter(torch.ones(2, device="meta"))  # off the host, as a CUDA one is
    state = {"step": torch.tensor(7.0, dtype=torch.float64)}
    fused_step_on_device(state, p)
    assert state["step"].device == p.device and state["step"].dtype == torch.float32
    fused_step_on_device(None, p)  # no state yet (torch makes it at the first step)
    fused_step_on_device({}, p)
