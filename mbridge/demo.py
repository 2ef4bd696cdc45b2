"""``mbridge demo``: the main job on a built-in example, end to end on CPU.

1. Creates a small random HF Llama (GQA, llama3 rope scaling, untied embeddings) with
   ``transformers`` and saves it to ``WORKDIR/hf``.
2. Launches two real processes (``torchrun --nproc-per-node 2``, gloo) that import it into
   Megatron-Core at TP=2 with ``AutoBridge``, compare the logits with the HF model, and export
   back to ``WORKDIR/exported`` with ``save_hf_pretrained``.
3. Checks every exported tensor is identical to the input and prints a report.

Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the HF model (WORKDIR/hf) and the export "
                             "(WORKDIR/exported), kept and replaced on a rerun (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size (default 2)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")


def make_model(directory: Path, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=256))
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def run(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="mbridge-demo-") as workdir:
        return _run(args, Path(workdir))


def _run(args: argparse.Namespace, workdir: Path) -> int:
    hf_dir, out_dir = workdir / "hf", workdir / "exported"
    print(f"[1/3] creating a random HF Llama in {hf_dir}", flush=True)
    make_model(hf_dir, args.layers)
    print(f"[2/3] importing into Megatron-Core at TP={args.tp} on {args.tp} CPU processes, "
          "comparing logits, exporting", flush=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tp}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "mbridge.demo",
           "--worker", str(hf_dir), str(out_dir), str(args.tp)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)
        print("FAILED: the Megatron-Core processes exited with an error", file=sys.stderr)
        return 1
    result = json.loads(next(line for line in proc.stdout.splitlines()
                             if line.startswith("{")))
    elapsed = time.perf_counter() - start
    print("[3/3] comparing exported tensors with the input", flush=True)
    same, total = _compare_dirs(hf_dir, out_dir)
    ok_logits = result["logits_max_abs_diff"] < TOLERANCE
    ok = ok_logits and same == total
    print("\nmbridge demo report")
    print(f"  model            LlamaForCausalLM, {result['parameters']:,} parameters, "
          f"{args.layers} layers, GQA 8/2, llama3 rope")
    print(f"  layout           TP={args.tp} (Megatron-Core, gloo, {args.tp} processes)")
    print(f"  logits max |diff| {result['logits_max_abs_diff']:.3e} "
          f"(tolerance {TOLERANCE:g}) {'PASS' if ok_logits else 'FAIL'}")
    print(f"  round trip       {same}/{total} tensors identical "
          f"{'PASS' if same == total else 'FAIL'}")
    print(f"  exported to      {out_dir}" if args.workdir is not None else
          "  exported to      a temporary directory, removed (keep it: --workdir DIR)")
    print(f"  wall time        {elapsed:.1f}s for import + forward + export")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _compare_dirs(a: Path, b: Path) -> tuple[int, int]:
    import torch
    from safetensors.torch import load_file

    def load(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = load(a), load(b)
    same = sum(1 for k in ta
               if k in tb and ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]))
    return same, max(len(ta), len(tb))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(hf_dir: str, out_dir: str, tp: int) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mbridge import AutoBridge
    from mbridge.shell import forward

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    ids = torch.randint(0, bridge.spec.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(0))
    got = forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                         bridge.spec.hidden_size)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    diff = (got - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    bridge.save_hf_pretrained(model, out_dir, shard_size="1MB", overwrite=True)  # its own
    if dist.get_rank() == 0:
        print(json.dumps({"logits_max_abs_diff": diff.item(),
                          "parameters": sum(p.numel() for p in hf.parameters())}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
