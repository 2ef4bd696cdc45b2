"""Launched by tests/moe under torchrun: for every (layout, model dir) pair, import the HF
MoE model into Megatron-Core at that layout, compare logits with HF, export back with
``save_hf_pretrained`` and compare every tensor with the expected checkpoint, and record
which experts this rank read from disk. Prints one RESULT line per rank and pair.

usage: moe_parity.py OUT_DIR JOB [-- JOB ...]
JOB is LAYOUT[;LAYOUT...] MODEL_DIR[@EXPECTED_DIR] [...]; LAYOUT is comma-separated provider
settings, e.g. "ep=2" or "tp=2,etp=2" or "pp=2,ep=2".
EXPECTED_DIR (default MODEL_DIR) holds the HF model whose logits and tensors the import must
reproduce bit for bit: a model given with stacked experts exports the per-expert form
``save_pretrained`` writes. MODEL_DIR may also be a distributed checkpoint (``mbridge
convert import`` wrote it): it is loaded with ``AutoBridge.from_mcore_checkpoint``, and the
loaded model is saved again with Megatron-Core's own ``dist_checkpointing.save`` to
OUT_DIR/megatron-<name>-<layout> for the test to export.
"""

import re
import sys
from pathlib import Path

import torch
from dist_util import report
from models import hf_logits, sample_ids
from safetensors.torch import load_file

from mbridge import AutoBridge
from mbridge.keys import split_index
from mbridge.sharding.plan import layer_placement
from mbridge.shell import forward
from mbridge.shell.model import groups_of

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size",
         "vpp": "virtual_pipeline_model_parallel_size"}
EXPERT = re.compile(r"experts\.(\d+)\.|experts\.\w+\[(\d+)\]")


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def record_reads(ckpt) -> set:
    """Wrap the checkpoint's readers; returns the set the names read are added to."""
    seen = set()
    read, read_slices = ckpt.read, ckpt.read_slices

    def logged_read(key):
        seen.add(key)
        return read(key)

    def logged_slices(key, dim, ranges, pad=0):
        seen.update(f"{key}[{lo}]" for lo, hi in ranges if dim == 0 and hi - lo == 1)
        seen.add(key)
        return read_slices(key, dim, ranges, pad)

    ckpt.read, ckpt.read_slices = logged_read, logged_slices
    return seen


def experts_read(seen: set, layer: int) -> list[int]:
    """Indices of the experts of ``layer`` whose tensors this rank read."""
    out = set()
    for key in seen:
        if key.startswith(f"model.layers.{layer}.") and (m := EXPERT.search(key)):
            out.add(int(m.group(1) or m.group(2)))
    return sorted(out)


def megatron_save(model, directory: Path) -> None:
    """Save as training does: the model's sharded state dict under "model"."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model[0].sharded_state_dict()}, str(directory))


def check(layout: str, model_dir: Path, expected_dir: Path, out_root: Path) -> dict:
    mcore = (model_dir / "mbridge.json").is_file()
    bridge = (AutoBridge.from_mcore_checkpoint(model_dir) if mcore
              else AutoBridge.from_hf_pretrained(model_dir))
    provider = bridge.to_megatron_provider()
    for item in layout.split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    base = dict(layout=layout, model=model_dir.name)
    try:
        provider.finalize()
    except ValueError as e:  # the layout cannot host the model: report the message
        return dict(base, error=str(e))
    seen = set() if mcore else record_reads(bridge.checkpoint)
    model = provider.provide_distributed_model()
    for chunk in model:
        chunk.eval()  # Megatron's MoE refuses TP without sequence parallel only in training
    spec = bridge.spec
    ids = sample_ids(spec.vocab_size, seq=12)
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size, spec.hidden_size)
    diff = (got - hf_logits(expected_dir, ids)).abs().max().item()
    tag = f"{model_dir.name}-{layout.replace(',', '_').replace('=', '')}"
    if mcore and provider.pipeline_model_parallel_size == 1:
        megatron_save(model, out_root / f"megatron-{tag}")
    out_dir = out_root / tag
    bridge.save_hf_pretrained(model, out_dir, shard_size="200KB")
    src, dst = tensors(expected_dir), tensors(out_dir)
    exact = src.keys() == dst.keys() and all(
        torch.equal(src[k], dst[k]) and src[k].dtype == dst[k].dtype for k in src)
    stages = layer_placement(spec.num_layers, provider.parallel_spec())
    rank = groups_of(model).rank
    moe_layer = next(i for i in range(spec.num_layers)
                     if spec.moe.is_moe_layer(i) and stages[i][0] == rank.pp)
    stacked = any(split_index(k)[1] is not None for k in seen)
    return dict(base, logits_diff=diff, exact=exact, n_tensors=len(src),
                experts_read=experts_read(seen, moe_layer), stacked_reads=stacked,
                ep_rank=rank.ep, pp_rank=rank.pp, moe_layer=moe_layer)


def main():
    out_root, args = Path(sys.argv[1]), " ".join(sys.argv[2:])
    for job in args.split(" -- "):
        layouts, *dirs = job.split()
        for layout in layouts.split(";"):
            for item in dirs:
                model_dir, _, expected = item.partition("@")
                report(**check(layout, Path(model_dir), Path(expected or model_dir), out_root))


if __name__ == "__main__":
    main()
