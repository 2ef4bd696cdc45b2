"""Flash attention over packed documents on one GPU: forward and backward of
``fast_layers.varlen_document_attention`` for one micro-batch of ``--rows`` rows of ``--seq``
tokens (the documents of ``sft_throughput.py``, first-fit packed, boundaries padded as
``packed_seq_params`` pads them), with the longest document bounded by the row count's total
``t`` (what the kernel saw before ``max_document``) and by ``packed_seq_params``' bound.

    python benchmarks/packed_attention.py --rows 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--seq", type=int, default=4096, help="row length (default 4096)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (flash attention)")
    from sft_throughput import _join, documents, rows

    from mbridge.shell.fast_layers import varlen_document_attention
    from mbridge.shell.forward import packed_seq_params

    lengths = documents(256, args.seq, seed=0, median=500)
    mb = rows(lengths, args.seq, 256, packed=True, seed=1, per_mb=1)[:args.rows]
    cu = _join(mb, True)["cu_seqlens"]
    params = packed_seq_params(cu, device=torch.device("cuda"))
    t = int(cu[-1])
    q = torch.randn(t, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for name, bound in (("t", None), ("max_document", params.max_document)):
        def once(bound=bound):
            o = varlen_document_attention(q, k, v, params.cu_seqlens_q, scale=0.125,
                                          longest=bound)
            o.sum().backward()
            return o
        ref = once()
        for _ in range(3):
            once()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.reps):
            once()
        torch.cuda.synchronize()
        out[name] = dict(bound=bound or t, ms=round((time.perf_counter() - start)
                                                     / args.reps * 1e3, 3))
        out[name]["output"] = ref.detach().float()
    same = torch.equal(out["t"].pop("output"), out["max_document"].pop("output"))
    print(json.dumps(dict(tokens=t, documents=params.cu_seqlens_q.numel() - 1,
                          same_output=same, **out)))


if __name__ == "__main__":
    main()
