"""Launched by tests/train/test_train_dist.py under torchrun (gloo, CPU): several short
trainings in one launch, each reporting its per-step losses (RESULT lines, one per rank and
run) and a digest of this rank's final weights.

usage: train_runs.py WORK_DIR HF_DIR RUN [RUN ...]
RUN is NAME:KEY=VALUE;KEY=VALUE (dotted run-config overrides applied to the base config of
the test: the tiny model, fp32, 10 steps); NAME is echoed back. A run named "*-export" also
writes the trained model through the online exporter to WORK_DIR/online-NAME (HF format),
for the test to compare with the offline export of its checkpoint.
"""

import hashlib
import sys
from pathlib import Path

import torch
from dist_util import report

from mbridge import AutoBridge
from mbridge.train import config, recipes
from mbridge.training import pretrain


def base(work: Path, hf_dir: str, name: str) -> config.RunConfig:
    cfg = recipes.tiny_llama_pretrain(hf_path=hf_dir)
    return config.apply_overrides(cfg, [
        "train.train_iters=10", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.eval_iters=0", "scheduler.lr_warmup_iters=2", "optimizer.lr=1.0e-2",
        "logging.log_interval=1", "logging.tensorboard=false", "logging.progress_bar=false",
        f"logging.output_dir={work}/logs-{name}"])


def digest(model) -> str:
    h = hashlib.sha256()
    for chunk in model:
        for name, p in sorted(chunk.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    work, hf_dir, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for run in runs:
        name, _, overrides = run.partition(":")
        cfg = config.apply_overrides(base(work, hf_dir, name),
                                     [o for o in overrides.split(";") if o])
        losses, grad_norms, skipped = [], [], []

        def on_step(m, losses=losses, grad_norms=grad_norms, skipped=skipped):
            losses.append(m.loss)
            grad_norms.append(m.grad_norm)
            skipped.append(m.skipped)

        state = pretrain(cfg, on_step=on_step)
        if name.endswith("-export"):
            bridge = AutoBridge.from_hf_pretrained(hf_dir)
            bridge.save_hf_pretrained(state.model, work / f"online-{name}")
        report(run=name, losses=losses, grad_norms=grad_norms, skipped=skipped, step=state.step,
               consumed=state.consumed_samples, digest=digest(state.model))


if __name__ == "__main__":
    main()
