"""Grouped weight gradients added into Megatron-Core's gradient buffers by the GEMM itself.

Under Megatron-Core's DDP each parameter's gradient lands in ``param.main_grad`` (a view of
the fp32 or bf16 gradient buffer): autograd writes ``param.grad``, then DDP's hook adds it
into ``main_grad`` and frees it. For a stacked MoE expert weight (``experts.stack_experts``:
128 experts x 2048 x 1536 at the Qwen3-30B-A3B shape, 0.4 B parameters a linear) that is a
bf16 gradient written by the grouped GEMM, then read again with the fp32 buffer and written
back: 14% of a training step on an H200, more than the GEMMs that made it. Megatron-Core's
*gradient-accumulation fusion* (TE's or Apex's ``wgrad_gemm_accum_fp32``) has the GEMM add
its product into ``main_grad`` instead and tells DDP so (``grad_added_to_main_grad``); both
need CUDA extensions we do not have, and neither is grouped.

``accumulate_grouped_wgrad(main_grad, grad, x, offs)`` adds ``grad_e^T @ x_e`` into
``main_grad[e]`` for each expert ``e``'s rows ``offs[e-1]:offs[e]``: on CUDA with Triton one
grouped kernel (each program one [M, N] tile of one expert, summing that expert's rows in
fp32 and adding its tile into ``main_grad`` once: one read and one write of the buffer, no
gradient tensor), elsewhere a loop of per-expert products added as DDP's hook would add
them (bit for bit what autograd and the hook give: the CPU tests compare the two paths).
"""

from __future__ import annotations

import functools

import torch


def accumulate_grouped_wgrad(main_grad: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
                             offs: torch.Tensor) -> None:
    """``main_grad[e] += grad[rows_e].T @ x[rows_e]`` in place, rows ``offs[e-1]:offs[e]``
    (``offs`` the cumulative row counts, int32, one per expert). ``main_grad`` [E, M, N]
    (fp32 or bf16), ``grad`` [T, M] and ``x`` [T, N] in the compute dtype."""
    experts, m, n = main_grad.shape
    if grad.shape[1] != m or x.shape[1] != n or grad.shape[0] != x.shape[0] \
            or offs.numel() != experts:
        raise ValueError(f"accumulate_grouped_wgrad: main_grad {tuple(main_grad.shape)}, grad "
                         f"{tuple(grad.shape)}, x {tuple(x.shape)}, {offs.numel()} offsets")
    if triton_usable(main_grad, grad, x):
        _triton_accumulate(main_grad, grad, x, offs)
        return
    main_grad.add_(looped_wgrad(x, grad, offs).transpose(1, 2))  # as autograd + the hook


def group_counts(offs: torch.Tensor) -> list[int]:
    """Rows per group from cumulative ``offs`` (read on the host)."""
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


def looped_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x_j^T @ grad_j`` for each group ``j`` of rows, [G, k, n]: a loop of products (the
    weight gradient of ``experts.looped_mm``)."""
    counts = group_counts(offs)
    pairs = zip(torch.split(x, counts), torch.split(grad, counts), strict=True)
    return torch.stack([a.T @ b for a, b in pairs])


def triton_usable(main_grad: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the Triton kernel serves: CUDA, bf16 or fp16 inputs, contiguous rows, an
    fp32/bf16/fp16 buffer with contiguous rows, and Triton importable."""
    return (main_grad.is_cuda and grad.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == grad.dtype and grad.stride(1) == 1 and x.stride(1) == 1
            and main_grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and main_grad.stride(2) == 1 and _kernel() is not None)


def _triton_accumulate(main_grad, grad, x, offs, config: dict | None = None) -> None:
    """Launch the kernel: autotuned, or with ``config``'s block sizes (``BLOCK_M``,
    ``BLOCK_N``, ``BLOCK_T``; tests under Triton's interpreter run it so on the CPU)."""
    import triton

    experts, m, n = main_grad.shape
    offs = offs.to(device=grad.device, dtype=torch.int32)
    jitted, tuned = _kernel()

    def grid(meta):
        return (experts * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (grad, x, main_grad, offs, m, n, grad.stride(0), x.stride(0), main_grad.stride(0),
            main_grad.stride(1))
    if config is None:
        tuned[grid](*args)
    else:
        jitted[grid](*args, **config)


CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt, num_warps=w, num_stages=s)
           for bm, bn, bt, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4),
                                    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                    (64, 128, 64, 4, 4)]]


@functools.cache
def _kernel():
    """The Triton kernel, as jitted and autotuned over ``CONFIGS`` per (M, N) with the
    buffer restored between trials; None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(g_ptr, x_ptr, out_ptr, offs_ptr, M, N, stride_g, stride_x, stride_oe,
               stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_T: tl.constexpr):
        pid = tl.program_id(0)
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: the interpreter runs this too
        per_expert = (M + BLOCK_M - 1) // BLOCK_M * tiles_n
        e = pid // per_expert  # an expert's tiles run together: its rows stay in L2
        tm = (pid % per_expert) // tiles_n
        tn = (pid % per_expert) % tiles_n
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            rows = rt[:, None].to(tl.int64)
            g = tl.load(g_ptr + rows * stride_g + rm[None, :],
                        mask=(rt[:, None] < end) & (rm[None, :] < M), other=0.0)
            a = tl.load(x_ptr + rows * stride_x + rn[None, :],
                        mask=(rt[:, None] < end) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(tl.trans(g), a, acc)
        if end > start:  # an expert given no rows adds nothing
            ptrs = (out_ptr + e.to(tl.int64) * stride_oe
                    + rm[:, None].to(tl.int64) * stride_om + rn[None, :])
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            prev = tl.load(ptrs, mask=mask).to(tl.float32)
            tl.store(ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)

    configs = [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T")},
                             num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in CONFIGS]
    tuned = triton.autotune(configs=configs, key=["M", "N"], restore_value=["out_ptr"])(kernel)
    return kernel, tuned
