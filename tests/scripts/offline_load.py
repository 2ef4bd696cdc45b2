"""Launched by tests/offline/test_offline_parity.py under torchrun (2 ranks, gloo): load
distributed checkpoints written by ``mbridge convert import`` at several layouts with
``AutoBridge.from_mcore_checkpoint`` and compare fp32 logits with the HF logits the test
saved; then save some of the loaded models with Megatron-Core's own
``dist_checkpointing.save`` (nested under "model", beside optimizer-like state), as training
would, for the test to export. Prints one RESULT line per rank, layout and model.

usage: offline_load.py WORK_DIR LAYOUT[;LAYOUT...] NAME [NAME...]
WORK_DIR holds refs.pt ({"ids", "refs": {name: logits}}) and one checkpoint dir per NAME;
LAYOUT is comma-separated provider settings, e.g. "tp=2" or "pp=2,vpp=2";
a layout marked "+save" also saves each model to WORK_DIR/megatron-<name>-<layout>/iter_0000007
(with latest_checkpointed_iteration.txt beside it, Megatron-LM's training layout).
"""

import dataclasses
import sys
from pathlib import Path

import torch
from dist_util import report

from mbridge import AutoBridge
from mbridge.shell import forward

NAMES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "vpp": "virtual_pipeline_model_parallel_size"}


def megatron_save(model, directory: Path) -> None:
    """What a training checkpoint looks like: the model's sharded state dict under "model"
    (one sub-dict per virtual chunk), optimizer-like tensors and plain values beside it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    chunks = [getattr(c, "module", c) for c in model]
    state = {f"model{v}" if len(chunks) > 1 else "model": c.sharded_state_dict()
             for v, c in enumerate(chunks)}
    optimizer = {}
    for sub in state.values():
        for name, item in sub.items():
            if isinstance(item, ShardedTensor) and name.endswith("word_embeddings.weight"):
                optimizer[name] = dataclasses.replace(
                    item, key="optimizer.state.exp_avg." + item.key,
                    data=torch.full_like(item.data, 0.5))
    state.update(optimizer=optimizer, iteration=7, checkpoint_version=3.0)
    (directory / "iter_0000007").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(directory / "iter_0000007"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:  # Megatron-LM's tracker, as training writes it
        (directory / "latest_checkpointed_iteration.txt").write_text("7")


def check(layout: str, name: str, work: Path, refs: dict) -> dict:
    settings, save = layout.split("+")[0], layout.endswith("+save")
    bridge = AutoBridge.from_mcore_checkpoint(work / name)
    provider = bridge.to_megatron_provider()
    for item in settings.split(","):
        key, value = item.split("=")
        setattr(provider, NAMES[key], int(value))
    try:
        provider.finalize()
    except ValueError as e:  # the layout cannot host the model: report the message
        return dict(layout=layout, model=name, error=str(e))
    model = provider.provide_distributed_model()
    spec = bridge.spec
    got = forward.logits(model, refs["ids"], provider.parallel_spec(), spec.vocab_size,
                         spec.hidden_size)
    if save:
        megatron_save(model, work / f"megatron-{name}-{settings.replace(',', '_')}")
    return dict(layout=layout, model=name,
                logits_diff=(got - refs["refs"][name]).abs().max().item())


def main():
    work, layouts, names = Path(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3:]
    refs = torch.load(work / "refs.pt")
    for layout in layouts:
        for name in names:
            report(**check(layout, name, work, refs))


if __name__ == "__main__":
    main()
