"""Launched under torchrun on 4 ranks: two Megatron-Core models of one HF checkpoint, with
different parallel layouts, each on its own process groups (``dist.new_groups``), in one
process world; neither uses Megatron-Core's global ``parallel_state``. Each rank reports both
models' max |logit diff| against HF and whether each model's export equals the checkpoint.

usage: two_layouts.py MODEL_DIR LAYOUT_A LAYOUT_B   (layouts like "tp=2,pp=2" or "tp=1")
"""

import sys
from pathlib import Path

import torch
from dist_util import report
from models import hf_logits, sample_ids
from safetensors.torch import load_file

from mbridge import AutoBridge
from mbridge.shell import dist, forward
from mbridge.specs import ParallelSpec


def parse(layout: str) -> ParallelSpec:
    return ParallelSpec(**{k: int(v) for k, v in (i.split("=") for i in layout.split(","))})


def main():
    from megatron.core import parallel_state as ps

    model_dir, layouts = Path(sys.argv[1]), [parse(x) for x in sys.argv[2:]]
    dist.start()
    groups = [dist.new_groups(p) for p in layouts]  # every rank makes both, in order
    bridge = AutoBridge.from_hf_pretrained(model_dir)
    src = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    ref = hf_logits(model_dir, ids)
    models = []
    for parallel, g in zip(layouts, groups):
        provider = bridge.to_megatron_provider()
        provider.tensor_model_parallel_size = parallel.tp
        provider.pipeline_model_parallel_size = parallel.pp
        models.append((provider.finalize().provide_distributed_model(groups=g), parallel, g))
    out = dict(parallel_state_initialized=ps.model_parallel_is_initialized())
    for name, (model, parallel, g) in zip("ab", models):
        got = forward.logits(model, ids, parallel, bridge.spec.vocab_size,
                             bridge.spec.hidden_size, groups=g)
        exported = dict(bridge.export_hf_weights(model))
        out[name] = dict(layout=str(parallel.to_json(), "utf-8"), tp_rank=g.rank.tp,
                         pp_rank=g.rank.pp, dp_rank=g.dp_rank,
                         logits_diff=(got - ref).abs().max().item(),
                         exact=exported.keys() == src.keys()
                         and all(torch.equal(exported[k], src[k]) for k in src))
    report(**out)


if __name__ == "__main__":
    main()
