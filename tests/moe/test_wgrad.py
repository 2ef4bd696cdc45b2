"""``wgrad.accumulate_grouped_wgrad`` on the CPU (its loop; the Triton kernel is
tests/gpu/test_wgrad_gpu.py): each expert's ``grad_e^T @ x_e`` added into its slice of the
buffer, what was there kept, experts given no rows untouched, bf16 products added into an
fp32 buffer as DDP's hook adds a bf16 gradient; mismatched shapes refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbridge.shell.wgrad import accumulate_grouped_wgrad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adds_each_experts_product(dtype):
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    rows = sum(counts)
    grad = torch.randn(rows, 6, generator=g).to(dtype)
    x = torch.randn(rows, 4, generator=g).to(dtype)
    main = torch.randn(4, 6, 4, generator=g)
    before = main.clone()
    accumulate_grouped_wgrad(main, grad, x, torch.tensor(counts).cumsum(0).to(torch.int32))
    start = 0
    for e, c in enumerate(counts):
        rows_e = slice(start, start + c)
        want = before[e] + (x[rows_e].T @ grad[rows_e]).T.float()  # as autograd rounds it
        assert torch.equal(main[e], want), e
        start += c
    assert torch.equal(main[1], before[1])  # no rows: nothing added


def test_refuses_mismatched_shapes():
    main = torch.zeros(2, 3, 4)
    offs = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"main_grad \(2, 3, 4\), grad \(2, 4\)"):
        accumulate_grouped_wgrad(main, torch.zeros(2, 4), torch.zeros(2, 4), offs)
    with pytest.raises(ValueError, match="3 offsets"):
        accumulate_grouped_wgrad(main, torch.zeros(2, 3), torch.zeros(2, 4),
                                 torch.tensor([1, 2, 2], dtype=torch.int32))


def check_kernel(buffer: torch.dtype, config: int) -> None:
    """One configuration of the Triton kernel against float64 truth (see below)."""
    from mbridge.shell import wgrad

    g = torch.Generator().manual_seed(1)
    counts = [0, 1, 37, 130, 0, 65]
    m, n = 136, 72  # no block divides either
    # fp16 inputs: the interpreter's bf16 products are wrong (Triton 3.8: a 16 x 16 bf16
    # tl.dot off by 3e10; fp16 within 2e-6), and the indexing does not depend on the dtype
    grad = torch.randn(sum(counts), m, generator=g).half()
    x = torch.randn(sum(counts), n, generator=g).half()
    main = torch.randn(len(counts), m, n, generator=g).to(buffer)
    want = main.double().clone()
    start = 0
    for e, c in enumerate(counts):
        want[e] += grad[start:start + c].double().T @ x[start:start + c].double()
        start += c
    got = main.clone()
    cfg = {k: wgrad.CONFIGS[config][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T")}
    wgrad._triton_accumulate(got, grad, x, torch.tensor(counts).cumsum(0).int(), cfg)
    assert torch.equal(got[0], main[0]) and torch.equal(got[4], main[4])
    diff = (got.double() - want).abs()
    # the interpreter rounds a bf16 store toward zero (within 2**-7; a GPU to nearest, 2**-8)
    bound = 1e-5 * want.abs().max() if buffer == torch.float32 else \
        2**-7 * want.abs() + 1e-5 * want.abs().max()
    assert (diff <= bound).all(), (buffer, config, diff.max().item())
    wrong = main.clone()  # the rows credited to the next expert: far outside the bound
    wgrad._triton_accumulate(wrong, grad, x, torch.tensor([0, *counts[:-1]]).cumsum(0).int(),
                             cfg)
    assert not ((wrong.double() - want).abs() <= bound).all()


def test_triton_kernel_interpreted():
    """The Triton kernel's indexing and masks, run by Triton's interpreter on the CPU (where
    Triton is installed; ``TRITON_INTERPRET=1`` must precede its import, so in a fresh
    process): three of the block configurations the autotuner picks from, fp16 inputs into
    fp32 and bf16 buffers, uneven experts (none, one, a partial block, several blocks), tiles
    that do not divide the matrix; within the fp32 sums' rounding (1e-5 of the largest) or one bf16
    rounding (toward zero in the interpreter) of float64 truth, experts given no rows
    untouched, misattributed rows caught."""
    pytest.importorskip("triton")
    code = ("import torch, test_wgrad\n"
            "for b in (torch.float32, torch.bfloat16):\n"
            "    for c in (0, 2, 4):\n"
            "        test_wgrad.check_kernel(b, c)\n"
            "print('checked 6')\n")
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "checked 6" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("buffer", ["fp32", "bf16"])
def test_triton_kernel_compiles_for_hopper(buffer):
    """Each block configuration the autotuner may pick compiles for sm_90 (no GPU needed:
    Triton compiles for a named target) with aligned arguments, as Triton specializes them
    at launch: its row loop software-pipelined (asynchronous copies into shared memory),
    its products on Hopper's warp-group MMA, and its shared memory within an H100/H200's
    227 KiB. Without the alignment the loads are not pipelined (seen): the kernel relies on
    16-byte-aligned rows."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mbridge.shell import wgrad

    jitted, _ = wgrad._kernel()
    names = ["g_ptr", "x_ptr", "out_ptr", "offs_ptr", "M", "N", "stride_g", "stride_x",
             "stride_oe", "stride_om"]
    types = ["*bf16", "*bf16", f"*{buffer}", "*i32", *["i32"] * 6]
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_T")
    signature = {**dict(zip(names, types, strict=True)), **dict.fromkeys(blocks, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
    for c in wgrad.CONFIGS:
        src = ASTSource(fn=jitted, signature=signature, constexprs={b: c[b] for b in blocks},
                        attrs=aligned)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=c["num_warps"],
                                             num_stages=c["num_stages"]))
        ir = kernel.asm["ttgir"]
        assert "async_copy_global_to_local" in ir and "warp_group_dot" in ir, c
        assert kernel.metadata.shared <= 227 * 1024, (c, kernel.metadata.shared)
