"""Process groups: start torch.distributed (one-rank group when none exists) and
Megatron-Core's ``parallel_state`` for a ParallelSpec. The one place that reads
``parallel_state``; everything else gets ranks and groups from here."""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist

from mbridge.shell import cpu_shim
from mbridge.specs import ParallelSpec, RankSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(parallel: ParallelSpec, seed: int = 1234) -> RankSpec:
    """Start torch.distributed if needed (gloo on CPU, nccl on GPU) and Megatron-Core's
    model-parallel groups for ``parallel``; returns this rank's coordinates."""
    cpu_shim.apply()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python`: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        atexit.register(_shutdown)
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp * parallel.cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = "
                         f"{parallel.tp}*{parallel.pp}*{parallel.cp}")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    model_parallel_cuda_manual_seed(seed)
    return rank_spec()


def _shutdown() -> None:
    """Destroy the groups this module started while the interpreter is still alive: left to
    interpreter finalisation, gloo's worker threads can still hold work objects whose release
    needs the GIL, and the process dies with SIGABRT after its work is done ("terminate
    called without an active exception", seen in a training run here)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_spec() -> RankSpec:
    from megatron.core import parallel_state as ps

    return RankSpec(tp=ps.get_tensor_model_parallel_rank(),
                    pp=ps.get_pipeline_model_parallel_rank(),
                    ep=ps.get_expert_model_parallel_rank(),
                    etp=ps.get_expert_tensor_parallel_rank())


def groups():
    """(tp group, pp group, dp rank) of this rank."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
            ps.get_data_parallel_rank())


def expert_groups():
    """(expert parallel group, expert tensor parallel group) of this rank."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
