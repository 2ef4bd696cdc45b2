"""Training logs, written by global rank 0 only: console lines, a progress bar, TensorBoard
event files, ``metrics.jsonl`` and W&B (when installed and ``logging.wandb_project`` is set).

Every ``logging.log_interval`` steps one console line and one ``metrics.jsonl`` object
(``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu",
"skipped", "consumed_samples"}``) give the means of loss and grad norm over the steps since
the previous line, and the throughput over their wall time (evaluation and checkpointing
excluded); each evaluation adds
``{"step", "val_loss"}``. MFU follows ``mbridge.train.flops`` (formula there). A run that
starts at step 0 starts a new ``metrics.jsonl`` (an earlier one moves to
``metrics.jsonl.N``); a resumed run appends to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mbridge.specs import ModelSpec
from mbridge.train import cadence, flops
from mbridge.train.config import ConfigError, RunConfig
from mbridge.train.step import Metrics


def check_wandb(cfg: RunConfig) -> None:
    """Fail before training if W&B is asked for but not installed."""
    if cfg.logging.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logging.wandb_project is set but wandb is not installed "
                              "(pip install wandb), or unset logging.wandb_project") from None


class TrainLogger:
    def __init__(self, cfg: RunConfig, spec: ModelSpec, *, rank: int, world_size: int,
                 start_step: int, device_name: str | None):
        self.cfg, self.active = cfg, rank == 0
        self.interval = cfg.logging.log_interval
        self.flops_per_token = flops.train_flops_per_token(spec, cfg.model.seq_length)
        self.peak = flops.peak_tflops(device_name, cfg.logging.peak_tflops)
        self.world_size = world_size
        self._pending: list[Metrics] = []
        self._seconds = 0.0
        self.tb = self.wandb = self.bar = None
        if not self.active:
            return
        out = Path(cfg.logging.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        moved = None if start_step else _move_aside(out / "metrics.jsonl")
        self.jsonl = (out / "metrics.jsonl").open("a")
        self._open_sinks(out, start_step)
        if moved is not None:
            self._print(f"{out / 'metrics.jsonl'}: a new run; the earlier run's metrics are in "
                        f"{moved}")

    def _open_sinks(self, out: Path, start_step: int) -> None:
        lg = self.cfg.logging
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(lg.tensorboard_dir or str(out / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: no event files (pip install tensorboard)",
                      file=sys.stderr)
        if lg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name,
                                    entity=lg.wandb_entity, config=self.cfg.to_dict(),
                                    dir=str(out), resume="allow")
        if lg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.cfg.train.train_iters, initial=start_step, unit="step",
                            dynamic_ncols=True)

    def step(self, m: Metrics, seconds: float, *, last: bool = False) -> None:
        """Record one step's metrics and wall time; every ``log_interval`` steps write them."""
        if not self.active:
            return
        self._pending.append(m)
        self._seconds += seconds
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m.loss:.4f}", lr=f"{m.lr:.2e}")
        if m.skipped:
            self._print(f"step {m.step}: skipped the update: {m.skip_reason}")
        if cadence.should_log(m.step, self.interval, last=last):
            self._flush()

    def _flush(self) -> None:
        ms, self._pending = self._pending, []
        rate = flops.throughput(sum(m.tokens for m in ms), self._seconds,
                                self.flops_per_token, self.world_size, self.peak)
        self._seconds = 0.0
        applied = [m for m in ms if not m.skipped] or ms
        last = ms[-1]
        record = {"step": last.step, "loss": _mean(m.loss for m in applied), "lr": last.lr,
                  "grad_norm": _mean(m.grad_norm for m in applied),
                  "tokens_per_s": rate.tokens_per_s, "tflops_per_device": rate.tflops_per_device,
                  "mfu": rate.mfu, "skipped": sum(m.skipped for m in ms),
                  "consumed_samples": last.consumed_samples}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        mfu = "n/a" if rate.mfu is None else f"{100 * rate.mfu:.1f}%"
        self._print(f"step {last.step}/{self.cfg.train.train_iters} | loss {record['loss']:.4f} "
                    f"| lr {last.lr:.3e} | grad_norm {record['grad_norm']:.3f} | tokens/s "
                    f"{rate.tokens_per_s:,.0f} | TFLOP/s/device {rate.tflops_per_device:.3f} "
                    f"| MFU {mfu} | skipped {record['skipped']}")
        self._scalars(last.step, {"train/loss": record["loss"], "train/lr": last.lr,
                                  "train/grad_norm": record["grad_norm"],
                                  "train/tokens_per_s": rate.tokens_per_s,
                                  "train/tflops_per_device": rate.tflops_per_device})

    def evaluation(self, step: int, loss: float) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, "val_loss": loss}) + "\n")
        self.jsonl.flush()
        self._print(f"step {step} | validation loss {loss:.4f}")
        self._scalars(step, {"val/loss": loss})

    def note(self, text: str) -> None:
        if self.active:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if not self.active:
            return
        if self._pending:
            self._flush()
        for sink in (self.bar, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def _move_aside(path: Path) -> Path | None:
    """A run starting at step 0 starts a new ``metrics.jsonl`` (a resumed one appends): an
    earlier run's non-empty file moves to ``metrics.jsonl.N``, the first free N, instead of
    mixing two runs' steps in one file. Returns where it went."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    path.rename(target)
    return target


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
