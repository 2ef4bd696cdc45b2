"""cpu_shim item 6: inside ``cuda_as_cpu()`` Megatron-Core's literal ``device="cuda"``
allocations and ``Tensor.type()`` checks work on a machine without CUDA; outside, nothing
changes."""

import pytest
import torch

from mbridge.shell import cpu_shim

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is off with CUDA")


def test_cuda_as_cpu_bridges_allocations_and_type_checks():
    p = torch.nn.Parameter(torch.ones(2))
    with cpu_shim.cuda_as_cpu():
        z = torch.zeros(3, dtype=torch.int, device="cuda")
        t = torch.tensor([1.0], device=torch.device("cuda", 0))
        assert z.device.type == "cpu" and t.device.type == "cpu"
        assert p.type() == "torch.cuda.FloatTensor"
        assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert p.type(torch.float64).dtype == torch.float64  # conversions still convert
    assert p.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
