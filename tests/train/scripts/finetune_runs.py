"""Launched by tests/train/test_finetune.py under torchrun (gloo, CPU): several short
fine-tuning runs of the ``tiny_llama_finetune`` recipe in one launch, each reporting its
per-step losses, its validation losses (from metrics.jsonl) and a digest of this rank's final
weights (RESULT lines, one per rank and run).

usage: finetune_runs.py WORK_DIR PRETRAINED DATA_ROOT RUN [RUN ...]
RUN is NAME:KEY=VALUE;KEY=VALUE (dotted overrides of the recipe); NAME is echoed back. A run
named "custom*" passes a dataset provider and a forward step whose loss is doubled.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_util import report
from train_runs import digest

from mbridge.train import config, recipes
from mbridge.training import finetune

PROVIDED = []


def provider(context):
    """A dataset provider: the built-in SFT datasets, remembering it was asked."""
    from mbridge.shell.sft import build_datasets

    PROVIDED.append(str(context.tokenizer_dir))
    return build_datasets(context)


def doubled_forward_step(data_iterator, model):
    """A custom forward step whose loss is twice the token cross entropy."""
    mb = next(data_iterator)
    output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])

    def loss_func(out):
        mask = mb["loss_mask"].reshape(-1).float()
        total = 2 * torch.sum(out.float().reshape(-1) * mask)
        return total, mask.sum().to(torch.int), {"lm loss": torch.stack(
            [total.detach(), mask.sum().detach()])}

    return output, loss_func


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
        custom = name.startswith("custom")
        state = finetune(cfg, on_step=lambda m, losses=losses: losses.append(m.loss),
                         dataset_provider=provider if custom else None,
                         forward_step=doubled_forward_step if custom else None)
        dist.barrier()
        metrics = [json.loads(x) for x in (logs / "metrics.jsonl").open()]
        report(run=name, losses=losses, step=state.step, digest=digest(state.model),
               provided=list(PROVIDED),
               val=[(x["step"], x["val_loss"]) for x in metrics if "val_loss" in x])


if __name__ == "__main__":
    main()
