"""MoE training throughput on one GPU: mbridge on Megatron-Core vs Hugging Face, same run.

Model: Qwen3-30B-A3B's layer shape (hidden 2048, 32 query / 4 KV heads, head_dim 128, 128
experts, moe ffn 768, top-8, vocab 151936, untied) with ``--layers`` layers, seq 4096, bf16
compute with fp32 master weights, AdamW, clip 1.0, random tokens. MFU counts the active
parameters only (the top-k experts a token runs, not all 128):

    N_active/layer = attention (q, k, v, o; q/k norms) + router (h * E) + k * 3 * h * f_moe
    flops/step = 6 * (L * N_active/layer + V * h) * T + 12 * L * (heads * head_dim) * s * T

(T tokens per step; the output layer counted, the embedding lookup not), against the bf16
matmul rate measured in the same run. Variants:
  mbridge          Megatron-Core GPTModel from ``AutoBridge.from_hf_config(cfg)``, local spec
                   (SDPA attention, GroupedSequentialMLP experts: torch._grouped_mm), router
                   and all-to-all dispatcher as Megatron-Core computes them, DDP + distributed
                   optimizer, fused AdamW, Megatron-Core's forward_backward_func
  mbridge_seq      the same with Megatron-Core's SequentialMLP experts (a loop over experts)
  mbridge_fast     mbridge with ``dispatch.use_sorted_dispatch``: the static-shape token
                   dispatcher at EP = 1 (no device-to-host sync in the MoE layer; same
                   routing, aux loss and grouped experts, bit-exact on CPU)
  mbridge_fast_compile  mbridge_fast with each transformer layer under torch.compile
                   (``fast_layers.compile_layers``)
  mbridge_stacked  mbridge_fast with ``experts.stack_experts`` (pre-wrap hook): one
                   parameter per linear per layer, no per-forward stack, 8 expert params a
                   layer for DDP, clipping and Adam instead of 256 (state dict unchanged)
  mbridge_stacked_compile  mbridge_stacked with compiled layers
  mbridge_stacked_compile_fused  the same with the stacked experts' weight gradients added
                   into DDP's buffer in the GEMM (``stack_experts(...,
                   fuse_wgrad_accumulation=True)``: shell/wgrad.py's Triton kernel) instead
                   of autograd's gradient added by DDP's hook
  mbridge_stacked_compile_fused_out  the same with the output layer's weight gradient
                   added into DDP's buffer by its GEMM too (``fast_layers.fuse_output_wgrad``;
                   what ``model.output_gradient_accumulation_fusion`` does in a run)
  hf_eager         transformers Qwen3MoeForCausalLM (sdpa), fp32 params + bf16 autocast,
                   torch.optim.AdamW(fused=True), clip_grad_norm_(1.0)
  hf_compile       the same model under torch.compile
  hf_bf16_eager    transformers with bf16 parameters and AdamW state (no fp32 master weights:
  hf_bf16_compile  less exact, but only then do its experts take torch._grouped_mm: with fp32
                   weights under autocast they fall back to a loop), eager and compiled

``--micro-batches N`` accumulates N micro-batches per optimizer step in every variant
(Megatron-Core's schedule with ``num_microbatches=N``; for transformers N forward/backward
passes with the loss scaled by 1/N before one clip and step), so the optimizer's cost is
shared by the same tokens on both sides; tokens/s counts all N.

    python benchmarks/moe_throughput.py --variants mbridge,hf_eager,hf_compile --layers 4
    python benchmarks/moe_throughput.py --variants mbridge,mbridge_fast,mbridge_fast_compile
"""

from __future__ import annotations

import argparse
import gc
import json
from functools import partial

import torch
from train_throughput import matmul_tflops, time_steps

SHAPE = dict(vocab=151936, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128,
             moe_ffn=768, topk=8)


def hf_config(layers: int, seq: int):
    from transformers import Qwen3MoeConfig

    m = SHAPE
    return Qwen3MoeConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                          num_hidden_layers=layers, num_attention_heads=m["heads"],
                          num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"],
                          intermediate_size=6144, moe_intermediate_size=m["moe_ffn"],
                          num_experts=m["experts"], num_experts_per_tok=m["topk"],
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          max_position_embeddings=seq, tie_word_embeddings=False,
                          output_router_logits=True, router_aux_loss_coef=0.001,
                          architectures=["Qwen3MoeForCausalLM"])


def flops_per_step(layers: int, seq: int, tokens: int) -> float:
    m = SHAPE
    h, q, kv = m["hidden"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    attn = h * q + 2 * h * kv + q * h + 2 * m["head_dim"] + 2 * h
    per_layer = attn + h * m["experts"] + m["topk"] * 3 * h * m["moe_ffn"]
    active = layers * per_layer + h + m["vocab"] * h
    return 6 * active * tokens + 12 * layers * q * seq * tokens


def hf_variant(layers: int, mb: int, seq: int, compile_: bool, bf16: bool = False,
               micro_batches: int = 1):
    from transformers import Qwen3MoeForCausalLM

    cfg = hf_config(layers, seq)
    cfg._attn_implementation = "sdpa"
    model = Qwen3MoeForCausalLM(cfg).cuda().train()
    if bf16:  # bf16 weights and optimizer state: transformers' grouped_mm experts need it
        model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_ else model
    ids = torch.randint(0, SHAPE["vocab"], (mb, seq), device="cuda")

    def step():
        for _ in range(micro_batches):  # gradient accumulation over the same tokens
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not bf16):
                loss = fwd(input_ids=ids, labels=ids).loss
            (loss / micro_batches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, (model, opt)


def mbridge_variant(layers: int, mb: int, seq: int, sequential: bool = False,
                    fast: bool = False, compile_: bool = False, stacked: bool = False,
                    micro_batches: int = 1, grad_fp32: bool = True, fuse_wgrad: bool = False,
                    fuse_output: bool = False):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mbridge import AutoBridge
    from mbridge.shell import experts

    if sequential:  # Megatron-Core's own loop, for comparison
        from megatron.core.transformer.moe.experts import SequentialMLP

        experts.GroupedSequentialMLP.forward = SequentialMLP.forward
    provider = AutoBridge.from_hf_config(hf_config(layers, seq).to_dict()).to_megatron_provider(
        load_weights=False)
    provider.params_dtype = "bfloat16"
    provider.finalize()
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_fp32,
                                        use_distributed_optimizer=True)
    hook = partial(experts.stack_experts, fuse_wgrad_accumulation=fuse_wgrad) if stacked \
        else None
    model = provider.provide_distributed_model(wrap_with_ddp=True, ddp_config=ddp,
                                               pre_wrap_hook=hook)
    if stacked:
        grouped = [m for m in model[0].modules() if isinstance(m, experts.GroupedSequentialMLP)]
        assert grouped and all(m.stacked and m.fuse_wgrad_accumulation == fuse_wgrad
                               for m in grouped)
    from mbridge.shell.fast_layers import use_fused_cross_entropy

    use_fused_cross_entropy(model[0].module)
    if fuse_output:
        from mbridge.shell.fast_layers import fuse_output_wgrad

        assert fuse_output_wgrad(model[0].module)
    if fast:
        from mbridge.shell.dispatch import use_sorted_dispatch

        assert use_sorted_dispatch(model[0]) == layers, "every MoE layer takes the fast path"
    if compile_:
        from mbridge.shell.fast_layers import compile_layers

        compile_layers(model[0].module)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True,
                                                 use_distributed_optimizer=True, clip_grad=1.0,
                                                 params_dtype=torch.bfloat16), model)
    for inner in getattr(opt, "chained_optimizers", [opt]):
        for group in inner.optimizer.param_groups:
            group.update(fused=True, foreach=False)
    ids = torch.randint(0, SHAPE["vocab"], (mb, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").unsqueeze(0).expand(mb, -1)
    fb = get_forward_backward_func()

    def forward_step(data_iterator, chunk):
        out = chunk(ids, pos, attention_mask=None, labels=ids)
        return out, lambda t: (t.float().mean(), {"loss": t.float().mean().detach()})

    def step():
        for chunk in model:
            chunk.zero_grad_buffer()
        opt.zero_grad()
        losses = fb(forward_step_func=forward_step, data_iterator=None, model=model,
                    num_microbatches=micro_batches, seq_length=seq, micro_batch_size=mb,
                    forward_only=False)
        opt.step()
        return losses[0]["loss"]

    return step, (model, opt)


MBRIDGE = {"mbridge": {}, "mbridge_seq": dict(sequential=True), "mbridge_fast": dict(fast=True),
           "mbridge_fast_compile": dict(fast=True, compile_=True),
           "mbridge_stacked": dict(fast=True, stacked=True),
           "mbridge_stacked_compile": dict(fast=True, stacked=True, compile_=True),
           "mbridge_stacked_compile_fused": dict(fast=True, stacked=True, compile_=True,
                                                 fuse_wgrad=True),
           "mbridge_stacked_compile_fused_out": dict(fast=True, stacked=True, compile_=True,
                                                     fuse_wgrad=True, fuse_output=True)}
HF = ("hf_eager", "hf_compile", "hf_bf16_eager", "hf_bf16_compile")


def build(variant: str, layers: int, mb: int, seq: int, micro_batches: int = 1,
          grad_fp32: bool = True):
    if variant in HF:
        return hf_variant(layers, mb, seq, variant.endswith("compile"), "bf16" in variant,
                          micro_batches)
    if variant in MBRIDGE:
        return mbridge_variant(layers, mb, seq, micro_batches=micro_batches,
                               grad_fp32=grad_fp32, **MBRIDGE[variant])
    raise SystemExit(f"unknown variant {variant!r}; use one of {', '.join([*MBRIDGE, *HF])}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="mbridge,hf_eager,hf_compile")
    p.add_argument("--layers", default="4", help="comma-separated layer counts")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches accumulated per optimizer step (every variant)")
    p.add_argument("--bf16-grads", action="store_true",
                   help="mbridge: gradients accumulated and reduced in bf16 (Megatron-Core's "
                        "default, and transformers' bf16 variants' precision) instead of fp32")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write results here")
    p.add_argument("--profile", default=None, metavar="VARIANT:LAYERS",
                   help="also print the top CUDA kernels of one variant, e.g. mbridge:4")
    args = p.parse_args()
    peak = matmul_tflops()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"bf16 matmul {peak:.0f} TFLOP/s (measured)", flush=True)
    rows = []
    for variant in filter(None, args.variants.split(",")):
        for layers in map(int, args.layers.split(",")):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = dict(variant=variant, layers=layers, micro_batch=args.micro_batch,
                       micro_batches=args.micro_batches, seq=args.seq)
            if variant in MBRIDGE:
                row["grads"] = "bf16" if args.bf16_grads else "fp32"
            try:
                step, keep = build(variant, layers, args.micro_batch, args.seq,
                                   args.micro_batches, not args.bf16_grads)
                dt = time_steps(step, args.steps, args.warmup)
                tokens = args.micro_batches * args.micro_batch * args.seq
                tflops = flops_per_step(layers, args.seq, tokens) / dt / 1e12
                row.update(step_s=round(dt, 4), tokens_per_s=round(tokens / dt),
                           tflops=round(tflops, 1), mfu=round(tflops / peak, 3),
                           peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1))
                del step, keep
            except torch.OutOfMemoryError:
                row.update(error="out of memory")
            except Exception as e:  # report and go on
                row.update(error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(peak_tflops=peak, rows=rows), f, indent=1)
            gc.collect()
            torch.cuda.empty_cache()
    if args.profile:
        from train_throughput import profile

        variant, layers = args.profile.split(":")
        step, keep = build(variant, int(layers), args.micro_batch, args.seq,
                           args.micro_batches)
        profile(step, f"{variant} at {layers} layers")


if __name__ == "__main__":
    main()
