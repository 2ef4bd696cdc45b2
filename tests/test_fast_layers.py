"""mbridge's fast layers equal Megatron-Core's reference ones: the SDPA attention is covered
by the parity tests (both backends against HF); here the cross entropy, values and grads."""

import torch

from mbridge.shell import cpu_shim
from mbridge.shell.fast_layers import token_cross_entropy


def test_token_cross_entropy_matches_megatron_vocab_parallel():
    cpu_shim.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mbridge.shell import dist
    from mbridge.specs import ParallelSpec

    dist.init(ParallelSpec())
    assert ps.get_tensor_model_parallel_world_size() == 1
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 50, generator=gen) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (7, 3), generator=gen)
    mine_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    mine = token_cross_entropy(mine_in, labels)
    ref = vocab_parallel_cross_entropy(ref_in.float(), labels)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    weights = torch.randn(7, 3, generator=gen)
    (mine * weights).sum().backward()
    (ref * weights).sum().backward()
    assert mine_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mine_in.grad.float(), ref_in.grad.float(), rtol=0, atol=1e-2)
    assert (mine_in.grad.float() - ref_in.grad.float()).abs().max() <= \
        ref_in.grad.float().abs().max() * 2**-7  # within bf16 rounding of the grads


def test_packed_document_attention_flex_equals_dense_mask():
    """FlexAttention's block-sparse document mask (the CUDA path for packed rows without TE)
    gives the dense block-diagonal mask's attention (eager flex on CPU; fp32, 1e-5)."""
    import torch.nn.functional as F

    from mbridge.shell.fast_layers import document_mask, flex_document_attention

    gen = torch.Generator().manual_seed(0)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([7, 20, 5]))
    q, k, v = (torch.randn(1, h, 32, 16, generator=gen) for h in (4, 2, 2))
    for left in (None, 4):
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc, left),
                                               scale=0.25, enable_gqa=True)
        flex = flex_document_attention(q, k, v, doc, scale=0.25, left=left, compiled=False)
        assert torch.allclose(flex, dense, atol=1e-5), left
    mask = document_mask(doc)
    assert mask[7, 6].item() is False and mask[8, 7].item() is True and mask[6, 0].item()
