"""Launched by tests/train/test_train_peft.py under torchrun (gloo, CPU): LoRA/DoRA
fine-tuning runs of the tiny Llama (train_runs.py's base config plus a ``peft`` section),
each reporting its per-step losses, whether the base weights are still bit-identical to the
HF checkpoint, what the optimizer holds, and a digest of the adapters.

usage: peft_runs.py WORK_DIR HF_DIR RUN [RUN ...]   (RUN as in train_runs.py; a run named
"*-export" also writes its adapters to WORK_DIR/online-NAME and the merged model to
WORK_DIR/merged-NAME, for the test to compare with ``mbridge peft export/merge``)
"""

import hashlib
import sys
from pathlib import Path

import torch
from dist_util import report
from safetensors.torch import load_file
from train_runs import base

from mbridge import AutoBridge
from mbridge.shell import adapters
from mbridge.train import config
from mbridge.training import pretrain


def adapter_digest(model) -> str:
    """Of the full (gathered) adapter tensors: the same whatever the layout."""
    bridge_spec = adapters.spec_of(model)
    h = hashlib.sha256()
    for name, t in sorted(adapters.iter_adapter(model, bridge_spec, SPEC[0])):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


SPEC = []


def main() -> None:
    work, hf_dir, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    SPEC.append(bridge.spec)
    source = load_file(Path(hf_dir) / "model.safetensors")
    for run in runs:
        name, _, overrides = run.partition(":")
        cfg = config.apply_overrides(base(work, hf_dir, name),
                                     [o for o in overrides.split(";") if o])
        losses = []
        state = pretrain(cfg, on_step=lambda m, losses=losses: losses.append(m.loss))
        exported = dict(bridge.export_hf_weights(state.model))
        base_exact = exported.keys() == source.keys() and all(
            torch.equal(exported[k], source[k]) for k in source)
        chunks = [c.module for c in state.model]
        trainable = sorted(n for c in chunks for n, p in c.named_parameters() if p.requires_grad)
        held = sum(p.numel() for opt in getattr(state.optimizer, "chained_optimizers",
                                                [state.optimizer])
                   for p in opt.get_parameters())
        adapter_numel = sum(p.numel() for c in chunks for n, p in c.named_parameters()
                            if ".adapter." in n)
        b_nonzero = all(p.abs().sum() > 0 for c in chunks for n, p in c.named_parameters()
                        if "linear_out" in n)
        if name.endswith("-export"):  # the live model's adapters and merged weights
            bridge.save_hf_adapter(state.model, work / f"online-{name}")
            bridge.save_hf_pretrained(state.model, work / f"merged-{name}",
                                      merge_adapters=True)
        report(run=name, losses=losses, step=state.step, base_exact=base_exact,
               only_adapters=bool(trainable) and all(".adapter." in n for n in trainable),
               optimizer_numel=held, adapter_numel=adapter_numel, b_nonzero=b_nonzero,
               adapters=adapter_digest(state.model),
               adapter_bytes=adapter_numel * 4)


if __name__ == "__main__":
    main()
