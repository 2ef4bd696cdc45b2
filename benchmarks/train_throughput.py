"""Training throughput on one GPU: mbridge on Megatron-Core vs Hugging Face, same run.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, vocab
128256, tied embeddings; ``--shape llama32_3b``: Llama-3.2-3B, hidden 3072, 28 layers, 24
heads, 8 KV heads, ffn 8192, tied), seq 4096, bf16 compute with fp32 master weights, AdamW, gradient
clipping at 1.0, random tokens. Prints, per variant and micro batch: step time, tokens/s,
TFLOP/s, MFU and peak memory. MFU uses

    flops/step = 6 * (N_nonembedding + V * h) * T + 12 * L * h * s * T      (T tokens/step)

against the bf16 matmul rate measured in the same run (8192^3 products), so the ratio is
robust to clocks. Variants:
  mbridge           Megatron-Core GPTModel with mbridge's SDPA layer spec, DDP + distributed
                    optimizer (bf16 params, fp32 main params and grads), fused AdamW, clip 1.0,
                    Megatron-Core's forward_backward_func
  mbridge_compile   the same with each transformer layer under torch.compile
  hf_eager          transformers LlamaForCausalLM, attn sdpa, fp32 params + bf16 autocast,
                    torch.optim.AdamW(fused=True), clip_grad_norm_(1.0)
  hf_compile        the same model under torch.compile

    python benchmarks/train_throughput.py --variants mbridge,hf_eager --micro-batches 1,2,4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

LLAMA_1B = dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192)
LLAMA_3B = dict(vocab=128256, hidden=3072, layers=28, heads=24, kv_heads=8, ffn=8192)
SHAPES = {"llama32_1b": LLAMA_1B, "llama32_3b": LLAMA_3B}


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_step(m: dict, seq: int, tokens: int) -> float:
    h, L, f = m["hidden"], m["layers"], m["ffn"]
    kv = h // m["heads"] * m["kv_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h  # q,o + k,v + mlp + norms
    n_nonembedding = L * per_layer + h
    return 6 * (n_nonembedding + m["vocab"] * h) * tokens + 12 * L * h * seq * tokens


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    assert torch.isfinite(torch.as_tensor(loss)).all()
    return (time.perf_counter() - t) / steps


def hf_variant(m: dict, mb: int, seq: int, compile_: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                      num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                      intermediate_size=m["ffn"], tie_word_embeddings=True,
                      max_position_embeddings=seq, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_ else model
    ids = torch.randint(0, m["vocab"], (mb, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: (model, opt)


def mbridge_variant(m: dict, mb: int, seq: int, compile_: bool, fused_ce: bool = False,
                    token_ce: bool = False):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mbridge import GPTModelProvider, ModelSpec

    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=m["vocab"],
                     hidden_size=m["hidden"], ffn_hidden_size=m["ffn"], num_layers=m["layers"],
                     num_heads=m["heads"], num_kv_heads=m["kv_heads"],
                     head_dim=m["hidden"] // m["heads"], tie_embeddings=True,
                     max_position_embeddings=seq)
    provider = GPTModelProvider(spec=spec, params_dtype="bfloat16",
                                extra_config=dict(cross_entropy_loss_fusion=fused_ce))
    provider.finalize()
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp)
    if token_ce:
        from mbridge.shell.fast_layers import use_fused_cross_entropy

        use_fused_cross_entropy(model[0].module)
    if compile_:
        from mbridge.shell.fast_layers import compile_layers

        compile_layers(model[0].module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True,
                                                 use_distributed_optimizer=True, clip_grad=1.0,
                                                 params_dtype=torch.bfloat16), model)
    for inner in getattr(opt, "chained_optimizers", [opt]):
        for group in inner.optimizer.param_groups:  # torch AdamW reads these at each step
            group.update(fused=True, foreach=False)
    ids = torch.randint(0, m["vocab"], (mb, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mb, -1)
    fb = get_forward_backward_func()

    def forward_step(data_iterator, model):
        out = model(ids, pos, attention_mask=None, labels=ids)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    def step():
        for chunk in model:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        losses = fb(forward_step_func=forward_step, data_iterator=None, model=model,
                    num_microbatches=1, seq_length=seq, micro_batch_size=mb,
                    forward_only=False)
        opt.step()
        return losses[0]["loss"]

    return step, (model, opt)


def build(variant: str, mb: int, seq: int, m: dict = LLAMA_1B):
    """``hf_eager``, ``hf_compile``, ``mbridge`` plus options joined by ``_``: ``compile``
    (each layer under torch.compile), ``fce`` (Megatron-Core's fused cross entropy), ``ce``
    (mbridge's compiled cross entropy)."""
    parts = variant.split("_")
    if parts[0] == "hf":
        return hf_variant(m, mb, seq, "compile" in parts)
    return mbridge_variant(m, mb, seq, "compile" in parts, fused_ce="fce" in parts,
                           token_ce="ce" in parts)


def profile(step, name: str, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"profile of {name}, {steps} steps:")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                    max_name_column_width=70))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="mbridge,mbridge_compile,hf_eager,hf_compile")
    p.add_argument("--micro-batches", default="1,2,4")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama32_1b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--profile", default=None, metavar="VARIANT:MB",
                   help="also print the top CUDA kernels of one variant, e.g. mbridge:2")
    args = p.parse_args()
    peak = matmul_tflops()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16 matmul {peak:.0f} TFLOP/s (measured)", flush=True)
    rows = []
    for variant in args.variants.split(","):
        for mb in map(int, args.micro_batches.split(",")):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = dict(variant=variant, shape=args.shape, micro_batch=mb, seq=args.seq)
            try:
                step, keep = build(variant, mb, args.seq, SHAPES[args.shape])
                dt = time_steps(step, args.steps, args.warmup)
                tokens = mb * args.seq
                tflops = flops_per_step(SHAPES[args.shape], args.seq, tokens) / dt / 1e12
                row.update(step_s=round(dt, 4), tokens_per_s=round(tokens / dt),
                           tflops=round(tflops, 1), mfu=round(tflops / peak, 3),
                           peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
                del step, keep
            except torch.OutOfMemoryError:
                row.update(error="out of memory")
            except Exception as e:  # report and go on to the next variant
                row.update(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(peak_tflops=peak, rows=rows), f, indent=1)
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    if args.profile:
        variant, mb = args.profile.split(":")
        try:
            step, keep = build(variant, int(mb), args.seq, SHAPES[args.shape])
            profile(step, variant)
        except torch.OutOfMemoryError:
            print(f"profile of {args.profile}: out of memory")


if __name__ == "__main__":
    main()
