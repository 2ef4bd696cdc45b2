"""Launched by tests/adapters/test_peft.py under torchrun: for every case of a manifest,
provide the HF model at a layout, then check against Hugging Face peft on every rank:

- with the case's hook (``peft_cases.HOOKS``): logits equal peft's with the adapter the
  TP=1 model exported (every layout draws the same adapter), then with a perturbed adapter
  loaded by ``load_hf_adapter``; re-export bit for bit; merged logits equal unmerged; the
  merged HF export (rank 0) gives peft's logits in transformers, both run in float64: the
  export holds the merge rounded once to fp32, and an fp32 forward of merged weights lies
  up to 1.0e-5 from the float64 logits by itself (a DoRA adapter peft made, at TP=2: export
  vs peft 1.18e-5 in fp32, 2.0e-6 in float64; its weights within 1.7e-7 relative of
  peft's float64 merge), so fp32 on both sides measured the forward's rounding, not the
  export;
- without a hook (``made_by_peft``): an adapter peft made loads and gives peft's logits, and
  re-exports bit for bit.

usage: peft_parity.py OUT_DIR MANIFEST_JSON
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_util import report
from models import hf_logits, peft_logits, sample_ids
from peft_cases import HOOKS, same_files

from mbridge import AutoBridge
from mbridge.shell import adapters, forward

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "vpp": "virtual_pipeline_model_parallel_size"}


def check(case: dict, out: Path) -> dict:
    base = Path(case["base"])
    bridge = AutoBridge.from_hf_pretrained(base)
    provider = bridge.to_megatron_provider()
    for item in case["layout"].split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    provider.finalize()
    hook = HOOKS[case["hook"]]() if case.get("hook") else None
    model = provider.provide_distributed_model(pre_wrap_hook=hook)
    ids = sample_ids(bridge.spec.vocab_size, seq=12)

    def logits():
        return forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                              bridge.spec.hidden_size)

    def diff(a, b):
        return (a - b).abs().max().item()

    layout = case["layout"].replace("=", "").replace(",", "_")
    tag = case.get("tag") or f"{base.name}-{case['hook']}-{layout}"
    result = dict(case=tag)
    if hook is not None:
        result["fresh"] = diff(logits(), peft_logits(base, Path(case["fresh"]), ids))
    adapter = Path(case["adapter"])
    model = bridge.load_hf_adapter(model, adapter)
    ref = peft_logits(base, adapter, ids)
    got = logits()
    result["loaded"] = diff(got, ref)
    bridge.save_hf_adapter(model, out / f"{tag}-export")
    result["exact"] = same_files(adapter, out / f"{tag}-export")
    with adapters.merged(model):
        result["merged"] = diff(logits(), got)
    result["unmerged_back"] = diff(logits(), got)
    bridge.save_hf_pretrained(model, out / f"{tag}-merged", merge_adapters=True)
    if dist.get_rank() == 0:
        result["merged_export"] = diff(hf_logits(out / f"{tag}-merged", ids, torch.float64),
                                       peft_logits(base, adapter, ids, torch.float64))
    return result


def main():
    out, manifest = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for case in manifest:
        report(**check(case, out))


if __name__ == "__main__":
    main()
