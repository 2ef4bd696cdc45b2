"""The CPU shim bridges exactly the CUDA-only calls Megatron-Core makes, and each works."""

import torch

from mbridge.shell import cpu_shim


def test_shim_bridges_cuda_only_calls():
    assert cpu_shim.apply() is (not torch.cuda.is_available())
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom

    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()  # what the gradient sync waits on (0.19)
    stream.wait_stream(stream)
    t = torch.ones(2)
    assert t.cuda() is t
    assert torch.equal(fused_softmax.get_default_causal_mask(3),
                       torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]]).bool())
    window = fused_softmax.get_sliding_window_causal_mask(4, 4, (1, 0))
    assert window.tolist() == [[False, True, True, True], [False, False, True, True],
                               [True, False, False, True], [True, True, False, False]]

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 7)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    tracker2 = mrandom.CudaRNGStatesTracker()
    tracker2.add("a", 7)
    with tracker2.fork("a"):
        assert torch.equal(torch.rand(3), first)  # same seed, same draws
    with tracker.fork("a"):
        assert not torch.equal(torch.rand(3), first)  # the state advanced


def test_router_gemm_is_bridged_with_cuda_present_too():
    """Megatron-Core 0.16's router GEMM names ``te_general_gemm``, bound only when Transformer
    Engine imports: on a GPU without TE the first MoE forward raised NameError (0.19 binds
    it to None itself; the router's torch path must work there too). Run where
    ``torch.cuda.is_available()`` says True (so ``apply`` does nothing), as on such a GPU."""
    import subprocess
    import sys

    code = """
import importlib.util, torch
torch.cuda.is_available = lambda: True
from mbridge.shell import cpu_shim
assert cpu_shim.apply() is False
from megatron.core.transformer.moe import moe_utils
assert importlib.util.find_spec("transformer_engine") is None
# 0.16 leaves the name unbound (the NameError, before the bridge); 0.19 binds it to None
assert getattr(moe_utils, "te_general_gemm", None) is None
cpu_shim.bridge_missing_te()
cpu_shim.bridge_missing_te()  # once per process: it wraps a constructor
inp, w = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
out = moe_utils.RouterGatingLinearFunction.apply(inp, w, None, torch.float32)
assert torch.allclose(out, inp @ w.t())
out.sum().backward()
assert torch.allclose(w.grad, torch.ones(5, 3).t() @ inp)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_foreach_grad_norm_equals_megatron_fallback():
    """Item 9: the same norm as Megatron-Core's per-parameter fallback, through the clipping
    entry point Megatron-Core's optimizer calls."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    cpu_shim.bridge_missing_te()
    assert clip_grads.l2_norm_impl is cpu_shim.foreach_l2_norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(*s, generator=g) * 3 for s in [(7, 5), (1,), (64,), (3, 4, 5)]]
    got, _ = cpu_shim.foreach_l2_norm(0, None, [grads], False)
    with cpu_shim.cuda_as_cpu():  # it allocates its result on a literal "cuda"
        ref, _ = mutils.local_multi_tensor_l2_norm(0, None, [grads], False)
    want = torch.cat([t.flatten() for t in grads]).norm()
    assert got.shape == (1,) and got.dtype == torch.float32
    assert torch.allclose(got, ref.to(got.device), rtol=1e-6)
    assert torch.allclose(got[0], want, rtol=1e-6)
    empty, _ = cpu_shim.foreach_l2_norm(0, None, [[]], False)
    assert empty.item() == 0.0
