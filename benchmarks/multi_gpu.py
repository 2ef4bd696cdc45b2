"""Multi-GPU validation in one call: conversion parity over NCCL at TP/PP/EP layouts, export
timing against one GPU, training losses at TP/PP/DP against one GPU, and 1B training
throughput with its data-parallel scaling; prints a table and writes it as JSON.

    python benchmarks/multi_gpu.py --workdir /tmp/mgpu --json out/multi_gpu.json  # 2-4 GPUs
    python benchmarks/multi_gpu.py --cpu --workdir /tmp/mgpu   # the same checks over gloo

Parts (each a few real ``torchrun`` launches of scripts the CPU test suite also runs):
  convert   tiny random HF models (tests/models.py, tests/moe/moe_models.py) at tp=2, pp=2
            (tp=2,pp=2 on 4 GPUs), MoE at ep=2 and tp=2,ep=2: fp32 logits within 1e-5 max
            abs of HF (the CPU suite's tolerance) and bit-exact export
            (tests/scripts/parity.py, tests/moe/scripts/moe_parity.py)
  convert   a bf16 Llama-3.2-1B-shaped model (random init, std 0.02; ``--cpu``: a tiny one) at
            tp=1 on one device and tp=2, pp=2 (tp=2,pp=2): bf16 logits against transformers'
            bf16 logits on one device within BF16_RTOL x max |logit| (bf16 keeps 8 bits:
            kernels and summation orders differ), bit-exact export, and export seconds against
            the same run's one-device export (benchmarks/multi_gpu_rank.py)
  train     the tiny model, fp32, 20 steps at DP=2, TP=2, PP=2 against 1 rank
            (tests/train/scripts/train_runs.py): per-step losses within TRAIN_RTOL
  speed     Llama-3.2-1B shape, seq 4096, bf16, mock data, ``mbridge.train`` at 1 GPU and at
            DP=all GPUs (GPU only): tokens/s and scaling efficiency = tokens/s(N) / (N x 1 GPU)

NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the shared machines require.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
for p in (TESTS, TESTS / "moe", ROOT / "benchmarks"):
    sys.path.insert(0, str(p))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS / "moe"), str(TESTS / "train" / "scripts"), str(ROOT / "benchmarks"),
     str(ROOT), os.environ.get("PYTHONPATH", "")])
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

from dist_util import free_port, torchrun  # noqa: E402

FP32_TOL = 1e-5  # the CPU suite's logits tolerance (fp32)
BF16_RTOL = 2e-2  # bf16 logits: max |diff| <= BF16_RTOL * max |ref logit|
TRAIN_RTOL = 1e-4  # fp32 losses vs 1 rank (CPU measured 7e-8; GPU reductions reorder more)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, part, model, layout, metric, value, bound=None, ok=None):
        row = dict(part=part, model=model, layout=layout, metric=metric, value=value,
                   bound=bound, ok=ok)
        self.rows.append(row)
        print("  " + " | ".join("" if v is None else str(v) for v in row.values()), flush=True)

    def markdown(self) -> str:
        out = ["| part | model | layout | metric | value | bound | pass |", "|" + "---|" * 7]
        for r in self.rows:
            ok = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
            val = f"{r['value']:.3g}" if isinstance(r["value"], float) else r["value"]
            out.append(f"| {r['part']} | {r['model']} | {r['layout']} | {r['metric']} | {val} "
                       f"| {'' if r['bound'] is None else r['bound']} | {ok} |")
        return "\n".join(out)


def convert_tiny(work: Path, world: int, table: Table) -> None:
    from models import make_hf
    from moe_models import make_hf as make_moe

    dense = [work / n for n in ("llama", "qwen3")]
    for d in dense:
        make_hf(d.name, d)
    moe = [work / n for n in ("qwen3_moe", "mixtral")]
    for d in moe:
        make_moe(d.name, d)
    layouts = ["tp=2", "pp=2"] + (["tp=2,pp=2"] if world >= 4 else [])
    results = torchrun(TESTS / "scripts" / "parity.py", str(work / "out"), ";".join(layouts),
                       *map(str, dense), nproc=min(world, 4))
    results += torchrun(TESTS / "moe" / "scripts" / "moe_parity.py", str(work / "out_moe"),
                        "ep=2;tp=2,ep=2", *map(str, moe), nproc=2)
    for r in results:
        ok = r.get("logits_diff", 1.0) < FP32_TOL and bool(r.get("exact"))
        table.add("convert", r["model"], r["layout"],
                  f"fp32 logits max abs diff, export exact: rank {r['rank']}",
                  r.get("logits_diff", r.get("error")), FP32_TOL, ok)


def make_bf16(work: Path, shape: dict, device: str) -> tuple[Path, Path]:
    """A random-init bf16 Llama saved with save_pretrained, and its reference logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir, ref = work / "llama_bf16", work / "llama_bf16_ref.pt"
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms near 1 with noise, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(hf_dir)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (2, 256), generator=gen)
    model = model.to(device).eval()
    with torch.no_grad():
        logits = model(ids.to(device)).logits.cpu()
    torch.save(dict(ids=ids, logits=logits, dtype="bfloat16"), ref)
    del model
    return hf_dir, ref


def convert_bf16(work: Path, world: int, gpu: bool, table: Table) -> None:
    hf_dir, ref = make_bf16(work, LLAMA_1B if gpu else TINY, "cuda" if gpu else "cpu")
    script = ROOT / "benchmarks" / "multi_gpu_rank.py"
    one = torchrun(script, str(work), str(hf_dir), str(ref), "tp=1", nproc=1, timeout=1200)[0]
    layouts = ["tp=2", "pp=2"] + (["tp=2,pp=2"] if world >= 4 else [])
    name = "llama-1b-bf16" if gpu else "llama-tiny-bf16"
    for layout_runs in [[one]] + [torchrun(script, str(work), str(hf_dir), str(ref), lay,
                                           nproc=min(world, 4), timeout=1200)
                                  for lay in layouts]:
        r = layout_runs[0]
        bound = BF16_RTOL * r["ref_max"]
        table.add("convert", name, r["layout"], "bf16 logits max|diff|", r["logits_diff"],
                  round(bound, 4), r["logits_diff"] <= bound)
        table.add("convert", name, r["layout"], "export bit-exact", r["exact"], None, r["exact"])
        table.add("convert", name, r["layout"], "import s", r["import_s"])
        table.add("convert", name, r["layout"], "export s (1 device / this)",
                  f"{r['export_s']} ({one['export_s'] / r['export_s']:.2f}x)")


def train_layouts(work: Path, table: Table) -> None:
    from models import make_hf

    hf = work / "train_hf"
    make_hf("llama", hf)
    script = TESTS / "train" / "scripts" / "train_runs.py"
    base = "model.make_vocab_size_divisible_by=32;train.train_iters=20"
    ref = torchrun(script, str(work), str(hf), f"one:{base}", nproc=1)[0]["losses"]
    runs = {"dp=2": "", "tp=2": "model.tensor_model_parallel_size=2",
            "pp=2": "model.pipeline_model_parallel_size=2"}
    out = torchrun(script, str(work), str(hf), *[f"{k}:{base};{v}".rstrip(";")
                                                 for k, v in runs.items()], nproc=2)
    for layout in runs:
        worst = max(abs(a - b) / abs(b) for r in out if r["run"] == layout
                    for a, b in zip(r["losses"], ref))
        n = min(len(r["losses"]) for r in out if r["run"] == layout)
        table.add("train", "llama-tiny-fp32", layout, f"loss max rel diff, {n} steps", worst,
                  TRAIN_RTOL, worst <= TRAIN_RTOL and n == len(ref) == 20)


def speed(work: Path, world: int, table: Table) -> None:
    def run(n: int) -> float:
        out = work / f"speed{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
               f"--master-port={free_port()}", "-m", "mbridge.train",
               "--recipe", "llama32_1b_pretrain", "data.mock=true", "data.blend=[]",
               "model.seq_length=4096", "train.micro_batch_size=4",
               f"train.global_batch_size={4 * n}", "train.train_iters=12",
               "scheduler.lr_warmup_iters=2", "train.eval_iters=0", "logging.log_interval=1",
               f"logging.output_dir={out}", "logging.tensorboard=false",
               "logging.progress_bar=false", "checkpoint.save=null",
               "checkpoint.save_interval=null", "checkpoint.load=null"]
        subprocess.run(cmd, check=True, cwd=work, timeout=1200)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["tokens_per_s"] for r in rows if r.get("step", 0) >= 4)

    one = run(1)
    table.add("speed", "llama-1b-bf16", "1 GPU", "tokens/s", round(one))
    if world > 1:
        many = run(world)
        table.add("speed", "llama-1b-bf16", f"DP={world}", "tokens/s", round(many))
        table.add("speed", "llama-1b-bf16", f"DP={world}", "scaling efficiency",
                  round(many / (world * one), 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mbridge-multi-gpu"))
    p.add_argument("--cpu", action="store_true", help="run on CPU over gloo (tiny models)")
    p.add_argument("--parts", default="convert,train,speed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    world = torch.cuda.device_count() if gpu else 2
    if gpu and world < 2:
        raise SystemExit(f"{world} GPU visible: this needs 2 or more (or --cpu)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    table = Table()
    device = f"{world} x {torch.cuda.get_device_name()}" if gpu else "CPU, gloo, 2 processes"
    print(f"multi-device validation on {device}, torch {torch.__version__}", flush=True)
    t = time.perf_counter()
    if "convert" in parts:
        convert_tiny(args.workdir / "tiny", world, table)
        convert_bf16(args.workdir / "bf16", world, gpu, table)
    if "train" in parts:
        train_layouts(args.workdir / "train", table)
    if "speed" in parts and gpu:
        speed(args.workdir, world, table)
    print(f"\n{device}, {time.perf_counter() - t:.0f}s\n\n{table.markdown()}")
    failed = [r for r in table.rows if r["ok"] is False]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(failed)} of "
          f"{sum(r['ok'] is not None for r in table.rows)} checks failed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=device, rows=table.rows), indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
