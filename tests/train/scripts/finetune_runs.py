"""Launched by tests/train/test_finetune.py under torchrun (gloo, CPU): several short
fine-tuning runs of the ``tiny_llama_finetune`` recipe in one launch, each reporting its
per-step losses, its validation losses (from metrics.jsonl) and a digest of this rank's final
weights (RESULT lines, one per rank and run).

usage: finetune_runs.py WORK_DIR PRETRAINED DATA_ROOT RUN [RUN ...]
RUN is NAME:KEY=VALUE;KEY=VALUE (dotted overrides of the recipe); NAME is echoed back.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from dist_util import report
from train_runs import digest

from mbridge.train import config, recipes
from mbridge.training import finetune


def main() -> None:
    work, pretrained, root, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    for run in runs:
        name, _, overrides = run.partition(":")
        logs = work / f"logs-{name}"
        cfg = config.apply_overrides(
            recipes.tiny_llama_finetune(pretrained_checkpoint=pretrained, dataset_root=root),
            ["train.train_iters=10", "logging.log_interval=1", "logging.tensorboard=false",
             "logging.progress_bar=false", f"logging.output_dir={logs}",
             "train.eval_interval=5", *[o for o in overrides.split(";") if o]])
        losses = []
        state = finetune(cfg, on_step=lambda m, losses=losses: losses.append(m.loss))
        dist.barrier()
        metrics = [json.loads(x) for x in (logs / "metrics.jsonl").open()]
        report(run=name, losses=losses, step=state.step, digest=digest(state.model),
               val=[(x["step"], x["val_loss"]) for x in metrics if "val_loss" in x])


if __name__ == "__main__":
    main()
