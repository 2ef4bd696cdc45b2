"""mbridge's fast layers equal Megatron-Core's reference ones: the SDPA attention is covered
by the parity tests (both backends against HF); here the cross entropy, values and grads."""

import pytest
import torch

from mbridge.shell import cpu_shim
from mbridge.shell.fast_layers import token_cross_entropy


@pytest.mark.parametrize("compiled", [False, True])
def test_token_cross_entropy_matches_megatron_vocab_parallel(compiled):
    """Values and grads of the hand-written cross entropy (eager, and compiled as the GPU
    benchmarks run it: inductor's C++ kernels on CPU) against Megatron-Core's
    ``vocab_parallel_cross_entropy`` on float32 logits, and the grads against autograd's own
    backward of the same float32 formula; the saved tensors are the bf16 logits, the labels
    and one float32 log-sum-exp per token, no float32 copy of the logits."""
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
    mine_in, ref_in, auto_in = (logits.clone().requires_grad_() for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mine = token_cross_entropy(mine_in, labels, compiled=compiled)
    assert sorted((str(t.dtype), t.numel()) for t in saved) == [
        ("torch.bfloat16", 7 * 3 * 50), ("torch.float32", 21), ("torch.int64", 21)]
    ref = vocab_parallel_cross_entropy(ref_in.float(), labels)
    x = auto_in.float()
    auto = torch.logsumexp(x, -1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine, auto, rtol=1e-6, atol=1e-6)
    weights = torch.randn(7, 3, generator=gen)
    for out in (mine, ref, auto):
        (out * weights).sum().backward()
    assert mine_in.grad.dtype == torch.bfloat16
    for other in (ref_in, auto_in):
        assert (mine_in.grad.float() - other.grad.float()).abs().max() <= \
            other.grad.float().abs().max() * 2**-7  # within bf16 rounding of the grads
    assert not torch.equal(mine_in.grad, torch.zeros_like(mine_in.grad))


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


def test_thd_rope_is_megatrons_bit_for_bit():
    """The sync-free packed rope (``install_thd_rope``) gives Megatron-Core's own ``thd``
    rope bit for bit, values and input grads, in both of its frequency cases (positions
    restarting per document; frequencies for every packed position), plain and interleaved."""
    cpu_shim.apply()
    import torch.distributed as tdist
    from megatron.core.models.common.embeddings import rope_utils

    from mbridge.shell import dist, fast_layers
    from mbridge.specs import ParallelSpec

    dist.init(ParallelSpec())
    fast_layers.install_thd_rope()
    original, mine = fast_layers._ORIGINAL_THD_ROPE, rope_utils._apply_rotary_pos_emb_thd
    assert mine is fast_layers._thd_rope and original is not mine
    cp = tdist.new_group([0])
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 19, 30, 37], dtype=torch.int32)  # a 1-token document included
    assert fast_layers.thd_positions(cu, 37).tolist() == \
        [*range(5), 0, *range(13), *range(11), *range(7)]
    # Megatron-Core passes the latent-attention flag by keyword, named by its release
    import inspect

    mla = ("mla_rotary_interleaved" if "mla_rotary_interleaved"
           in inspect.signature(original).parameters else "multi_latent_attention")
    for interleaved in (False, True):
        for n_freqs in (16, 37):  # max document length (case 2) / every position (case 1)
            t = torch.randn(37, 4, 8, generator=gen)
            freqs = torch.randn(n_freqs, 1, 1, 6, generator=gen)  # partial rotary: 6 of 8
            outs = []
            for fn in (original, mine):
                x = t.clone().requires_grad_()
                y = fn(x, cu, freqs, rotary_interleaved=interleaved, cp_group=cp,
                       **{mla: False})
                (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
                outs.append((y.detach(), x.grad))
            assert torch.equal(outs[0][0], outs[1][0]), (interleaved, n_freqs)
            assert torch.equal(outs[0][1], outs[1][1]), (interleaved, n_freqs)
            # boundaries padded with empty documents (packed_seq_params without TE): the same
            padded = torch.cat([cu, cu[-1:].expand(3)])
            x = t.clone().requires_grad_()
            y = mine(x, padded, freqs, rotary_interleaved=interleaved, cp_group=cp)
            (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
            assert torch.equal(y.detach(), outs[0][0]) and torch.equal(x.grad, outs[0][1])


def test_packed_rows_compile_into_one_graph_with_flex_attention():
    """A packed row through compiled layers: ``packed_seq_params`` builds the row's
    FlexAttention block mask outside the layers and a static ``max_seqlen`` (``t + 1``), so a
    compiled layer keeps the attention in its graph: no graph break anywhere in the layers,
    and a second row of other document lengths reuses the graphs. Logits equal the dense
    block-diagonal SDPA path's (fp32, 5e-5; measured up to 1e-5; forward only: FlexAttention
    has no backward on CPU, tests/gpu/test_packed_gpu.py covers training)."""
    cpu_shim.apply()
    import torch._dynamo.utils as dynamo_utils

    from mbridge.shell import dist, fast_layers
    from mbridge.shell.forward import packed_seq_params
    from mbridge.shell.model import provide
    from mbridge.specs import ModelSpec, ParallelSpec
    from mbridge.train import packing

    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64,
                     ffn_hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, norm_eps=1e-5, max_position_embeddings=256)
    parallel = ParallelSpec()
    model = provide(spec, parallel, dist.init(parallel, seed=3),
                    config_extra=dict(init_method_std=0.2))[0]
    model.eval()
    t = 256
    rows = [[40, 100, 16, 100], [7, 200, 49]]
    gen = torch.Generator().manual_seed(0)

    def logits(lengths, kernel, row=None):
        fast_layers.PACKED_KERNEL = kernel
        try:
            cu = torch.tensor(packing.cu_seqlens(lengths, t), dtype=torch.int32)
            params = packed_seq_params(cu, device=torch.device("cpu"))
            assert params.max_seqlen_q == t + 1
            assert (getattr(params, "block_mask", None) is not None) == (kernel == "flex")
            pos = torch.tensor([packing.positions(lengths, t)])
            with torch.no_grad():
                return model(ids[row or lengths[0]], pos, None, packed_seq_params=params)
        finally:
            fast_layers.PACKED_KERNEL = "auto"

    ids = {r[0]: torch.randint(0, 128, (1, t), generator=gen) for r in rows}
    dense = [logits(r, "sdpa") for r in rows]
    eager = [logits(r, "flex") for r in rows]
    fast_layers.compile_layers(model)
    dynamo_utils.counters.clear()
    compiled = [logits(rows[0], "flex")]
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled.append(logits(rows[1], "flex"))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation
    breaks = dict(dynamo_utils.counters["graph_break"])
    assert not breaks, breaks
    for d, e, c in zip(dense, eager, compiled):
        torch.testing.assert_close(e, d, rtol=0, atol=5e-5)
        torch.testing.assert_close(c, d, rtol=0, atol=5e-5)
    # the documents do not see each other: the same row unpacked (one document) differs
    assert (logits([t], "sdpa", row=rows[0][0]) - dense[0]).abs().max() > 1e-2


def test_packed_seq_params_bounds_the_longest_document_by_a_power_of_two():
    """Without TE, ``max_document`` (the flash kernel's bound on a document's length) is the
    longest document (a row's trailing pad is one) rounded up to a power of two, at least
    1024, at most the row."""
    from mbridge.shell.forward import packed_seq_params
    from mbridge.train import packing

    for lengths, t, bound in (([40, 100, 16], 256, 256), ([600] * 6 + [390], 4000, 1024),
                              ([1025] * 3 + [900], 4000, 2048), ([600, 300], 4096, 4096),
                              ([4096], 4096, 4096), ([2048, 2048, 10], 4106, 2048)):
        cu = torch.tensor(packing.cu_seqlens(lengths, t), dtype=torch.int32)
        params = packed_seq_params(cu, device=torch.device("cpu"))
        assert params.max_document == bound, (lengths, t, params.max_document)


def _main_grads_after_two_micro_batches(model_dir, fuse: bool):
    """DDP's gradient buffers after one optimizer step's two micro-batches (Megatron-Core's
    schedule), the output layer's weight gradient fused into them or not."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mbridge import AutoBridge
    from mbridge.shell.cpu_shim import cuda_as_cpu
    from mbridge.shell.fast_layers import _WgradAccumulate, fuse_output_wgrad

    provider = AutoBridge.from_hf_pretrained(model_dir).to_megatron_provider()
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    gpt = model[0].module
    if fuse:
        assert fuse_output_wgrad(gpt)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)

    def forward_step(data_iterator, chunk):
        out = chunk(ids, pos, attention_mask=None, labels=ids)
        return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

    calls = _WgradAccumulate.calls
    model[0].zero_grad_buffer()
    with cuda_as_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=None, model=model,
            num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=False)
    assert gpt.output_layer.weight.grad_added_to_main_grad is fuse
    assert _WgradAccumulate.calls - calls == (2 if fuse else 0)
    return {n: p.main_grad.clone() for n, p in gpt.named_parameters()}


def test_output_wgrad_fused_into_ddp_buffer_is_exact(tmp_path):
    """``fuse_output_wgrad``: the output layer's weight gradient goes into DDP's buffer in
    its backward, once a micro-batch (the stand-in for Apex's kernel; on CPU the same
    product and add as unfused), and every buffer holds, bit for bit, what autograd and
    DDP's hook put there unfused. A tied output layer is left alone."""
    from models import make_hf

    from mbridge import AutoBridge
    from mbridge.shell import dist
    from mbridge.shell.fast_layers import fuse_output_wgrad
    from mbridge.specs import ParallelSpec

    cpu_shim.apply()
    dist.init(ParallelSpec())
    make_hf("llama", tmp_path / "llama")
    want = _main_grads_after_two_micro_batches(tmp_path / "llama", fuse=False)
    got = _main_grads_after_two_micro_batches(tmp_path / "llama", fuse=True)
    assert got.keys() == want.keys() and "output_layer.weight" in got
    assert got["output_layer.weight"].abs().sum() > 0
    assert all(torch.equal(got[k], want[k]) for k in want), \
        [k for k in want if not torch.equal(got[k], want[k])]
    make_hf("llama_tied_mqa", tmp_path / "tied")
    provider = AutoBridge.from_hf_pretrained(tmp_path / "tied").to_megatron_provider()
    provider.finalize()
    tied = provider.provide_distributed_model(wrap_with_ddp=True)[0].module
    assert fuse_output_wgrad(tied) is False
    assert fuse_output_wgrad(provider.provide_distributed_model(wrap_with_ddp=False)[0]) \
        is False  # no DDP, no buffer
