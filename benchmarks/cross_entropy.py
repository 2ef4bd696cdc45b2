"""The language-model loss at a large vocabulary on one GPU, forward and backward of
bf16 logits ``[tokens, vocab]``: the float32 formula compiled with autograd's own backward
(what ``fast_layers.token_cross_entropy`` was until 2026-12-07: the backward of its gather
scatters into a float32 zeros tensor of the logits' size and reads it back) against
``token_cross_entropy(..., compiled=True)`` (a hand-written backward, ``softmax - one_hot``
in one pass) and ``torch.nn.functional.cross_entropy`` eager. Same inputs, one process;
also the largest difference of each loss and logits gradient from the float32 reference.

    python benchmarks/cross_entropy.py
"""

from __future__ import annotations

import argparse
import json

import torch
from grouped_wgrad import timed


def autograd_formula(logits, labels):
    x = logits.float()
    return torch.logsumexp(x, dim=-1) - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens a micro-batch (8192)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    from mbridge.shell.fast_layers import token_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, device="cuda", generator=gen) * 2).to(
        torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=gen)
    weights = torch.rand(args.tokens, device="cuda", generator=gen)
    ref_in = logits.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in, labels, reduction="none")
    (ref * weights).sum().backward()
    variants = {
        "autograd_compiled": torch.compile(autograd_formula, dynamic=False),
        "mbridge_compiled": lambda x, y: token_cross_entropy(x, y, compiled=True),
        "torch_eager": lambda x, y: torch.nn.functional.cross_entropy(x.float(), y,
                                                                      reduction="none"),
    }
    for name, fn in variants.items():
        x = logits.clone().requires_grad_()

        def step(fn=fn, x=x):
            x.grad = None
            (fn(x, labels) * weights).sum().backward()

        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, args.reps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        loss = fn(x, labels)
        grad_diff = (x.grad.float() - ref_in.grad).abs().max() / ref_in.grad.abs().max()
        print(json.dumps(dict(
            variant=name, tokens=args.tokens, vocab=args.vocab, fwd_bwd_ms=round(ms, 3),
            peak_gib=round(peak, 2),
            loss_max_diff=f"{(loss - ref.detach()).abs().max().item():.2e}",
            grad_max_rel_diff=f"{grad_diff.item():.2e}")), flush=True)

if __name__ == "__main__":
    main()
