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
