"""MoE layers under ``torch.compile`` on the sync-free path (``dispatch.use_sorted_dispatch``,
grouped experts), on CPU with real Megatron-Core: each transformer layer compiled as
``fast_layers.compile_layers`` does gives the eager loss and gradients within 1e-5 of each
tensor's largest magnitude (inductor fuses and reorders fp32 sums; seen: 2e-6), with the aux
and z losses on. No graph break falls in mbridge's dispatcher or experts (Megatron-Core's
own code breaks a graph elsewhere: a deprecation warning in its linears, the attention's
offload context, the router's aux-loss bookkeeping, and on CPU the router's move to "GPU").
Slow: inductor builds C++ kernels for every layer (about 30 s a model here).
"""

import pytest
import torch
from test_moe_dispatch import LOSSES, build, close, flat, train_pass

from mbridge.shell.dispatch import use_sorted_dispatch
from mbridge.shell.fast_layers import compile_layers

pytestmark = pytest.mark.slow


def graph_break_files(layer, args, kwargs) -> set[str]:
    """The source files of the frames where dynamo breaks the layer's forward graph."""
    explained = torch._dynamo.explain(layer.forward)(*args, **kwargs)
    return {frame.filename for reason in explained.break_reasons
            for frame in reason.user_stack}


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])  # plain; gated shared expert
def test_compiled_layers_match_eager(name, moe_dirs):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    bridge, chunk = build(moe_dirs[name], LOSSES[name][0])
    assert use_sorted_dispatch(chunk) > 0
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    layer = next(m for m in chunk.decoder.layers if isinstance(m.mlp, MoELayer))
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k),
                                           with_kwargs=True)
    eager = train_pass(chunk, ids)
    hook.remove()
    files = graph_break_files(layer, seen["a"], seen["k"])
    assert not {f for f in files if f.endswith(("shell/dispatch.py", "shell/experts.py"))}
    torch._dynamo.reset()
    compile_layers(chunk)
    compiled = train_pass(chunk, ids)
    assert compiled[1].keys() == eager[1].keys() and compiled[2].keys() == eager[2].keys()
    assert all(close(a, b) for a, b in zip(flat(compiled), flat(eager), strict=True))


def test_compiled_layers_with_fused_wgrad_match_eager(moe_dirs):
    """Stacked experts under DDP adding their weight gradients into its buffer
    (``fuse_wgrad_accumulation``): the compiled layers call out to the fused linear (a graph
    break by design: its backward writes ``main_grad``) and give the eager pass's loss and
    every ``main_grad`` within 1e-5 of its largest magnitude, with DDP's hook told to skip
    the stacked weights."""
    from functools import partial

    from megatron.core.distributed import DistributedDataParallelConfig

    from mbridge import AutoBridge
    from mbridge.shell.cpu_shim import cuda_as_cpu
    from mbridge.shell.experts import GroupedSequentialMLP, stack_experts

    bridge = AutoBridge.from_hf_pretrained(moe_dirs["qwen3_moe"])
    provider = bridge.to_megatron_provider()
    provider.finalize()
    chunk, = provider.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=DistributedDataParallelConfig(),
        pre_wrap_hook=partial(stack_experts, fuse_wgrad_accumulation=True))
    assert use_sorted_dispatch(chunk) > 0
    experts = [m for m in chunk.modules() if isinstance(m, GroupedSequentialMLP)]
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).unsqueeze(0).expand_as(ids)

    def main_grads():
        chunk.zero_grad_buffer()
        with cuda_as_cpu():
            loss = chunk(ids, pos, attention_mask=None, labels=ids).float().mean()
            loss.backward()
        assert all(m.weight1.grad_added_to_main_grad and m.weight2.grad_added_to_main_grad
                   for m in experts)
        return [loss.detach(), *(p.main_grad.clone() for _, p in
                                 sorted(chunk.module.named_parameters()))]

    eager = main_grads()
    torch._dynamo.reset()
    compile_layers(chunk.module)
    compiled = main_grads()
    assert eager[1].abs().max() > 0
    assert all(close(a, b) for a, b in zip(compiled, eager, strict=True))
