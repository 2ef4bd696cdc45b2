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
