"""On a GPU, the optimizer step that reads its gradient norm at the end (from a pinned copy
behind an event: ``fast_optimizer._read_later``) returns Megatron-Core's norm and leaves
its bits, bf16 parameters with float32 main shards, clipping biting and not."""

import pytest
import torch

from mbridge import GPTModelProvider, ModelSpec
from mbridge.shell import cpu_shim, fast_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = ModelSpec(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=64,
                 ffn_hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def _no_fallback(_):
    raise AssertionError("the deferred step fell back to Megatron-Core's")


def _one_step(clip: float, deferred: bool):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    provider = GPTModelProvider(spec=SPEC, params_dtype="bfloat16")
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, bf16=True, use_distributed_optimizer=True, clip_grad=clip,
        params_dtype=torch.bfloat16), model)
    ids = torch.randint(0, SPEC.vocab_size, (2, 32), generator=g).cuda()
    pos = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    model[0].zero_grad_buffer()
    opt.zero_grad()
    model[0](ids, pos, attention_mask=None, labels=ids).float().sum().backward()
    model[0].finish_grad_sync()
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    if deferred and not hasattr(MegatronOptimizer, "_compute_grad_norms_by_group"):  # 0.16
        fallback = fast_optimizer.original_chained_step
        fast_optimizer.original_chained_step = _no_fallback
        try:
            out = fast_optimizer.deferred_chained_step(opt)
        finally:
            fast_optimizer.original_chained_step = fallback
    elif deferred:  # 0.19 clips groups by their own norms: its own step, through ours
        out = fast_optimizer.deferred_chained_step(opt)
    else:
        out = fast_optimizer.original_chained_step(opt)
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model[0].parameters()], out


def test_deferred_step_on_gpu_is_megatrons():
    cpu_shim.bridge_missing_te()
    fast_optimizer.install()
    for clip in (1e-3, 1e6):
        ours, (ok, norm, _) = _one_step(clip, deferred=True)
        ref, (ok_ref, norm_ref, _) = _one_step(clip, deferred=False)
        assert ok and ok_ref and isinstance(norm, float) and norm == norm_ref > 0
        assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_fused_adam_step_matches_foreach_on_gpu():
    """``use_fused_adam`` switches Megatron-Core's AdamW over CUDA parameters to torch's
    fused kernel, and its step gives the foreach step's parameters within float32 rounding
    of the update (bf16 parameters from the same float32 main shards: at most one bf16 ulp
    apart, and nearly all equal)."""
    cpu_shim.bridge_missing_te()
    fast_optimizer.install()
    ref, _ = _one_step(1e6, deferred=False)
    real = fast_optimizer.original_chained_step
    switched = []

    def fused_step(opt):
        switched.append(fast_optimizer.use_fused_adam(opt))
        assert all(g["fused"] for o in opt.chained_optimizers
                   for g in o.optimizer.param_groups)
        return real(opt)

    fast_optimizer.original_chained_step = fused_step
    try:
        ours, _ = _one_step(1e6, deferred=False)
    finally:
        fast_optimizer.original_chained_step = real
    assert switched and switched[0] > 0
    moved = sum((a != b).sum().item() for a, b in zip(ours, ref, strict=True))
    total = sum(a.numel() for a in ref)
    assert moved <= 0.01 * total, (moved, total)
    for a, b in zip(ours, ref, strict=True):
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(1e-30)
        assert ((a.float() - b.float()).abs() <= ulp * 1.01).all()
