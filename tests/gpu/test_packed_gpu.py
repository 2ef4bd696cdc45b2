"""Packed rows on a CUDA GPU without Transformer Engine (skipped without CUDA; run on the lent
GPU machine: ``python -m pytest -q tests/gpu``). Compiled layers keep the packed attention in
their graph, FlexAttention's document mask (the block mask built by ``packed_seq_params``) or
flash attention over ``cu_seqlens`` (``"varlen"``), and no layer breaks its graph.

FlexAttention (fp32): loss and gradients equal the eager layers' with the dense
block-diagonal SDPA mask, the loss within 1e-5 relative and every gradient within 1e-4 of its
largest entry (the kernels sum in different orders). Flash attention takes no fp32, so the
model runs under bf16 autocast and is held to the fp32 dense run: its error (relative norm,
worst loss or gradient) stays within twice that of the dense SDPA mask under the same
autocast plus 1e-3, a bound that a document leaking into its neighbour (checked: attention
over the whole row) exceeds."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = [[100, 300, 17, 600, 7], [1000, 24]]
T = 1024


def _model(dtype: str = "float32", positions: int = 1024):
    from mbridge.shell import cpu_shim, dist
    from mbridge.shell.model import provide
    from mbridge.specs import ModelSpec, ParallelSpec

    cpu_shim.apply()
    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256,
                     ffn_hidden_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=64, norm_eps=1e-5, max_position_embeddings=positions)
    parallel = ParallelSpec()
    model = provide(spec, parallel, dist.init(parallel, seed=3), dtype=dtype,
                    config_extra=dict(init_method_std=0.2))[0]
    assert next(model.parameters()).is_cuda
    return model


def _run(model, kernel, rows=ROWS, autocast=False, t=T, bounds=None):
    from mbridge.shell import fast_layers
    from mbridge.shell.forward import packed_seq_params
    from mbridge.train import packing

    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 512, (1, t), generator=gen).cuda() for _ in rows]
    fast_layers.PACKED_KERNEL = kernel
    out = []
    try:
        for lengths, row in zip(rows, ids):
            cu = torch.tensor(packing.cu_seqlens(lengths, t), dtype=torch.int32)
            params = packed_seq_params(cu, device=row.device)
            if bounds is not None:
                bounds.append(params.max_document)
            pos = torch.tensor([packing.positions(lengths, t)], device=row.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(row, pos, None, labels=row, packed_seq_params=params)
            loss = loss.float().sum()
            loss.backward()
            out.append((loss.detach(), [p.grad.float().clone() for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
    finally:
        fast_layers.PACKED_KERNEL = "auto"
    return out


def _close(ref, got, loss_rel, grad_rel) -> bool:
    for (loss_r, grads_r), (loss_g, grads_g) in zip(ref, got):
        if abs(loss_g.item() - loss_r.item()) > loss_rel * abs(loss_r.item()):
            return False
        for gr, gg in zip(grads_r, grads_g):
            if (gg - gr).abs().max().item() > grad_rel * gr.abs().max().item():
                return False
    return True


def _error(ref, got) -> float:
    """The worst relative error (norm of the difference over the reference's norm) of any
    row's loss or gradient."""
    worst = 0.0
    for (loss_r, grads_r), (loss_g, grads_g) in zip(ref, got, strict=True):
        worst = max(worst, abs(loss_g.item() - loss_r.item()) / abs(loss_r.item()))
        for gr, gg in zip(grads_r, grads_g, strict=True):
            worst = max(worst, ((gg - gr).norm() / gr.norm()).item())
    return worst


def test_compiled_flex_packed_layers_match_dense_mask():
    import torch._dynamo.utils as dynamo_utils

    from mbridge.shell import fast_layers

    model = _model()
    dense = _run(model, "sdpa")
    fast_layers.compile_layers(model)
    dynamo_utils.counters.clear()
    compiled = _run(model, "flex")
    assert not dict(dynamo_utils.counters["graph_break"])
    assert _close(dense, compiled, 1e-5, 1e-4)


def test_flash_varlen_packed_layers_as_close_as_dense_mask_under_bf16():
    import torch._dynamo.utils as dynamo_utils

    from mbridge.shell import fast_layers

    model = _model()
    truth = _run(model, "sdpa")  # fp32, dense block-diagonal mask
    base = _error(truth, _run(model, "sdpa", autocast=True))
    bound = 2 * base + 1e-3
    leak = _error(truth, _run(model, "sdpa", [[T]] * len(ROWS), autocast=True))
    assert leak > bound, (leak, bound)  # the bound can fail
    eager = _error(truth, _run(model, "varlen", autocast=True))
    assert eager <= bound, (eager, base)
    fast_layers.compile_layers(model)
    dynamo_utils.counters.clear()
    compiled = _error(truth, _run(model, "varlen", autocast=True))
    assert not dict(dynamo_utils.counters["graph_break"])
    assert compiled <= bound, (compiled, base)


def test_auto_attends_bf16_through_flash_with_a_bound_below_the_row():
    """Rows of 4096 holding documents under 1024 tokens: "auto" takes the flash kernel for
    bf16 with the longest document bounded by 1024 (a quarter of the kernel's launch at the
    row's length), and stays as close to the fp32 dense run as the dense mask under autocast."""
    from mbridge.shell import fast_layers

    rows, t = [[300, 700, 1000, 900, 500, 696], [1000] * 4 + [96]], 4096
    model = _model(positions=t)
    truth = _run(model, "sdpa", rows, t=t)
    base = _error(truth, _run(model, "sdpa", rows, autocast=True, t=t))
    seen = []
    called = []
    real = fast_layers.varlen_document_attention

    def spy(*args, **kwargs):
        called.append(kwargs.get("longest"))
        return real(*args, **kwargs)

    fast_layers.varlen_document_attention = spy
    try:
        auto = _error(truth, _run(model, "auto", rows, autocast=True, t=t, bounds=seen))
    finally:
        fast_layers.varlen_document_attention = real
    assert seen == [1024, 1024] and set(called) == {1024}, (seen, called)
    assert auto <= 2 * base + 1e-3, (auto, base)
