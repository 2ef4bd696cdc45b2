"""Launched by tests under torchrun: for every (layout, model dir) pair, import the HF model
into Megatron-Core at that layout, compare logits with HF, export back with
``save_hf_pretrained`` and compare every tensor with the input; rank 0 also reloads the
export with ``from_pretrained``. Prints one RESULT line per rank and pair.

usage: parity.py OUT_DIR LAYOUT[;LAYOUT...] MODEL_DIR [MODEL_DIR...]
LAYOUT is comma-separated provider settings, e.g. "tp=2" or "pp=2,vpp=2" or "pp=2,first=1".
"""

import sys
from pathlib import Path

import torch
from dist_util import report
from models import hf_logits, sample_ids
from safetensors.torch import load_file

from mbridge import AutoBridge
from mbridge.shell import forward

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "vpp": "virtual_pipeline_model_parallel_size",
         "first": "num_layers_in_first_pipeline_stage", "last": "num_layers_in_last_pipeline_stage"}


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check(layout: str, model_dir: Path, out_root: Path) -> dict:
    import torch.distributed as dist

    bridge = AutoBridge.from_hf_pretrained(model_dir)
    provider = bridge.to_megatron_provider()
    for item in layout.split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    try:
        provider.finalize()
    except ValueError as e:  # the layout cannot host the model: report the message
        return dict(layout=layout, model=model_dir.name, error=str(e))
    model = provider.provide_distributed_model()
    spec = bridge.spec
    ids = sample_ids(spec.vocab_size, seq=12)
    ref = hf_logits(model_dir, ids)
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size, spec.hidden_size)
    out_dir = out_root / f"{model_dir.name}-{layout.replace(',', '_').replace('=', '')}"
    bridge.save_hf_pretrained(model, out_dir, shard_size="40KB")
    src, dst = tensors(model_dir), tensors(out_dir)
    exact = src.keys() == dst.keys() and all(
        torch.equal(src[k], dst[k]) and src[k].dtype == dst[k].dtype for k in src)
    reload_diff = None
    if dist.get_rank() == 0:
        reload_diff = (hf_logits(out_dir, ids) - ref).abs().max().item()
    return dict(layout=layout, model=model_dir.name, logits_diff=(got - ref).abs().max().item(),
                exact=exact, n_tensors=len(src), reload_diff=reload_diff,
                sharded=(out_dir / "model.safetensors.index.json").is_file())


def main():
    out_root, layouts, dirs = Path(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3:]
    for layout in layouts:
        for d in dirs:
            report(**check(layout, Path(d), out_root))


if __name__ == "__main__":
    main()
