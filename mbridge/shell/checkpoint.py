"""Training checkpoints: Megatron-Core distributed checkpoints of model, optimizer, RNG and
progress (step, consumed samples: the data position and the lr-schedule position).

Layout (Megatron-LM's), under ``checkpoint.save``::

    latest_checkpointed_iteration.txt    the newest complete step, written last
    iter_0000010/                        dist_checkpointing.save of
        {"model0".., "optimizer", "rng_state", "progress", "run_config"}
        (0.16: the last two in common.pt; 0.19: inside the .distcp files, ``common_state``)
        hf/config.json, mbridge.json     so `mbridge convert export --mcore DIR` needs nothing else

Model keys are ``GPTModel.sharded_state_dict()``'s, one ``model{v}`` entry per virtual
pipeline chunk (global shapes: loadable at any TP/PP). The optimizer uses Megatron-Core's
``dp_reshardable`` format (resume at the same TP/PP; set ``checkpoint.load_optim=false`` to
change them). A checkpoint is written into ``.iter_XXXXXXX.partial`` and renamed when
complete, so an interrupted save never looks finished.
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
from mbridge.io.hf import INDEX, CheckpointError
from mbridge.io.mcore import TRACKER, McoreReader, tracked_step
from mbridge.shell import fast_optimizer
from mbridge.shell.cpu_shim import cuda_as_cpu
from mbridge.shell.model import unwrap
from mbridge.train import cadence
from mbridge.train.state import Progress

OPTIM_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
ADAPTER = ".adapter."  # in the names of LoRA/DoRA tensors (shell/adapters.py)
MIMO_STATE = "mimo_state"  # a MIMO checkpoint's progress and per-rank state (mimo_checkpoint)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory`` (None if there is none); raises
    CheckpointError if the tracker names one that is missing or incomplete."""
    root = Path(directory)
    if not root.exists():
        return None
    if not root.is_dir():
        raise CheckpointError(f"checkpoint.load={root} is not a directory")
    step = tracked_step(root)
    if step is not None:
        path = root / cadence.checkpoint_name(step)
    else:
        steps = cadence.checkpoint_steps(p.name for p in root.iterdir() if p.is_dir())
        if not steps:
            return None
        path = root / cadence.checkpoint_name(steps[-1])
    check_readable(path)
    return path


def check_save_target(save: str | os.PathLike | None, resume: Path | None) -> None:
    """Refuse to start a run whose ``checkpoint.save`` already holds checkpoints it does not
    continue: saving there would mix two runs (and retention would delete one's checkpoints),
    and re-running a command after a crash would restart from scratch without a word. Resuming
    from that directory (``checkpoint.load`` = ``checkpoint.save``) is what continues it."""
    if save is None or not Path(save).is_dir():
        return
    root = Path(save)
    steps = cadence.checkpoint_steps(p.name for p in root.iterdir() if p.is_dir())
    if not steps or (resume is not None and resume.parent.resolve() == root.resolve()):
        return
    where = f"resumes from {resume}" if resume is not None else "starts from scratch"
    raise CheckpointError(
        f"checkpoint.save={save} already holds checkpoints of another run (up to "
        f"{cadence.checkpoint_name(steps[-1])}) and this run {where}; to continue that run "
        f"set checkpoint.load={save}, or give checkpoint.save an empty directory")


def is_module_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a MIMO run's checkpoint (an HF directory with ``MIMO_STATE/``:
    ``shell.mimo_checkpoint``) rather than a distributed checkpoint."""
    return (Path(path) / MIMO_STATE / "progress.json").is_file()


def check_readable(path: Path) -> None:
    """The files of a Megatron-Core dist checkpoint (or of a MIMO checkpoint) are there and
    its metadata parses."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_module_checkpoint(path):
        for name in (f"{MIMO_STATE}/progress.json", INDEX):
            try:
                json.loads((path / name).read_text())
            except Exception as e:
                raise CheckpointError(f"checkpoint {path} is incomplete or unreadable: "
                                      f"{name}: {e}") from None
        return
    for name in ("metadata.json", ".metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete or unreadable: no {name}")
    try:
        json.loads((path / "metadata.json").read_text())
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None
    McoreReader(path)  # every pickle read with an allow-list: nothing in it runs


def common_state(path: Path) -> dict:
    """The checkpoint's non-sharded entries (progress, run config, world size). Megatron-Core
    0.16 writes them to ``common.pt``; from 0.19 they are one ``common_state`` object inside
    the torch_dist files, which ``load_common_state_dict`` reads (``weights_only``, and under
    ``safe_load.megatron_loading``; ``dist_checkpointing/serialization.py``). Either release
    reads a ``common.pt``."""
    if (path / safe_load.COMMON).is_file():
        return safe_load.load_torch(path / safe_load.COMMON, path / safe_load.COMMON)
    from megatron.core import dist_checkpointing

    try:
        with safe_load.megatron_loading(path):
            return dist_checkpointing.load_common_state_dict(str(path))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from None


def rng_state() -> dict:
    """This rank's CPU (and CUDA) generators and Megatron-Core's tracker states."""
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sharded_state_dict(runtime, *, loading: bool, optim: bool = True, rng: bool = True,
                       adapters_only: bool = False) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    modules = unwrap(runtime.model)
    state = {f"model{v}": m.sharded_state_dict() for v, m in enumerate(modules)}
    if adapters_only:  # LoRA/DoRA: the frozen base comes from model.hf_path again
        state = {k: {n: t for n, t in sd.items() if ADAPTER in n} for k, sd in state.items()}
    if optim:
        if loading:
            _materialize_adam_state(runtime.optimizer)
        model_sd = dict(state)
        with cuda_as_cpu():
            state["optimizer"] = runtime.optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata=OPTIM_FORMAT)
    if rng:
        rank, world = tdist.get_rank(), tdist.get_world_size()
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,),
                                           replica_id=0)
    return state


def _materialize_adam_state(optimizer) -> None:
    """Megatron-Core's DistributedOptimizer builds its loading state dict from the inner
    optimizer's state, which torch's Adam (the fallback without TE/Apex) creates lazily at
    its first step; create it (zeros, step 0) so a fresh optimizer can be loaded into."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def _restore_adam_step(optimizer, loaded: dict) -> None:
    """Torch Adam keeps its step per parameter; Megatron-Core's loader leaves our zeros in
    place (dp_reshardable), so set it from the step stored with the param groups."""
    groups = _param_groups(loaded)
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) != 1:
        return
    step = float(steps.pop())
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for st in inner.state.values():
                st["step"] = torch.tensor(step)


def _param_groups(loaded: dict) -> list[dict]:
    """The param groups of a loaded optimizer state: one optimizer's, or every optimizer's of
    a ``ChainedOptimizer`` (``{0: ..., 1: ...}``: dense and expert parameters at EP > 1)."""
    if "optimizer" in loaded:
        return list(loaded["optimizer"].get("param_groups", []))
    return [g for v in loaded.values() if isinstance(v, dict) for g in _param_groups(v)]


def save(root: str | os.PathLike, runtime, progress: Progress, run_config: dict, *,
         hf_config: dict, spec_json: bytes, hf_source=None, keep: int = -1,
         adapters_only: bool = False) -> Path:
    """Write checkpoint ``iter_{progress.step}`` under ``root`` (every rank calls it);
    ``adapters_only``: the model's LoRA/DoRA tensors and their optimizer state only."""
    from megatron.core import dist_checkpointing

    from mbridge.io.mcore import write_hf_files
    from mbridge.shell import writers

    writers.guard()  # Megatron-Core's writer processes exit with this rank, even if killed
    root = Path(root)
    final = root / cadence.checkpoint_name(progress.step)
    tmp = root / f".{final.name}.partial"
    rank0 = tdist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tdist.barrier()
    state = sharded_state_dict(runtime, loading=False, adapters_only=adapters_only)
    state["adapters_only"] = adapters_only
    state["progress"] = msgspec.to_builtins(progress)
    state["run_config"] = run_config
    state["world_size"] = tdist.get_world_size()
    with cuda_as_cpu():
        dist_checkpointing.save(state, str(tmp))
    tdist.barrier()
    if rank0:
        write_hf_files(tmp, hf_config, spec_json, hf_source)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_tracker(root, progress.step)
        for step in cadence.to_delete(cadence.checkpoint_steps(
                p.name for p in root.iterdir() if p.is_dir()), keep, current=progress.step):
            shutil.rmtree(root / cadence.checkpoint_name(step), ignore_errors=True)
    tdist.barrier()
    return final


def write_tracker(root: Path, step: int) -> None:
    """Name ``step`` the newest complete checkpoint under ``root`` (atomically)."""
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, root / TRACKER)


def load(path: Path, runtime, *, optim: bool = True, rng: bool = True,
         adapters_only: bool = False) -> Progress:
    """Load checkpoint ``path`` into ``runtime`` (every rank calls it); returns its Progress.
    ``adapters_only``: a checkpoint of adapters only, into a model whose base is loaded."""
    from megatron.core import dist_checkpointing

    common = common_state(path)
    if "progress" not in common:
        raise CheckpointError(f"{path} is not a training checkpoint (no progress); start "
                              "from it with model.hf_path instead")
    if bool(common.get("adapters_only", False)) != adapters_only:
        held = "adapters only" if common.get("adapters_only") else "the whole model"
        raise CheckpointError(f"{path} holds {held}; set peft.adapters_only_checkpoint="
                              f"{str(not adapters_only).lower()} to resume from it")
    saved = (common.get("run_config") or {}).get("model", {}).get("moe_stacked_experts", False)
    stacked = getattr(getattr(runtime, "model_cfg", None), "moe_stacked_experts", False)
    if optim and bool(saved) != bool(stacked):
        # the same elements in another order in DDP's buffers: the optimizer state would
        # load into the wrong parameters without a word
        raise CheckpointError(f"the optimizer state of {path} was saved with "
                              f"model.moe_stacked_experts={str(bool(saved)).lower()}: resume "
                              "with the same value, or set checkpoint.load_optim=false")
    saved_world = common.get("world_size")
    rng = rng and saved_world in (None, tdist.get_world_size())
    state = sharded_state_dict(runtime, loading=True, optim=optim, rng=rng,
                               adapters_only=adapters_only)
    try:
        with cuda_as_cpu(), safe_load.megatron_loading(path):
            loaded = dist_checkpointing.load(state, str(path))
            for v, chunk in enumerate(runtime.model):
                module = getattr(chunk, "module", chunk)
                missing, unexpected = module.load_state_dict(loaded[f"model{v}"],
                                                             strict=not adapters_only)
                if adapters_only and (unexpected or any(ADAPTER in k for k in missing)):
                    raise CheckpointError(f"{path} does not hold this model's adapters: "
                                          f"{(unexpected or missing)[:3]}")
            if optim:
                with torch.no_grad():
                    runtime.optimizer.load_state_dict(loaded["optimizer"])
                _restore_adam_step(runtime.optimizer, loaded["optimizer"])
                # the kernel is this run's choice, not the saved groups' (a CPU save: foreach)
                fast_optimizer.use_fused_adam(runtime.optimizer)
            else:  # fp32 master weights from the loaded model weights
                runtime.optimizer.reload_model_params()
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException (a truncated .distcp) is one
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                              f"{first[:300]} (damaged or incomplete); restore it, or set "
                              "checkpoint.load to another checkpoint directory") from None
    if rng:
        set_rng_state(loaded["rng_state"])
    return msgspec.convert(loaded["progress"], Progress)


def load_adapters(path: Path, chunks: list) -> None:
    """Load the LoRA/DoRA tensors of a training checkpoint ``path`` into ``chunks``, which
    hold the same adapters at any layout (the checkpoint's global shapes reshard)."""
    from megatron.core import dist_checkpointing

    modules = unwrap(chunks)
    state = {f"model{v}": {n: t for n, t in m.sharded_state_dict().items() if ADAPTER in n}
             for v, m in enumerate(modules)}
    try:
        with cuda_as_cpu():
            loaded = dist_checkpointing.load(state, str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read the adapters of {path}: {type(e).__name__}: "
                              f"{e}") from None
    for v, m in enumerate(modules):
        _, unexpected = m.load_state_dict(loaded[f"model{v}"], strict=False)
        if unexpected:
            raise CheckpointError(f"{path} holds adapters this model lacks: {unexpected[:3]}")
