"""SFT throughput on one GPU: packed rows vs the same documents padded, counting real tokens.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, vocab
128256, tied embeddings), bf16 params with fp32 main params and grads, distributed Adam
(torch's fused kernel, as the training shell takes it without Apex/TE), clip 1.0,
Megatron-Core's forward_backward_func and the per-token loss of ``mbridge.training``.
Documents: lengths drawn log-normally (median about 500 tokens, clipped to 16..seq; seeded),
random tokens, the loss on each document's second half. The same documents run twice:

  packed   first-fit rows of ``--seq`` (``mbridge.train.packing``), micro-batch 1, rope and
           attention kept inside each document through Megatron-Core's ``thd``
           PackedSeqParams (TE's kernel when TE is installed, else the shell's: flash
           attention over cu_seqlens on CUDA, SDPA with a block-diagonal mask on the CPU)
  padded   one document per row, padded to ``--seq``, micro-batch 1

Options joined to a variant with ``_``: ``ce`` mbridge's compiled cross entropy (TP=1),
``compile`` each transformer layer under torch.compile, ``compilemlp`` only each layer's MLP,
``x2`` (``x4``, ``x8``) two (four, eight) rows per micro-batch: padded rows stacked as a
batch, packed rows concatenated into one ``thd`` sequence (attention and positions still
inside each document, so the work per token is the same; only the kernels see more tokens
at once).

Per run: real tokens/s (pad excluded) and MFU on real tokens, with

    flops = 6 * (N_nonembedding + V * h) * T_real + 12 * L * h * sum(len_i ** 2)

(attention counted only inside each document) against the bf16 matmul rate measured in the
same run (8192^3 products). ``--smoke``: a tiny model on CPU in seconds, to check the script.

    python benchmarks/sft_throughput.py                    # one GPU: the fastest variants
    python benchmarks/sft_throughput.py --smoke            # CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch

DEFAULT_VARIANTS = "packed_ce_compile_x8,padded_ce_compile_x4"  # the fastest of each (H200)
LLAMA_1B = dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192)
TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)


def matmul_tflops(device: str, n: int = 8192, reps: int = 20) -> float:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def documents(n: int, seq: int, seed: int, median: float) -> list[int]:
    """Document lengths (tokens including the last label): log-normal, clipped."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.exp(math.log(median) + 0.8 * torch.randn(n, generator=gen))
    return [int(min(max(x, 16), seq + 1)) for x in raw.tolist()]


def model_flops(m: dict, lengths: list[int]) -> float:
    h, L, f = m["hidden"], m["layers"], m["ffn"]
    kv = h // m["heads"] * m["kv_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
    n = L * per_layer + h + m["vocab"] * h
    tokens = sum(lengths)
    return 6 * n * tokens + 12 * L * h * sum(x * x for x in lengths)


def rows(lengths: list[int], seq: int, vocab: int, packed: bool, seed: int, per_mb: int = 1):
    """Micro-batches (dicts of tensors) holding the documents, packed or padded."""
    from mbridge.train import packing

    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        mask = [0] * ((n - 1) // 2) + [1] * (n - 1 - (n - 1) // 2)
        docs.append((ids[:-1], ids[1:], mask))
    bins = packing.first_fit([len(d[0]) for d in docs], seq) if packed else \
        [[i] for i in range(len(docs))]
    out = []
    for r in packing.pack(docs, bins):
        pad = seq - len(r.tokens)
        mb = {"tokens": torch.tensor([r.tokens + [0] * pad]),
              "labels": torch.tensor([r.labels + [0] * pad]),
              "loss_mask": torch.tensor([r.loss_mask + [0] * pad]),
              "position_ids": torch.tensor([packing.positions(r.seq_lengths, seq)])}
        if packed:
            mb["cu_seqlens"] = torch.tensor(packing.cu_seqlens(r.seq_lengths, seq),
                                            dtype=torch.int32)
        else:
            mb["position_ids"] = torch.arange(seq)[None]
        out.append(mb)
    return [_join(out[i:i + per_mb], packed) for i in range(0, len(out), per_mb)]


def _join(mbs: list[dict], packed: bool) -> dict:
    """One micro-batch of several rows: stacked as a batch when padded; concatenated into one
    ``thd`` sequence when packed (cu_seqlens shifted, each row's trailing pad its own span)."""
    if len(mbs) == 1:
        return mbs[0]
    if not packed:
        return {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
    out = {k: torch.cat([mb[k] for mb in mbs], dim=1) for k in mbs[0] if k != "cu_seqlens"}
    cu, at = [0], 0
    for mb in mbs:
        cu += [at + int(x) for x in mb["cu_seqlens"][1:]]
        at += mb["tokens"].shape[1]
    out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    return out


def build(m: dict, seq: int, device: str, opts: set[str] = frozenset()):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mbridge import GPTModelProvider, ModelSpec
    from mbridge.shell.cpu_shim import cuda_as_cpu

    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=m["vocab"],
                     hidden_size=m["hidden"], ffn_hidden_size=m["ffn"], num_layers=m["layers"],
                     num_heads=m["heads"], num_kv_heads=m["kv_heads"],
                     head_dim=m["hidden"] // m["heads"], tie_embeddings=True,
                     max_position_embeddings=seq)
    bf16 = device == "cuda"
    provider = GPTModelProvider(spec=spec, params_dtype="bfloat16" if bf16 else "float32",
                                extra_config=dict(calculate_per_token_loss=True))
    provider.finalize()
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp)
    from mbridge.shell import fast_layers

    if "ce" in opts:
        fast_layers.use_fused_cross_entropy(model[0].module)
    if "compile" in opts:
        fast_layers.compile_layers(model[0].module)
    if "compilemlp" in opts:
        for layer in model[0].module.decoder.layers:
            layer.mlp.compile()
    with cuda_as_cpu():
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-5, bf16=bf16, use_distributed_optimizer=True, clip_grad=1.0,
            params_dtype=torch.bfloat16 if bf16 else torch.float32), model)
    from mbridge.shell.fast_optimizer import use_fused_adam

    use_fused_adam(opt)  # as the training shell does (CUDA without Apex/TE)
    return model, opt


def make_step(model, opt, seq: int, device: str):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mbridge.shell.cpu_shim import cuda_as_cpu
    from mbridge.shell.forward import packed_seq_params

    model[0].config.finalize_model_grads_func = finalize_model_grads
    fb = get_forward_backward_func()

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        extra = {}
        if "cu_seqlens" in mb:
            extra["packed_seq_params"] = packed_seq_params(mb["cu_seqlens"],
                                                           device=mb["tokens"].device)
        out = chunk(mb["tokens"], mb["position_ids"], None, labels=mb["labels"], **extra)

        def loss_func(per_token):
            mask = mb["loss_mask"].reshape(-1).float()
            total = torch.sum(per_token.float().reshape(-1) * mask)
            return total, mask.sum().to(torch.int), {"lm loss": torch.stack(
                [total.detach(), mask.sum().detach()])}

        return out, loss_func

    def step(batch):
        batch = [{k: v if k == "cu_seqlens" else v.to(device, non_blocking=True)
                  for k, v in mb.items()} for mb in batch]
        for chunk in model:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        with cuda_as_cpu():
            out = fb(forward_step_func=forward_step, data_iterator=iter(batch), model=model,
                     num_microbatches=len(batch), seq_length=batch[0]["tokens"].shape[1],
                     micro_batch_size=batch[0]["tokens"].shape[0],
                     forward_only=False)
            opt.step()
        s = sum(o["lm loss"] for o in out)
        return s[0] / s[1]

    return step


def run(name: str, step, batches: list, lengths: list[int], m: dict, peak: float,
        device: str, warmup: int) -> dict:
    for b in batches if warmup < 0 else batches[:warmup]:
        step(b)
    sync(device)
    t = time.perf_counter()
    for b in batches:
        loss = step(b)
    sync(device)
    dt = time.perf_counter() - t
    assert torch.isfinite(torch.as_tensor(loss)), loss
    real = sum(lengths) - len(lengths)  # inputs: each document's last token is only a label
    slots = sum(mb["tokens"].numel() for b in batches for mb in b)
    tflops = model_flops(m, [n - 1 for n in lengths]) / dt / 1e12
    return dict(variant=name, micro_batches=sum(len(b) for b in batches), real_tokens=real,
                fill=round(real / slots, 3), peak_gib=round(_peak_gib(device), 1),
                seconds=round(dt, 3), real_tokens_per_s=round(real / dt),
                tflops=round(tflops, 2), mfu=round(tflops / peak, 3))


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU in seconds")
    p.add_argument("--seq", type=int, default=None, help="row length (default 4096; smoke 256)")
    p.add_argument("--documents", type=int, default=None, help="(default 256; smoke 24)")
    p.add_argument("--median", type=float, default=None,
                   help="median document length (default 500; smoke 40)")
    p.add_argument("--rows-per-step", type=int, default=8,
                   help="rows per optimizer step (default 8)")
    p.add_argument("--warmup", type=int, default=-1,
                   help="steps run before timing (default -1: every step once, so that a "
                        "compiled layer has seen every shape of the run before the timer "
                        "starts)")
    p.add_argument("--variants", default=None,
                   help="packed|padded, each with options joined by _ (ce, compile, "
                        "compilemlp, x2, x4, x8), e.g. packed_ce_compile_x2,padded_ce "
                        f"(default {DEFAULT_VARIANTS}; with --smoke packed,padded)")
    p.add_argument("--packed-attention", choices=["auto", "varlen", "flex", "sdpa"], default="auto",
                   help="without TE, packed rows attend through flash attention over "
                        "cu_seqlens (varlen; auto for CUDA bf16), FlexAttention's document "
                        "mask (flex), or SDPA with a dense block-diagonal mask (sdpa; auto "
                        "on the CPU)")
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: a CUDA profile of 3 steps of the first variant")
    args = p.parse_args()
    from mbridge.shell import fast_layers

    fast_layers.PACKED_KERNEL = args.packed_attention
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    m = TINY if args.smoke else LLAMA_1B
    seq = args.seq or (256 if args.smoke else 4096)
    n_docs = args.documents or (24 if args.smoke else 256)
    lengths = documents(n_docs, seq, seed=0, median=args.median or (40 if args.smoke else 500))
    peak = matmul_tflops(device)
    from mbridge.shell.model import have_te

    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"{'bf16' if device == 'cuda' else 'fp32'} matmul {peak:.2f} TFLOP/s (measured); "
          f"{n_docs} documents, {sum(lengths)} tokens, seq {seq}; packed attention: "
          f"{'TE' if have_te() else args.packed_attention}", flush=True)
    out = []
    variants = args.variants or ("packed,padded" if args.smoke else DEFAULT_VARIANTS)
    for variant in variants.split(","):
        kind, *opts = variant.split("_")
        if kind not in ("packed", "padded") or set(opts) - {"ce", "compile", "compilemlp",
                                                            "x2", "x4", "x8"}:
            p.error(f"unknown variant {variant!r}")
        per_mb = next((int(o[1:]) for o in opts if o in ("x2", "x4", "x8")), 1)
        mbs = rows(lengths, seq, m["vocab"], packed=kind == "packed", seed=1, per_mb=per_mb)
        k = max(1, args.rows_per_step // per_mb)
        batches = [mbs[i:i + k] for i in range(0, len(mbs), k)]
        model, opt = build(m, seq, device, set(opts))
        step = make_step(model, opt, seq, device)
        if args.profile:
            from train_throughput import profile

            profile(functools.partial(step, batches[0]), variant)
            return
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            out.append(run(variant, step, batches, lengths, m, peak, device, args.warmup))
        except Exception as e:  # report it and go on to the next variant
            if device != "cuda":
                raise
            out.append(dict(variant=variant, error=f"{type(e).__name__}: {e}"[:300]))
        print(json.dumps(out[-1]), flush=True)
        del model, opt, step
        if device == "cuda":
            torch.cuda.empty_cache()
    if len(out) == 2 and all("error" not in r for r in out):
        ratio = out[0]["real_tokens_per_s"] / out[1]["real_tokens_per_s"]
        print(f"{out[0]['variant']} / {out[1]['variant']} real tokens/s: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak_tflops=peak, rows=out), f, indent=1)


if __name__ == "__main__":
    main()
