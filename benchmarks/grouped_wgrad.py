"""The experts' weight gradients at the Qwen3-30B-A3B layer shape on one GPU: autograd's
``torch._grouped_mm`` weight gradient (bf16; the call its backward makes) added into an fp32
or bf16 buffer as DDP's hook adds it, against ``wgrad.accumulate_grouped_wgrad`` (one Triton
kernel adding into the buffer), for both linears of a layer (fc1: [E, 2 * 768, 2048], fc2:
[E, 2048, 768]) over one micro-batch of ``--tokens`` tokens routed top-8 among 128 experts
(counts multinomial, as a fresh router gives). Same inputs, one process; also the largest
difference between the two buffers over the largest magnitude.

    python benchmarks/grouped_wgrad.py
"""

from __future__ import annotations

import argparse
import json

import torch


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens a micro-batch (8192)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from mbridge.shell.wgrad import accumulate_grouped_wgrad

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = args.tokens * args.topk
    counts = torch.multinomial(torch.ones(args.experts, device="cuda"), rows,
                               replacement=True, generator=g).bincount(minlength=args.experts)
    offs = counts.cumsum(0).to(torch.int32)
    results = []
    for name, m, n in [("fc1", 2 * args.ffn, args.hidden), ("fc2", args.hidden, args.ffn)]:
        x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)
        grad = torch.randn(rows, m, device="cuda", dtype=torch.bfloat16, generator=g)
        for buffer in (torch.float32, torch.bfloat16):
            main_a = torch.zeros(args.experts, m, n, device="cuda", dtype=buffer)
            main_b = torch.zeros_like(main_a)

            def hook_add(x=x, grad=grad, main=main_a):  # _grouped_mm's backward, DDP's add
                dw = torch._grouped_mm(x.t(), grad, offs=offs)  # [E, n, m]
                main.add_(dw.transpose(1, 2))

            def fused(x=x, grad=grad, main=main_b):
                accumulate_grouped_wgrad(main, grad, x, offs)

            fused()  # autotunes (the buffer restored between trials)
            main_a.zero_(), main_b.zero_()
            hook_add(), fused()
            diff = ((main_a.float() - main_b.float()).abs().max()
                    / main_a.float().abs().max()).item()
            t_hook, t_fused = timed(hook_add, args.reps), timed(fused, args.reps)
            flops = 2 * rows * m * n
            row = dict(linear=name, buffer=str(buffer).removeprefix("torch."),
                       hook_add_ms=round(t_hook, 3), fused_ms=round(t_fused, 3),
                       speedup=round(t_hook / t_fused, 2),
                       fused_tflops=round(flops / t_fused / 1e9, 1),
                       max_rel_diff=f"{diff:.2e}")
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
