"""The Triton kernel of ``wgrad.accumulate_grouped_wgrad`` on a CUDA GPU (skipped without
CUDA or Triton), against float64 truth: uneven experts (none, one, a partial block, many
rows), tile edges that do not divide the matrix, an fp32 buffer within 1e-5 of the result's
largest magnitude (bf16 products are exact in fp32; fp32 sums of up to 700 rows), a bf16
buffer within one bf16 rounding of each element (2**-8 relative) plus 1e-5 of the largest;
experts given no rows untouched bit for bit; rows credited to the wrong expert exceed the
bound (checked). Then a training pass of a stacked bf16 model under DDP: the expert weights'
fp32 main grads with the fused add equal autograd's bf16 gradient added by DDP's hook within
that gradient's own rounding (2**-8 of each element, plus 1e-6 of the largest), over two
micro-batches (the second adds onto the first)."""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))


def truth(main, grad, x, counts):
    out = main.double().clone()
    start = 0
    for e, c in enumerate(counts):
        out[e] += grad[start:start + c].double().T @ x[start:start + c].double()
        start += c
    return out


@pytest.mark.parametrize("buffer", [torch.float32, torch.bfloat16])
def test_triton_kernel_against_float64(buffer):
    from mbridge.shell.wgrad import accumulate_grouped_wgrad, triton_usable

    g = torch.Generator(device="cuda").manual_seed(0)
    counts = [0, 1, 37, 700, 128, 0, 255, 3]
    m, n = 320, 200  # neither a multiple of any block
    grad = torch.randn(sum(counts), m, device="cuda", generator=g).bfloat16()
    x = torch.randn(sum(counts), n, device="cuda", generator=g).bfloat16()
    main = torch.randn(len(counts), m, n, device="cuda", generator=g).to(buffer)
    assert triton_usable(main, grad, x)
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    want = truth(main, grad, x, counts)
    got = main.clone()
    accumulate_grouped_wgrad(got, grad, x, offs)
    for e in (0, 5):
        assert torch.equal(got[e], main[e])
    scale = want.abs().max().item()

    def within(a):
        diff = (a.double() - want).abs()
        if buffer == torch.float32:
            return diff.max().item() <= 1e-5 * scale
        return bool((diff <= 2**-8 * want.abs() + 1e-5 * scale).all())

    assert within(got), (got.double() - want).abs().max().item()
    wrong = main.clone()
    accumulate_grouped_wgrad(wrong, grad, x, offs.roll(1).clamp(max=offs[-1]))
    assert not within(wrong)


def test_fused_main_grads_equal_hook_add():
    import tempfile

    from megatron.core.distributed import DistributedDataParallelConfig
    from moe_models import make_hf

    from mbridge import AutoBridge
    from mbridge.shell.dispatch import use_sorted_dispatch
    from mbridge.shell.experts import GroupedSequentialMLP, stack_experts

    with tempfile.TemporaryDirectory() as d:
        make_hf("qwen3_moe", Path(d))
        bridge = AutoBridge.from_hf_pretrained(d)
        provider = bridge.to_megatron_provider()
        provider.params_dtype = "bfloat16"
        provider.finalize()
        model = provider.provide_distributed_model(
            wrap_with_ddp=True, pre_wrap_hook=stack_experts,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    use_sorted_dispatch(model[0])
    experts = [m for m in model[0].modules() if isinstance(m, GroupedSequentialMLP)]
    assert experts and all(m.stacked for m in experts)
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 64), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)

    def main_grads(fuse: bool):
        for m in experts:
            m.fuse_wgrad_accumulation = fuse
        model[0].zero_grad_buffer()
        for _ in range(2):  # two micro-batches: the second adds onto the first
            model[0](ids, pos, attention_mask=None, labels=ids).float().mean().backward()
        assert all(m.weight1.grad_added_to_main_grad == fuse for m in experts)
        return {n: p.main_grad.clone() for n, p in model[0].module.named_parameters()}

    hooked, fused = main_grads(False), main_grads(True)
    stacked = {n for n in fused if n.endswith(("weight1", "weight2"))}
    assert stacked and fused.keys() == hooked.keys()
    for n in stacked:
        want, got = hooked[n].double(), fused[n].double()
        assert want.abs().max() > 0
        assert ((got - want).abs() <= 2**-8 * want.abs() + 1e-6 * want.abs().max()).all(), n


@pytest.mark.parametrize("buffer", [torch.float32, torch.bfloat16])
def test_dense_wgrad_accumulate_on_cuda(buffer):
    """The stand-in for Apex's ``fused_weight_gradient_mlp_cuda``
    (``fast_layers._WgradAccumulate``, the output layer's fused weight gradient), in place:
    into an fp32 buffer one cuBLAS GEMM with beta = 1, within 1e-5 of the result's largest
    magnitude of float64 truth; into a bf16 buffer ``addmm_``, which rounds as the unfused
    path does (the product to bf16, then the add: measured on an H100, 2026-12-07, the same
    largest error, 0.85 relative where the buffer cancels the product), so it is held to
    within one bf16 rounding of that path. A transposed product exceeds either bound."""
    from mbridge.shell.fast_layers import _WgradAccumulate

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 384, device="cuda", generator=g).bfloat16()
    grad = torch.randn(4096, 320, device="cuda", generator=g).bfloat16()
    main = torch.randn(320, 384, device="cuda", generator=g).to(buffer)
    product = grad.double().T @ x.double()
    if buffer == torch.float32:
        want = main.double() + product
        bound = 1e-5 * want.abs().max()
    else:
        want = (main + grad.t() @ x).double()  # autograd's gradient added by DDP's hook
        bound = 1e-5 * want.abs().max() + want.abs() * 2**-8
    ptr = main.data_ptr()
    (_WgradAccumulate.wgrad_gemm_accum_fp32 if buffer == torch.float32
     else _WgradAccumulate.wgrad_gemm_accum_fp16)(x, grad, main)
    assert main.data_ptr() == ptr and main.dtype == buffer  # in place
    err = (main.double() - want).abs()
    assert (err <= bound).all(), err.max().item()
    wrong = want - product + product.flip(0)
    assert not ((wrong - want).abs() <= bound).all()
