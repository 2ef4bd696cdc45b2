"""Offline conversion benchmark (not in CI): speed and peak memory of ``mbridge convert``
against the floor of reading and writing the same bytes with safetensors, in one run.

A synthetic bf16 Llama is written directly as random safetensors shards (<= 5 GB each, with
an index json; no HF model is instantiated), then each phase runs in a fresh process, whose
wall time and peak RSS (``ru_maxrss``: anonymous and file-backed pages alike) are measured;
floor, import, export (and online) run ``--rounds`` times, interleaved, and the report gives
every wall time, the ratios of the best and of the median times to the floor's, and the
largest peak RSS (the machine is shared and disk-bound, so single timings are noisy):

  floor    read every tensor with safetensors (``safe_open``/``get_tensor``) and write it
           back with safetensors (``save_file``, one file per input shard)
  import   ``mbridge convert import --hf SRC --out MCORE``
  export   ``mbridge convert export --mcore MCORE --out HF``
  online   the model-instantiating path: ``AutoBridge.from_hf_pretrained`` -> provider
           (bf16, TP=1) -> ``provide_distributed_model`` -> ``save_hf_pretrained``; run only
           when the bf16 model plus the writer's 5 GB shard buffer fits in RAM

The first round's export (and online output) is compared with the input tensor by tensor
(torch.equal, dtype, key set).

``--gpu`` measures the online path on one GPU instead, in one process, each step timed with
the GPU synchronised (the source is read once first, so every step sees a warm page cache):

  floor    safetensors ``safe_open(device="cuda")`` of every tensor, then ``save_file`` back
  hf       transformers ``from_pretrained(dtype=bfloat16, device_map="cuda")`` + ``save_pretrained``
  import   ``AutoBridge.from_hf_pretrained`` -> provider (bf16) -> ``provide_distributed_model``
  stream   ``export_hf_weights(model, cpu=False)``: every HF tensor on the GPU (RL weight sync)
  export   ``save_hf_pretrained`` (tensors to host, sharded safetensors, atomic)
Outputs are deleted as soon as they are measured (8B bf16 is 16 GB per copy; peak disk use
is three copies). The RSS bound checked: 2 GiB + 3 x the largest tensor.

    python benchmarks/convert.py --size 1b --workdir /work/bench
    python benchmarks/convert.py --size 8b --workdir /work/bench
    python benchmarks/convert.py --size 1b --workdir /tmp/bench --gpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # Llama-3.2-1B and Llama-3-8B shapes
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=False),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512,  # smoke runs
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False),
}
GiB = 2**30


def hf_config(size: str) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                rms_norm_eps=1e-5, max_position_embeddings=8192, dtype="bfloat16",
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192),
                **SIZES[size])


def hf_entries(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in HF's own order."""
    h, ffn, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (ffn, h)), (p + "mlp.up_proj.weight", (ffn, h)),
                (p + "mlp.down_proj.weight", (h, ffn))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def generate(size: str, directory: Path) -> tuple[int, int]:
    """Random bf16 shards + index + config; returns (total bytes, largest tensor bytes).
    Values tile a 64M-element random pool from random offsets (fast, and bit-exact checks
    still catch any misplaced row)."""
    import json

    from mbridge.io.hf_stream import HFStreamWriter

    cfg = hf_config(size)
    entries = [(k, s, torch.bfloat16) for k, s in hf_entries(cfg)]
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(2**26, generator=gen).to(torch.bfloat16)
    directory.mkdir(parents=True)
    writer = HFStreamWriter(directory, entries, 5 * 10**9)
    for name, shape, _ in entries:
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        reps = (start + n) // pool.numel() + 1
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
        writer.add(name, flat.reshape(shape).clone())
    writer.finish()
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    largest = max(torch.Size(s).numel() * 2 for _, s, _ in entries)
    return writer.total_bytes, largest


def floor(src: Path, dst: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
        del tensors
    for name in ("config.json", "model.safetensors.index.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def online(src: Path, dst: Path) -> None:
    from mbridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(src)
    provider = bridge.to_megatron_provider()
    provider.params_dtype = "bfloat16"
    model = provider.finalize().provide_distributed_model()
    bridge.save_hf_pretrained(model, dst)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS GiB) of that process."""
    os.sync()  # start each phase with no dirty pages left by the previous one
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"phase failed: {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024 / GiB


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def index(d):
        return {k: f for f in sorted(d.glob("*.safetensors"))
                for k in safe_open(f, framework="pt").keys()}

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for key in ia:
        with safe_open(ia[key], framework="pt") as fa, safe_open(ib[key], framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench"))
    parser.add_argument("--online", choices=("auto", "yes", "no"), default="auto",
                        help="run the model-instantiating path (auto: if it fits in RAM)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="floor/import/export rounds, interleaved (default 3)")
    parser.add_argument("--gpu", action="store_true",
                        help="time import into / export from a live model on one GPU instead")
    parser.add_argument("--json", type=Path, default=None, help="--gpu: also write results here")
    parser.add_argument("--warm-imports", action="store_true",
                        help="--gpu: import Megatron-Core and mbridge's shell before any timer "
                             "(transformers is imported before its timer either way), and "
                             "time mbridge's import a second time in the same process")
    parser.add_argument("--profile-import", action="store_true",
                        help="--gpu: also print where mbridge's import spends its time (cProfile)")
    parser.add_argument("--phase", nargs=3, metavar=("NAME", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        name, src, dst = args.phase
        {"floor": floor, "online": online}[name](Path(src), Path(dst))
        return
    gpu_run(args) if args.gpu else run(args)


def gpu_run(args) -> None:
    """Import into and export from a live Megatron-Core model on one GPU, against safetensors
    and transformers doing the same in the same run."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mbridge import AutoBridge

    if args.warm_imports:  # what transformers' timer gets for free: its modules already loaded
        import megatron.core.models.gpt  # noqa: F401
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401

        import mbridge.shell.convert  # noqa: F401
        import mbridge.shell.model  # noqa: F401
    work = args.workdir / f"convert-gpu-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "hf"
    total, _ = generate(args.size, src)
    floor(src, work / "warm")  # one read of everything: the page cache is warm for all steps
    shutil.rmtree(work / "warm")
    times: dict[str, float] = {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the steps
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None

    @contextlib.contextmanager
    def timed(name):
        sync()
        start = time.perf_counter()
        yield
        sync()
        times[name] = round(time.perf_counter() - start, 3)
        print(f"{name}: {times[name]:.2f}s", flush=True)

    with timed("floor_read"):
        tensors = {}
        for f in sorted(src.glob("*.safetensors")):
            with safe_open(f, framework="pt", device=dev) as handle:
                tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    (work / "floor").mkdir()
    with timed("floor_write"):
        save_file({k: v.cpu() for k, v in tensors.items()}, work / "floor" / "model.safetensors")
    del tensors
    shutil.rmtree(work / "floor")
    with timed("hf_read"):
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16,
                                                  device_map=dev if dev == "cuda" else None)
    with timed("hf_write"):
        hf.save_pretrained(work / "hf_out")
    del hf
    shutil.rmtree(work / "hf_out")
    torch.cuda.empty_cache()
    import cProfile

    prof = cProfile.Profile() if args.profile_import else None
    with timed("mbridge_import"):
        prof and prof.enable()
        bridge = AutoBridge.from_hf_pretrained(src)
        provider = bridge.to_megatron_provider()
        provider.params_dtype = "bfloat16"
        model = provider.finalize().provide_distributed_model()
        torch.cuda.synchronize()
        prof and prof.disable()
    if prof:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    if args.warm_imports:  # the same again, everything loaded and the groups started
        del model
        torch.cuda.empty_cache()
        with timed("mbridge_import_again"):
            bridge = AutoBridge.from_hf_pretrained(src)
            provider = bridge.to_megatron_provider()
            provider.params_dtype = "bfloat16"
            model = provider.finalize().provide_distributed_model()
    with timed("mbridge_stream"):
        n = sum(t.numel() for _, t in bridge.export_hf_weights(model, cpu=False))
    with timed("mbridge_export"):
        bridge.save_hf_pretrained(model, work / "out")
    exact = same_tensors(src, work / "out")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = dict(size=args.size, gib=round(total / GiB, 2), device=name,
                  torch=torch.__version__, elements=n, exact=exact, seconds=times,
                  import_over_floor_read=round(times["mbridge_import"] / times["floor_read"], 2),
                  import_over_hf_read=round(times["mbridge_import"] / times["hf_read"], 2),
                  import_again_over_hf_read=round(
                      times.get("mbridge_import_again", float("nan")) / times["hf_read"], 2),
                  export_over_floor_write=round(times["mbridge_export"] / times["floor_write"], 2),
                  export_over_hf_write=round(times["mbridge_export"] / times["hf_write"], 2))
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work)


def run(args) -> None:
    import psutil

    work = args.workdir / f"convert-{args.size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "hf"
    t = time.perf_counter()
    total, largest = generate(args.size, src)
    print(f"generated {total / GiB:.2f} GiB in {time.perf_counter() - t:.0f}s; largest tensor "
          f"{largest / GiB:.2f} GiB", flush=True)
    free = shutil.disk_usage(work).free
    if free < 2.2 * total:
        raise SystemExit(f"need about {2.2 * total / GiB:.0f} GiB free in {work}, have "
                         f"{free / GiB:.0f} GiB")
    py, cli = [sys.executable, __file__, "--phase"], [sys.executable, "-m", "mbridge", "convert"]
    mc, out = work / "mcore", work / "out"
    ram = psutil.virtual_memory().total
    fits = total + 5 * 10**9 + 4 * GiB < ram
    with_online = args.online == "yes" or (args.online == "auto" and fits)
    rows: dict[str, list] = {"floor": [], "import": [], "export": []}
    if with_online:
        rows["online"] = []
    exact = True
    for k in range(args.rounds):  # interleaved, so load from other tenants hits all phases
        rows["floor"].append(measure([*py, "floor", str(src), str(out)]))
        shutil.rmtree(out)
        rows["import"].append(measure([*cli, "import", "--hf", str(src), "--out", str(mc),
                                       "--quiet"]))
        rows["export"].append(measure([*cli, "export", "--mcore", str(mc), "--out", str(out),
                                       "--quiet"]))
        if k == 0:  # reading both copies again takes as long as a phase
            exact = same_tensors(src, out)
        shutil.rmtree(out)
        shutil.rmtree(mc)
        if with_online:
            rows["online"].append(measure([*py, "online", str(src), str(out)]))
            if k == 0:
                exact = exact and same_tensors(src, out)
            shutil.rmtree(out)
    shutil.rmtree(work)
    report(args, rows, total, largest, exact, ram, fits)


def report(args, rows, total, largest, exact, ram, fits) -> None:
    bound = (2 * GiB + 3 * largest) / GiB
    best = {name: min(s for s, _ in runs) for name, runs in rows.items()}
    median = {name: statistics.median(s for s, _ in runs) for name, runs in rows.items()}
    print(f"\n## {args.size}: {total / GiB:.2f} GiB bf16, largest tensor {largest / GiB:.2f} GiB")
    print(f"{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{ram / GiB:.0f} GiB RAM, torch {torch.__version__}, python {platform.python_version()}")
    print(f"command: python benchmarks/convert.py --size {args.size} --workdir {args.workdir} "
          f"--rounds {args.rounds} --online {args.online}\n")
    print("| phase | runs: wall s | best / floor | median / floor | GiB/s (best) "
          "| peak RSS GiB (max) | RSS bound GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        check = f"{bound:.2f}" if name in ("import", "export") else ""
        walls = ", ".join(f"{s:.1f}" for s, _ in runs)
        print(f"| {name} | {walls} | {best[name] / best['floor']:.2f} "
              f"| {median[name] / median['floor']:.2f} | {total / GiB / best[name]:.2f} "
              f"| {max(r for _, r in runs):.2f} | {check} |")
    print(f"\nexport{' and online output' if 'online' in rows else ''} identical to the input "
          f"(torch.equal, dtype, keys), first round: {exact}")
    if "online" not in rows:
        print(f"online path skipped: the bf16 model ({total / GiB:.1f} GiB) plus the writer's "
              f"5 GB shard buffer does not fit in {ram / GiB:.0f} GiB of RAM" if not fits else
              "online path skipped (--online no)")


if __name__ == "__main__":
    main()
