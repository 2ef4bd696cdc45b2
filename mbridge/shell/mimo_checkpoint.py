"""Training checkpoints of a MIMO run (modules at their own layouts: ``shell.mimo``): the
model as an HF directory, which loads at any layout, plus what an exact resume needs.

Layout, under ``checkpoint.save``::

    latest_checkpointed_iteration.txt    the newest complete step, written last
    iter_0000006/
        model-images.safetensors         each module gathered over its own groups and
        model-language.safetensors       written by its first rank (MimoRuntime.save_hf),
        model.safetensors.index.json     with config.json and the processor files
        mimo_state/progress.json         step, consumed samples, ...; the finalized layout
        mimo_state/rank_00000.pt         per rank: each module's optimizer state (the inner
        ...                              torch optimizer's state and its main parameters,
                                         fp32 masters included) and the RNG states

``checkpoint.load`` resumes it exactly at the layout it was written at: the weights come
from the HF files, each rank's optimizer state from its own file (a module's optimizer
holds this rank's shard of its parameters, so the layout must match; with
``checkpoint.load_optim=false`` any layout resumes, with a fresh optimizer).
``checkpoint.pretrained_checkpoint=iter_N`` starts a new run from its weights.

    torchrun --nproc-per-node 2 -m mbridge.train --recipe tiny_llava_finetune ... \\
        model.deployment_mode=colocated checkpoint.save=CKPT train.exit_interval=3
    torchrun ... (the same) checkpoint.load=CKPT        # steps 4.. as a straight run
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import msgspec
import torch
import torch.distributed as tdist

from mbridge.io import safe_load
from mbridge.io.hf import CheckpointError
from mbridge.shell import checkpoint, weights
from mbridge.train import cadence
from mbridge.train.config import ConfigError
from mbridge.train.state import Progress

STATE = checkpoint.MIMO_STATE
FORMAT = 1


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / STATE / f"rank_{rank:05d}.pt"


def _layout_json(mimo) -> str:
    return msgspec.json.encode(mimo).decode()


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _main_params(opt) -> list[torch.Tensor]:
    """The parameters the inner torch optimizer steps: the model's own (fp32, not
    distributed), their fp32 masters, or this DP rank's shards of them (distributed)."""
    return [p for group in opt.optimizer.param_groups for p in group["params"]]


def _optimizer_state(optimizer) -> list[dict]:
    out = []
    for opt in _optimizers(optimizer):
        scaler = getattr(opt, "grad_scaler", None)
        out.append({"inner": opt.optimizer.state_dict(),
                    "main": [p.detach().cpu() for p in _main_params(opt)],
                    "grad_scaler": None if scaler is None else scaler.state_dict()})
    return out


def _load_optimizer_state(optimizer, saved: list[dict], where: Path, name: str) -> None:
    opts = _optimizers(optimizer)
    if len(opts) != len(saved):
        raise CheckpointError(f"{where}: module {name!r} has {len(saved)} optimizers saved, "
                              f"this run builds {len(opts)}")
    for opt, state in zip(opts, saved):
        params = _main_params(opt)
        shapes = [tuple(p.shape) for p in params]
        if shapes != [tuple(t.shape) for t in state["main"]]:
            raise CheckpointError(f"{where}: module {name!r}'s optimizer holds other "
                                  "parameter shards than this run's (another layout); resume "
                                  "at the saved layout, or set checkpoint.load_optim=false")
        opt.optimizer.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, t in zip(params, state["main"]):
                p.copy_(t)
        if state["grad_scaler"] is not None and getattr(opt, "grad_scaler", None) is not None:
            opt.grad_scaler.load_state_dict(state["grad_scaler"])


def _describe(layout: dict) -> str:
    """``colocated on 2 ranks: images tp=1 pp=1 dp=2 from rank 0, language ...``."""
    mods = ", ".join(f"{n} tp={m['tensor_parallel']} pp={m['pipeline_parallel']} "
                     f"dp={m['data_parallel']} from rank {m['rank_offset']}"
                     for n, m in sorted(layout["module_parallelisms"].items()))
    return f"{layout['deployment_mode']} on {layout['world_size']} ranks ({mods})"


def read_progress(path: Path) -> dict:
    """``mimo_state/progress.json`` of checkpoint ``path``."""
    try:
        return json.loads((path / STATE / "progress.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None


def check_resume(path: Path | None, mimo, *, load_optim: bool) -> None:
    """Before anything is built: ``checkpoint.load``'s checkpoint ``path`` fits this run.
    ``mimo``: the run's finalized layout when its modules have their own (colocated,
    heterogeneous), else None. ConfigError naming the fix."""
    if path is None:
        return
    held = checkpoint.is_module_checkpoint(path)
    if mimo is None and held:
        raise ConfigError(f"checkpoint.load={path.parent} holds a MIMO checkpoint "
                          f"({path.name}: modules at their own layouts); resume it with its "
                          "model.module_parallelisms, or start from its weights with "
                          f"checkpoint.pretrained_checkpoint={path}")
    if mimo is None:
        return
    if not held:
        raise ConfigError(f"checkpoint.load={path.parent}: {path.name} is not a MIMO "
                          f"checkpoint (model.deployment_mode={mimo.deployment_mode} resumes "
                          "only what such a run saved); start from its weights with "
                          f"checkpoint.pretrained_checkpoint={path}")
    saved = read_progress(path)
    if saved.get("format") != FORMAT:
        raise ConfigError(f"{path}: MIMO checkpoint format {saved.get('format')}, this "
                          f"version reads {FORMAT}")
    layout = json.loads(_layout_json(mimo))
    if load_optim and saved["layout"] != layout:
        raise ConfigError(f"checkpoint.load: {path} was saved {_describe(saved['layout'])}, "
                          f"this run is {_describe(layout)}; its optimizer state is per "
                          "rank: resume at the saved model.module_parallelisms and "
                          "--nproc-per-node, or set checkpoint.load_optim=false (weights and "
                          "progress only)")
    if load_optim:
        missing = [r for r in range(saved["world_size"]) if not _rank_file(path, r).is_file()]
        if missing:
            raise ConfigError(f"checkpoint {path} is incomplete: no state of ranks {missing}")


def open_weights(path: Path):
    """The model weights of MIMO checkpoint ``path`` (its HF files)."""
    return weights.open_hf(path)


def save(root: str | os.PathLike, runtime, progress: Progress, *, hf_config: dict,
         hf_source=None, keep: int = -1) -> Path:
    """Write checkpoint ``iter_{progress.step}`` under ``root`` (every rank calls it) into
    ``.iter_XXXXXXX.partial``, renamed when complete; then the tracker; ``keep``: the
    newest checkpoints to keep (-1: all)."""
    root = Path(root)
    final = root / cadence.checkpoint_name(progress.step)
    tmp = root / f".{final.name}.partial"
    rank = tdist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE).mkdir(parents=True)
    tdist.barrier()
    runtime.save_hf(tmp, hf_config=hf_config, hf_source=hf_source)
    state = {"optimizers": {name: _optimizer_state(m.optimizer)
                            for name, m in runtime.modules.items() if m.optimizer is not None},
             "rng": checkpoint.rng_state()}
    torch.save(state, _rank_file(tmp, rank))
    tdist.barrier()
    if rank == 0:
        record = {"format": FORMAT, "progress": msgspec.to_builtins(progress),
                  "layout": json.loads(_layout_json(runtime.mimo)),
                  "world_size": tdist.get_world_size()}
        (tmp / STATE / "progress.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        checkpoint.write_tracker(root, progress.step)
        for step in cadence.to_delete(cadence.checkpoint_steps(
                p.name for p in root.iterdir() if p.is_dir()), keep, current=progress.step):
            shutil.rmtree(root / cadence.checkpoint_name(step), ignore_errors=True)
    tdist.barrier()
    return final


def load(path: Path, runtime, *, optim: bool = True, rng: bool = True) -> Progress:
    """Load the optimizer state (``optim``) and RNG states (``rng``) of checkpoint ``path``
    into ``runtime``, built from its weights (``open_weights``); returns its Progress. Every
    rank calls it; ``check_resume`` has checked the layout."""
    saved = read_progress(path)
    same = (saved["layout"] == json.loads(_layout_json(runtime.mimo))
            and saved["world_size"] == tdist.get_world_size())
    if (optim or rng) and same:
        file = _rank_file(path, tdist.get_rank())
        state = safe_load.load_torch(file, file)
        if optim:
            held = {n for n, m in runtime.modules.items() if m.optimizer is not None}
            if held != set(state["optimizers"]):
                raise CheckpointError(f"{file} holds the optimizers of modules "
                                      f"{sorted(state['optimizers'])}, this rank trains "
                                      f"{sorted(held)} (another freeze setting?); set "
                                      "checkpoint.load_optim=false to start them afresh")
            for name in sorted(held):
                _load_optimizer_state(runtime.modules[name].optimizer,
                                      state["optimizers"][name], file, name)
        if rng:
            checkpoint.set_rng_state(state["rng"])
    return msgspec.convert(saved["progress"], Progress)


__all__ = ["check_resume", "load", "open_weights", "read_progress", "save"]
