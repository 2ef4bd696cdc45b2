"""Grouped-GEMM experts. Megatron-Core's grouped experts need CUDA here: the local spec's
``GroupedMLP`` (Megatron-Core 0.16; removed in 0.17) needs the ``grouped_gemm`` CUDA extension
and ``TEGroupedMLP`` needs Transformer Engine, so on this CPU machine neither builds (checked
below). What mbridge does
differently for them is naming: TEGroupedMLP holds expert ``j``'s tensors as
``mlp.experts.linear_fc1.weight{j}`` (TE ``GroupedLinear``); conversion reads such names back
as SequentialMLP's (``keys.sequential_key``). The test runs import and export through
a real Megatron-Core model whose state dict shows TEGroupedMLP's names. Distributed
checkpoints need nothing: TEGroupedMLP's ``sharded_state_dict`` writes SequentialMLP's keys
(megatron/core/transformer/moe/experts.py), whose layout tests/moe/test_moe_offline.py checks.
"""

import pytest
import torch
from models import hf_logits, sample_ids
from test_moe_parity import TOL

from mbridge import AutoBridge, config
from mbridge.io.hf import HFCheckpoint
from mbridge.keys import grouped_key
from mbridge.shell import forward
from mbridge.specs import ParallelSpec


def test_grouped_gemm_cannot_build_without_cuda(moe_dirs):
    """Megatron-Core 0.16's local spec builds the legacy ``GroupedMLP``, which asserts without
    the ``grouped_gemm`` extension; 0.17 removed it and the local spec builds
    ``SequentialMLP`` whatever ``moe_grouped_gemm`` says (``models/backends.py``), which
    mbridge swaps for its ``GroupedSequentialMLP`` (SequentialMLP's names, which conversion
    reads directly)."""
    from megatron.core.transformer.moe import experts

    from mbridge.shell import dist, model

    if torch.cuda.is_available():
        pytest.skip("only the CPU machine lacks grouped GEMM kernels")
    spec = config.from_hf_config(HFCheckpoint(moe_dirs["qwen3_moe"]).config)
    dist.init(ParallelSpec())
    if hasattr(experts, "GroupedMLP"):
        with pytest.raises(AssertionError, match="Grouped GEMM is not available"):
            model.build_chunks(spec, ParallelSpec(), 0, use_te=False, moe_grouped_gemm=True)
        return
    chunk, = model.build_chunks(spec, ParallelSpec(), 0, use_te=False, moe_grouped_gemm=True)
    built = {type(m).__name__ for m in chunk.modules()
             if isinstance(m, experts.SequentialMLP) or type(m).__name__ == "TEGroupedMLP"}
    assert built == {"GroupedSequentialMLP"}


class GroupedNames(torch.nn.Module):
    """A Megatron-Core model whose state dict names its experts as TEGroupedMLP does."""

    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk
        self.config, self.pg_collection = chunk.config, chunk.pg_collection

    def state_dict(self, *args, **kwargs):
        return {grouped_key(k): v for k, v in self.chunk.state_dict(*args, **kwargs).items()}


def test_grouped_expert_names_convert(moe_dirs):
    bridge = AutoBridge.from_hf_pretrained(moe_dirs["qwen3_moe"])
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.finalize()
    chunks = provider.provide_distributed_model()
    grouped = [GroupedNames(c) for c in chunks]
    names = grouped[0].state_dict()
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight7" in names
    assert not any("local_experts" in k for k in names if not k.endswith("_extra_state"))
    bridge.load_hf_weights(grouped, provider.parallel_spec())
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    got = forward.logits(chunks, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                         bridge.spec.hidden_size)
    assert (got - hf_logits(moe_dirs["qwen3_moe"], ids)).abs().max().item() < TOL
    exported = dict(bridge.export_hf_weights(grouped))
    ckpt = HFCheckpoint(moe_dirs["qwen3_moe"])
    assert set(exported) == set(ckpt.keys())
    assert all(torch.equal(exported[k], ckpt.read(k)) for k in ckpt.keys())
