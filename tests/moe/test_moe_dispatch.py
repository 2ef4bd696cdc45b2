"""``SortedTokenDispatcher`` (shell/dispatch.py), the static-shape dispatcher at EP =
expert-TP = 1, on real Megatron-Core models (fp32, CPU), one training pass each: against
Megatron-Core's own dispatcher with the same (grouped) experts, the loss, the aux and z losses
Megatron-Core's router logs and every parameter's gradient are bit-for-bit equal (the same
rows in the same order, each token's rows summed in the order ``scatter_add`` sums them);
against Megatron-Core's dispatcher with its ``SequentialMLP`` experts, within 1e-5 of each
tensor's largest magnitude (the expert GEMMs sum in another order). Routers covered: softmax
top-k with and without renormalisation, a gated shared expert, grouped sigmoid routing with
an expert bias and scaling, biased clamped experts (GPT-OSS; SequentialMLP cannot
backpropagate those at EP = 1, test_moe_experts.py).
"""

import types

import pytest
import torch

from mbridge import AutoBridge
from mbridge.shell.dispatch import SortedTokenDispatcher, serves, sorted_routes, use_sorted_dispatch

# router losses as Megatron-Core computes them (per micro-batch, per sequence, z-loss), and
# the names its tracker logs them under
LOSSES = {
    "qwen3_moe": (dict(moe_aux_loss_coeff=1e-2), {"load_balancing_loss"}),
    "qwen2_moe": (dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3),
                  {"load_balancing_loss", "z_loss"}),
    "deepseek_v3": (dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2),
                    {"seq_load_balancing_loss"}),
    "mixtral": (dict(moe_z_loss_coeff=1e-3), {"z_loss"}),
    "gpt_oss": (dict(moe_aux_loss_coeff=1e-2), {"load_balancing_loss"}),
}


@pytest.mark.parametrize("seed", range(4))
def test_sorted_routes_order_as_masked_select(seed):
    g = torch.Generator().manual_seed(seed)
    tokens, experts, k = [(1, 2, 1), (7, 4, 2), (33, 8, 3), (50, 16, 8)][seed]
    top = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top, True)
    want = torch.arange(tokens * experts).masked_select(routing_map.T.reshape(-1))
    assert torch.equal(sorted_routes(routing_map, k), want)


def build(model_dir, losses):
    bridge = AutoBridge.from_hf_pretrained(model_dir)
    provider = bridge.to_megatron_provider()
    provider.extra_config.update(losses)
    provider.finalize()
    chunk, = provider.provide_distributed_model()
    return bridge, chunk.train()


def train_pass(chunk, ids):
    """Loss, the router losses Megatron-Core logged, and every gradient of one pass."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.clear_aux_losses_tracker()
    for p in chunk.parameters():
        p.grad = None
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    loss = chunk(ids, pos, attention_mask=None, labels=ids).float().mean()
    loss.backward()
    logged = {k: v["values"].clone()  # the tracker keeps (zeroed) names of earlier models
              for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()
              if v["values"].any()}
    return loss.detach(), logged, {n: p.grad.clone() for n, p in chunk.named_parameters()}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 expert GEMMs summed in another order (a loop of ``F.linear`` against one grouped
    product): within 1e-5 of the tensor's largest magnitude; one misrouted token moves
    them by far more."""
    return (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1e-3)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_equals_megatron_dispatch(name, moe_dirs):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    losses, logged = LOSSES[name]
    bridge, chunk = build(moe_dirs[name], losses)
    layers = [m for m in chunk.modules() if isinstance(m, MoELayer)]
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    grouped = train_pass(chunk, ids)  # Megatron-Core's dispatcher, mbridge's grouped experts
    if name != "gpt_oss":
        for m in layers:  # Megatron-Core's dispatcher and experts
            m.experts.forward = types.MethodType(SequentialMLP.forward, m.experts)
        sequential = train_pass(chunk, ids)
        for m in layers:
            del m.experts.forward
    assert use_sorted_dispatch(chunk) == len(layers) > 0
    assert all(type(m.token_dispatcher) is SortedTokenDispatcher for m in layers)
    assert use_sorted_dispatch(chunk) == 0  # already swapped
    got = train_pass(chunk, ids)
    assert got[1].keys() == grouped[1].keys() == logged
    assert got[2].keys() == grouped[2].keys()
    router = next(k for k in got[2] if k.endswith("router.weight"))
    assert got[2][router].abs().max() > 0
    for a, b in zip(flat(got), flat(grouped), strict=True):  # the dispatcher alone: exact
        assert torch.equal(a, b)
    if name != "gpt_oss":
        assert all(close(a, b) for a, b in zip(flat(got), flat(sequential), strict=True))


def flat(result) -> list[torch.Tensor]:
    loss, logged, grads = result
    return [loss, *(logged[k] for k in sorted(logged)), *(grads[k] for k in sorted(grads))]


def test_serves_only_ep1_etp1_dropless(moe_dirs):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    _, chunk = build(moe_dirs["qwen3_moe"], {})
    cfg = next(m for m in chunk.modules() if isinstance(m, MoELayer)).config
    assert serves(cfg, 1, 1) is None
    assert serves(cfg, 2, 1) == "expert-parallel size > 1"
    assert serves(cfg, 1, 2) == "expert-tensor-parallel size > 1"
    dropping = types.SimpleNamespace(**{**vars(cfg), "moe_expert_capacity_factor": 1.0})
    assert serves(dropping, 1, 1).startswith("token dropping")


# aten ops whose output size or value the host must read from the device (a sync on a GPU)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
           "unique_consecutive", "bincount", "repeat_interleave"}


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops run under it that read device data on the host (``SYNCING``). Ops
    inside a custom op's implementation (``mbridge::looped_mm``, the CPU experts loop; on a
    GPU the experts take ``torch._grouped_mm``) are not seen, the custom op itself is."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def moe_pass_host_reads(layer, hidden: torch.Tensor) -> list[str]:
    with HostReads() as mode:
        out, _ = layer(hidden)
        out.square().sum().backward()
    return mode.seen


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_moe_layer_reads_nothing_on_the_host(name, moe_dirs):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    bridge, chunk = build(moe_dirs[name], LOSSES[name][0])
    layer = next(m for m in chunk.modules() if isinstance(m, MoELayer))
    hidden = torch.randn(12, 2, bridge.spec.hidden_size, requires_grad=True,
                         generator=torch.Generator().manual_seed(0))
    assert "masked_select" in moe_pass_host_reads(layer, hidden)  # Megatron-Core's dispatcher
    use_sorted_dispatch(chunk)
    assert moe_pass_host_reads(layer, hidden) == []
