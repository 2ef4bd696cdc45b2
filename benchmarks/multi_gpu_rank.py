"""Launched by benchmarks/multi_gpu.py under torchrun: import one HF model at each layout in
the model's own dtype, compare its logits with reference logits computed once beforehand,
export it with ``save_hf_pretrained``, and time import and export (the GPU synchronised, all
ranks at a barrier). Prints one RESULT line per rank and layout (tests/dist_util.py).

usage: multi_gpu_rank.py OUT_DIR HF_DIR REF_LOGITS LAYOUT[;LAYOUT...]
LAYOUT is comma-separated provider settings ("tp=2", "pp=2", "tp=2,pp=2", "tp=1").
"""

import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from convert import same_tensors  # benchmarks/convert.py
from dist_util import report

from mbridge import AutoBridge
from mbridge.shell import forward

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "ep": "expert_model_parallel_size"}


def barrier_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter()


def check(layout: str, hf_dir: Path, ref: dict, out_root: Path) -> dict:
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    provider.params_dtype = ref["dtype"]
    for item in layout.split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    provider.finalize()
    t0 = barrier_time()
    model = provider.provide_distributed_model()
    t1 = barrier_time()
    spec = bridge.spec
    got = forward.logits(model, ref["ids"], provider.parallel_spec(), spec.vocab_size,
                         spec.hidden_size, dtype=getattr(torch, ref["dtype"]))
    diff = (got.float() - ref["logits"].float()).abs().max().item()
    out = out_root / f"export-{hf_dir.name}-{layout.replace(',', '_').replace('=', '')}"
    t2 = barrier_time()
    bridge.save_hf_pretrained(model, out)
    t3 = barrier_time()
    exact = same_tensors(hf_dir, out) if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        shutil.rmtree(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(layout=layout, model=hf_dir.name, logits_diff=diff,
                ref_max=ref["logits"].float().abs().max().item(), exact=exact,
                import_s=round(t1 - t0, 3), export_s=round(t3 - t2, 3))


def main() -> None:
    out_root, hf_dir, ref_path, layouts = (Path(sys.argv[1]), Path(sys.argv[2]),
                                           Path(sys.argv[3]), sys.argv[4].split(";"))
    ref = torch.load(ref_path)
    for layout in layouts:
        report(**check(layout, hf_dir, ref, out_root))


if __name__ == "__main__":
    main()
