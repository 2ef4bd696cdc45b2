"""Packed rows on a CUDA GPU without Transformer Engine (skipped without CUDA; run on the lent
GPU machine: ``python -m pytest -q tests/gpu``). Compiled layers keep FlexAttention's
document mask in their graph (the block mask built by ``packed_seq_params``); their loss and
gradients equal the eager layers' with the dense block-diagonal SDPA mask (fp32: loss within
1e-5 relative, every gradient within 1e-4 of its largest entry; FlexAttention and SDPA sum
in different orders), and no layer breaks its graph."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_packed_layers_match_dense_mask():
    import torch._dynamo.utils as dynamo_utils

    from mbridge.shell import cpu_shim, dist, fast_layers
    from mbridge.shell.forward import packed_seq_params
    from mbridge.shell.model import provide
    from mbridge.specs import ModelSpec, ParallelSpec
    from mbridge.train import packing

    cpu_shim.apply()
    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256,
                     ffn_hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=64, norm_eps=1e-5, max_position_embeddings=1024)
    parallel = ParallelSpec()
    model = provide(spec, parallel, dist.init(parallel, seed=3),
                    config_extra=dict(init_method_std=0.2))[0]
    assert next(model.parameters()).is_cuda
    t = 1024
    rows = [[100, 300, 17, 600, 7], [1000, 24]]
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 512, (1, t), generator=gen).cuda() for _ in rows]

    def run(kernel):
        fast_layers.PACKED_KERNEL = kernel
        out = []
        try:
            for lengths, row in zip(rows, ids):
                cu = torch.tensor(packing.cu_seqlens(lengths, t), dtype=torch.int32)
                params = packed_seq_params(cu, device=row.device)
                pos = torch.tensor([packing.positions(lengths, t)], device=row.device)
                loss = model(row, pos, None, labels=row, packed_seq_params=params).sum()
                loss.backward()
                out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
                model.zero_grad(set_to_none=True)
        finally:
            fast_layers.PACKED_KERNEL = "auto"
        return out

    dense = run("sdpa")
    fast_layers.compile_layers(model)
    dynamo_utils.counters.clear()
    compiled = run("flex")
    assert not dict(dynamo_utils.counters["graph_break"])
    for (loss_d, grads_d), (loss_c, grads_c) in zip(dense, compiled):
        assert abs(loss_c.item() - loss_d.item()) <= 1e-5 * abs(loss_d.item())
        for gd, gc in zip(grads_d, grads_c):
            assert (gc - gd).abs().max().item() <= 1e-4 * gd.abs().max().item()
