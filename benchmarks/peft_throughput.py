"""LoRA fine-tuning throughput on one GPU: mbridge on Megatron-Core vs transformers + peft,
same run, same shape, same adapter rank.

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, ffn 8192, vocab
128256, tied embeddings), seq 4096, random tokens, bf16 base weights (frozen), LoRA rank 16,
alpha 32, on every attention and MLP projection, AdamW on the adapters only, gradient
clipping at 1.0. Prints, per variant and micro batch: step time, tokens/s, peak memory and
the ratio to the best transformers + peft variant. Variants:
  mbridge            Megatron-Core GPTModel (mbridge's local SDPA layer spec), LoRA on the fused
                     linear_qkv/linear_proj/linear_fc1/linear_fc2 (Megatron-Bridge's default),
                     DDP + distributed optimizer over the adapters (fp32 main params),
                     Megatron-Core's forward_backward_func; ``_ce``: mbridge's compiled cross
                     entropy; ``_compile``: each transformer layer under torch.compile
  mbridge_canonical  one adapter per projection (q, k, v, gate, up: peft's layout)
  hf_eager           transformers LlamaForCausalLM in bf16, attn sdpa, peft LoRA on q/k/v/o/
                     gate/up/down (adapters fp32, peft's default), bf16 autocast,
                     torch.optim.AdamW(fused=True), clip_grad_norm_(1.0)
  hf_compile         the same model under torch.compile

    python benchmarks/peft_throughput.py                         # the GPU run
    python benchmarks/peft_throughput.py --smoke                 # tiny shape on CPU, 2 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

LLAMA_1B = dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192)
TINY = dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
RANK, ALPHA = 16, 32


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync()
    assert torch.isfinite(torch.as_tensor(loss)).all()
    return (time.perf_counter() - t) / steps


def hf_variant(m: dict, mb: int, seq: int, compile_: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                      num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                      intermediate_size=m["ffn"], tie_word_embeddings=True,
                      max_position_embeddings=seq, attn_implementation="sdpa")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlamaForCausalLM(cfg).to(device=_device(), dtype=dtype)
    model = get_peft_model(model, LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())
    fwd = torch.compile(model) if compile_ else model
    ids = torch.randint(0, m["vocab"], (mb, seq), device=_device())

    def step():
        with torch.autocast(_device(), dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (model, opt), sum(p.numel() for p in params)


def mbridge_variant(m: dict, mb: int, seq: int, *, canonical: bool, compile_: bool,
                    token_ce: bool):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mbridge import GPTModelProvider, ModelSpec
    from mbridge.peft import CanonicalLoRA, LoRA
    from mbridge.shell.cpu_shim import cuda_as_cpu

    gpu = torch.cuda.is_available()
    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=m["vocab"],
                     hidden_size=m["hidden"], ffn_hidden_size=m["ffn"], num_layers=m["layers"],
                     num_heads=m["heads"], num_kv_heads=m["kv_heads"],
                     head_dim=m["hidden"] // m["heads"], tie_embeddings=True,
                     max_position_embeddings=seq)
    provider = GPTModelProvider(spec=spec, params_dtype="bfloat16" if gpu else "float32")
    provider.finalize()
    hook = (CanonicalLoRA if canonical else LoRA)(dim=RANK, alpha=ALPHA)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    # adapters go on Megatron-Core's local linears (use_te=False; see docs/architecture.md)
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp,
                                               use_te=False, pre_wrap_hook=hook)
    if token_ce:
        from mbridge.shell.fast_layers import use_fused_cross_entropy

        use_fused_cross_entropy(model[0].module)
    if compile_:
        from mbridge.shell.fast_layers import compile_layers

        compile_layers(model[0].module)
    with cuda_as_cpu():
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-4, bf16=gpu, use_distributed_optimizer=True, clip_grad=1.0,
            params_dtype=torch.bfloat16 if gpu else torch.float32), model)
    for inner in getattr(opt, "chained_optimizers", [opt]):
        for group in inner.optimizer.param_groups:  # torch AdamW reads these at each step
            group.update(fused=gpu, foreach=False)
    ids = torch.randint(0, m["vocab"], (mb, seq), device=_device())
    pos = torch.arange(seq, device=_device()).unsqueeze(0).expand(mb, -1)
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
        with cuda_as_cpu():
            losses = fb(forward_step_func=forward_step, data_iterator=None, model=model,
                        num_microbatches=1, seq_length=seq, micro_batch_size=mb,
                        forward_only=False)
            opt.step()
        return losses[0]["loss"]

    trainable = sum(p.numel() for c in model for p in c.parameters() if p.requires_grad)
    return step, (model, opt), trainable


def build(variant: str, m: dict, mb: int, seq: int):
    """``hf_eager``, ``hf_compile``, ``mbridge[_canonical][_ce][_compile]``."""
    parts = variant.split("_")
    if parts[0] == "hf":
        return hf_variant(m, mb, seq, "compile" in parts)
    return mbridge_variant(m, mb, seq, canonical="canonical" in parts,
                           compile_="compile" in parts, token_ce="ce" in parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="mbridge,mbridge_ce,mbridge_ce_compile,"
                                         "mbridge_canonical_ce,hf_eager,hf_compile")
    p.add_argument("--micro-batches", default="1,2")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--profile", default=None, metavar="VARIANT:MB",
                   help="instead of timing: a CUDA profile of 3 steps of one variant")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model at seq 64 for 2 steps, on CPU if there is no GPU "
                        "(variants mbridge, mbridge_canonical, hf_eager unless given)")
    args = p.parse_args()
    shape = LLAMA_1B
    if args.smoke:
        shape, args.seq, args.steps, args.warmup = TINY, 64, 2, 1
        args.micro_batches = "1"
        if args.variants == p.get_default("variants"):
            args.variants = "mbridge,mbridge_canonical,hf_eager"
    gpu = torch.cuda.is_available()
    print(f"device {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, "
          f"shape {shape}, seq {args.seq}, LoRA rank {RANK}", flush=True)
    if args.profile:
        from train_throughput import profile

        variant, mb = args.profile.split(":")
        step, keep, _ = build(variant, shape, int(mb), args.seq)
        profile(step, args.profile)
        return
    rows = []
    for variant in args.variants.split(","):
        for mb in map(int, args.micro_batches.split(",")):
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = dict(variant=variant, micro_batch=mb, seq=args.seq)
            try:
                step, keep, trainable = build(variant, shape, mb, args.seq)
                dt = time_steps(step, args.steps, args.warmup)
                row.update(trainable=trainable, step_s=round(dt, 4),
                           tokens_per_s=round(mb * args.seq / dt))
                if gpu:
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                del step, keep
            except torch.OutOfMemoryError:
                row.update(error="out of memory")
            except Exception as e:  # report and go on to the next variant
                row.update(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    for mb in map(int, args.micro_batches.split(",")):
        best_hf = max((r["tokens_per_s"] for r in rows if r["micro_batch"] == mb
                       and r["variant"].startswith("hf") and "tokens_per_s" in r), default=None)
        for r in rows:
            if r["micro_batch"] == mb and best_hf and "tokens_per_s" in r:
                r["vs_best_hf"] = round(r["tokens_per_s"] / best_hf, 2)
                print(f"mb {mb} {r['variant']}: {r['tokens_per_s']} tokens/s, "
                      f"{r['vs_best_hf']}x the best transformers + peft", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
