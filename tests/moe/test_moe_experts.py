"""``GroupedSequentialMLP`` (shell/experts.py), the local spec's experts: the same parameters
as Megatron-Core's ``SequentialMLP`` (names, shapes, tensor-parallel attributes), so
conversion is unchanged and round-trips bit for bit; its forward and gradients equal
SequentialMLP's (fp32 on CPU: the loop fallback, within 1e-6; the bf16 grouped GEMM on a GPU
is tests/gpu/test_moe_gpu.py). HF logit parity through it is test_moe_parity.py.
"""

import pytest
import torch
from test_moe_parity import tensors

from mbridge import AutoBridge
from mbridge.shell.experts import GroupedSequentialMLP, grouped_mm, looped_mm, per_token

ARCHS = ["qwen3_moe", "gpt_oss", "deepseek_v3"]  # plain, biased + clamped GLU, MLA + shared


def build(model_dir, dtype="float32"):
    bridge = AutoBridge.from_hf_pretrained(model_dir)
    provider = bridge.to_megatron_provider()
    provider.params_dtype = dtype
    provider.finalize()
    return bridge, provider.provide_distributed_model()






@pytest.mark.parametrize("name", ARCHS)
def test_same_parameters_as_sequential_and_exact_round_trip(name, moe_dirs, tmp_path):
    from megatron.core.transformer.moe.experts import SequentialMLP

    bridge, chunks = build(moe_dirs[name])
    moe = [m for m in chunks[0].modules() if isinstance(m, SequentialMLP)]
    assert moe and all(type(m) is GroupedSequentialMLP for m in moe)
    for m in moe:
        names = {k: v.shape for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
        assert set(names) == {f"local_experts.{j}.linear_fc{i}.{p}"
                              for j in range(m.num_local_experts) for i in (1, 2)
                              for p in (("weight", "bias") if name == "gpt_oss" else ("weight",))}
        h, f = m.config.hidden_size, m.config.moe_ffn_hidden_size
        assert names["local_experts.0.linear_fc1.weight"] == (2 * f, h)
        assert names["local_experts.0.linear_fc2.weight"] == (h, f)
        w = m.local_experts[0].linear_fc1.weight
        assert (w.tensor_model_parallel, w.partition_dim, w.partition_stride) == (True, 0, 2)
    bridge.save_hf_pretrained(chunks, tmp_path / "out")
    src, dst = tensors(moe_dirs[name]), tensors(tmp_path / "out")
    assert src.keys() == dst.keys()
    assert all(src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]) for k in src)


def routed_inputs(m, tokens: int, seed: int = 0):
    """Inputs as the dispatcher gives them, on the module's device (a GPU where there is one)."""
    g = torch.Generator().manual_seed(seed)
    n = m.num_local_experts
    counts = torch.distributions.Multinomial(tokens, torch.rand(n, generator=g)).sample().long()
    counts[n // 2] = 0  # an expert no token chose
    total = int(counts.sum())
    device = next(m.parameters()).device
    x = torch.randn(total, m.config.hidden_size, generator=g).to(device).requires_grad_()
    probs = torch.rand(total, generator=g).to(device).requires_grad_()
    return x, counts.to(device), probs


@pytest.mark.parametrize("name", ARCHS)
def test_forward_and_grads_equal_sequential(name, moe_dirs):
    from megatron.core.transformer.moe.experts import SequentialMLP

    _, chunks = build(moe_dirs[name])
    m = next(m for m in chunks[0].modules() if isinstance(m, GroupedSequentialMLP))
    x, counts, probs = routed_inputs(m, 40)
    got, bias = m(x, counts, probs)
    assert bias is None
    grads = torch.autograd.grad(got.square().sum(), [x, probs, *m.parameters()])
    with torch.no_grad():
        want, _ = SequentialMLP.forward(m, x, counts, probs)
    assert (got - want).abs().max().item() < 1e-6
    assert want.abs().max().item() > 1e-2  # the experts did something
    if name == "gpt_oss":
        # SequentialMLP cannot backpropagate biased experts at EP = expert-TP = 1: MLP.forward
        # adds the bias in place into the output of an identity autograd Function
        with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
            SequentialMLP.forward(m, x, counts, probs)
        return
    want, _ = SequentialMLP.forward(m, x, counts, probs)
    ref = torch.autograd.grad(want.square().sum(), [x, probs, *m.parameters()])
    for a, b in zip(grads, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-6


def test_grouped_mm_fallback_and_per_token():
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 2, 4]
    x = torch.randn(sum(counts), 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, 6, generator=g, requires_grad=True)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = grouped_mm(x, w, offs)
    want = torch.cat([x[sum(counts[:j]):sum(counts[:j + 1])] @ w[j] for j in range(4)])
    assert torch.equal(got, want)
    up = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, [x, w], up), torch.autograd.grad(want, [x, w], up),
                    strict=True):
        assert torch.equal(a, b)
    torch.library.opcheck(looped_mm, (x, w, offs))  # fake (compile) and autograd registrations
    rows = torch.arange(4.0).unsqueeze(1)
    assert per_token(rows, offs, 9).squeeze(1).tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
