"""Launched by tests/adapters/test_peft_moe.py under torchrun: adapters on the experts of a
tiny Qwen3-MoE at expert-parallel layouts, against Hugging Face peft (``peft_moe.py``).

A manifest entry is one of:

- a hook case (``peft_cases.HOOKS``) at a layout: logits equal peft's with the adapter the
  EP=1 model exported (every layout draws the same adapter), then with a perturbed adapter
  loaded by ``load_hf_adapter``; re-export bit for bit; merged logits equal unmerged;
- an adapter peft made (no hook): it loads, gives peft's logits, re-exports bit for bit;
- ``grads``: one backward of a fixed loss at each of ``layouts``, every adapter's gradient
  summed over its data-parallel group as DDP does (the expert data-parallel group for
  experts), then gathered to full tensors by the adapter export: the layouts' gradients
  must agree (Megatron-Bridge #5634: expert LoRA gradients wrong at expert-TP > 1).

usage: peft_moe_parity.py OUT_DIR MANIFEST_JSON
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_util import report
from models import sample_ids
from peft_cases import HOOKS, same_files
from peft_moe import unfused_peft_logits

from mbridge import AutoBridge
from mbridge.shell import adapters, forward
from mbridge.shell.model import groups_of, unwrap

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size"}


def provide(base: Path, layout: str, hook=None, **extra):
    bridge = AutoBridge.from_hf_pretrained(base)
    provider = bridge.to_megatron_provider()
    for item in filter(None, layout.split(",")):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    provider.extra_config = extra  # TransformerConfig settings
    provider.finalize()
    return bridge, provider, provider.provide_distributed_model(pre_wrap_hook=hook)


def diff(a, b) -> float:
    return (a - b).abs().max().item()


def check(case: dict, out: Path) -> dict:
    base = Path(case["base"])
    hook = HOOKS[case["hook"]]() if case.get("hook") else None
    bridge, provider, model = provide(base, case["layout"], hook)
    ids = sample_ids(bridge.spec.vocab_size, seq=12)

    def logits():
        return forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                              bridge.spec.hidden_size)

    result = dict(case=case["tag"])
    if hook is not None:
        result["fresh"] = diff(logits(), unfused_peft_logits(base, Path(case["fresh"]), ids))
    adapter = Path(case["adapter"])
    model = bridge.load_hf_adapter(model, adapter)
    got = logits()
    result["loaded"] = diff(got, unfused_peft_logits(base, adapter, ids))
    result["scale"] = got.abs().max().item()
    bridge.save_hf_adapter(model, out / f"{case['tag']}-export")
    result["exact"] = same_files(adapter, out / f"{case['tag']}-export")
    with adapters.merged(model):
        result["merged"] = diff(logits(), got)
    return result


def adapter_grads(base: Path, layout: str, hook: str) -> dict[str, torch.Tensor]:
    """Full (gathered) adapter gradients of one backward of a fixed loss (every rank feeds
    the same tokens), summed over each parameter's data-parallel group; peft names."""
    # no load-balancing loss: its gradient (through the router into earlier layers)
    # depends on how the layout splits the token statistics, not on the adapters
    bridge, provider, model = provide(base, layout, HOOKS[hook](), moe_aux_loss_coeff=0.0)
    chunk = unwrap(model)[0]
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    out = chunk(ids, pos, attention_mask=None)[..., :bridge.spec.vocab_size].float()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    groups = groups_of(model)
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            if not p.requires_grad:
                continue
            assert ".adapter." in name, name
            group = groups.dp if getattr(p, "allreduce", True) else groups.collection.expt_dp
            grad = p.grad.clone()
            dist.all_reduce(grad, group=group)
            p.copy_(grad)  # the export below gathers gradients as it gathers adapters
    spec = adapters.spec_of(model)
    return dict(adapters.iter_adapter(model, spec, bridge.spec))


def grads(case: dict) -> dict:
    trees = {layout: adapter_grads(Path(case["base"]), layout, case["hook"])
             for layout in case["layouts"]}
    first, *rest = trees.values()
    scale = max(t.abs().max().item() for t in first.values())
    experts = [k for k in first if ".experts." in k]
    worst = max(diff(first[k], t[k]) for t in rest for k in first)
    worst_expert = max(diff(first[k], t[k]) for t in rest for k in experts)
    return dict(case=case["tag"], keys=len(first), expert_keys=len(experts), scale=scale,
                same_keys=all(t.keys() == first.keys() for t in rest), worst=worst / scale,
                worst_expert=worst_expert / scale)


def main():
    out, manifest = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    for case in manifest:
        report(**(grads(case) if "layouts" in case else check(case, out)))


if __name__ == "__main__":
    main()
