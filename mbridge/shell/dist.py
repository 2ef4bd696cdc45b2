"""Process groups, as values: the one module that creates them and reads ``parallel_state``.

``init(parallel)`` starts torch.distributed (a one-rank group in a plain process; gloo on
CPU, nccl on GPU), sets up Megatron-Core's ``parallel_state`` for ``parallel`` (what its
training code, DDP and optimizer read) and returns a ``Groups``. ``new_groups(parallel)``
creates the groups of another layout in the same world without touching ``parallel_state``,
so two models with different layouts can live in one process world (each built, run and
converted with its own ``Groups``). Everything else takes a ``Groups`` argument:
model building, forward, online conversion and the training runtime.
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mbridge.sharding import grid
from mbridge.shell import cpu_shim
from mbridge.specs import ParallelSpec, RankSpec


@dataclass(frozen=True)
class Groups:
    """This rank's process groups for one parallel layout: Megatron-Core's
    ``ProcessGroupCollection`` (``collection``, what ``GPTModel(pg_collection=...)`` takes)
    and the layout it serves."""

    parallel: ParallelSpec
    collection: Any

    @property
    def tp(self):
        return self.collection.tp

    @property
    def pp(self):
        return self.collection.pp

    @property
    def ep(self):
        return self.collection.ep

    @property
    def etp(self):
        return self.collection.expt_tp

    @property
    def dp(self):
        return self.collection.dp

    @property
    def rank(self) -> RankSpec:
        """This rank's coordinates in ``parallel``."""
        return RankSpec(tp=_rank(self.tp), pp=_rank(self.pp), ep=_rank(self.ep),
                        etp=_rank(self.etp))

    @property
    def dp_rank(self) -> int:
        return _rank(self.dp)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> None:
    """Start torch.distributed if it is not: join torchrun's world, or a group of one."""
    if dist.is_initialized():
        return
    rendezvous = {}
    if "RANK" not in os.environ:  # plain `python`: a group of one, on a port of its own
        # given to init_process_group, not written into os.environ: a child this process
        # launches (a CLI, torchrun) must not inherit a rendezvous on a port held here
        rendezvous = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, **rendezvous)
    atexit.register(_shutdown)


def init(parallel: ParallelSpec, seed: int = 1234) -> Groups:
    """Start torch.distributed if needed and Megatron-Core's model-parallel groups for
    ``parallel``; returns them."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_shim.apply()  # model_parallel_cuda_manual_seed below needs the RNG bridge on CPU
    start()
    world = dist.get_world_size()
    if world % (parallel.tp * parallel.pp * parallel.cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = "
                         f"{parallel.tp}*{parallel.pp}*{parallel.cp}")
    global _started
    sizes = dict(tensor_model_parallel_size=parallel.tp,
                 pipeline_model_parallel_size=parallel.pp,
                 virtual_pipeline_model_parallel_size=parallel.vpp,
                 context_parallel_size=parallel.cp,
                 expert_model_parallel_size=parallel.ep,
                 expert_tensor_parallel_size=parallel.etp)
    if not _is_started(ps, sizes):  # the same layout again keeps its groups (see _started)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(**sizes)
        _started = (sizes, ps.get_tensor_model_parallel_group())
    model_parallel_cuda_manual_seed(seed)
    return Groups(parallel, ProcessGroupCollection.use_mpu_process_groups())


# The layout ``init`` last started ``parallel_state`` with, and its tensor-parallel group (to
# tell whether anyone restarted it since). ``destroy_model_parallel`` forgets the groups but
# destroys only its few explicit gloo ones: every other group lives on in torch.distributed,
# two threads each, and gloo's transport loops keep waking. A process that provides model
# after model (the test suite: every ``provide_distributed_model``) collected over 3,000
# such threads, which used 987 s of CPU against the tests' own 45 s; reusing the groups of
# an unchanged layout creates them once.
_started: tuple[dict, Any] | None = None


def _is_started(ps, sizes: dict) -> bool:
    """Whether ``parallel_state`` runs the layout ``sizes``, as ``init`` started it."""
    return (_started is not None and _started[0] == sizes and ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_group(check_initialized=False) is _started[1])


def set_random_seed(seed: int, groups: Groups) -> None:
    """Seed every generator that builds or runs the model, as Megatron-LM's
    ``_set_random_seed`` does before it builds one: Python's, NumPy's, torch's global one
    (CPU and CUDA; Megatron-Core's CPU initialisation draws the weights from it) and the
    model-parallel tracker (dropout, GPU initialisation of tensor-parallel weights), all
    from ``decision.stage_seed``. Without it two launches of one config start from different
    weights, and so do data-parallel replicas."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mbridge.train.decision import stage_seed

    rank = groups.rank
    seed = stage_seed(seed, rank.pp)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device's generator
    model_parallel_cuda_manual_seed(seed, tp_rank=rank.tp, ep_rank=rank.ep, etp_rank=rank.etp)


def new_groups(parallel: ParallelSpec) -> Groups:
    """The groups of ``parallel`` over the current world, created here (every rank must call
    it, in the same order), leaving ``parallel_state`` as it is. Ranks follow Megatron-Core's
    ``tp-cp-ep-dp-pp`` order (``mbridge.sharding.grid``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    start()
    world = dist.get_world_size()
    dense, expert = grid.dense_grid(parallel, world), grid.expert_grid(parallel, world)
    wanted = dict(tp=(dense, ("tp",)), cp=(dense, ("cp",)), dp=(dense, ("dp",)),
                  pp=(dense, ("pp",)), dp_cp=(dense, ("dp", "cp")),
                  tp_cp=(dense, ("tp", "cp")), mp=(dense, ("tp", "cp", "pp")),
                  ep=(expert, ("ep",)), expt_tp=(expert, ("etp",)),
                  expt_dp=(expert, ("edp",)), tp_ep=(expert, ("etp", "ep")),
                  tp_ep_pp=(expert, ("etp", "ep", "pp")))
    made = {name: _mine(grid.groups_over(g, dims)) for name, (g, dims) in wanted.items()}
    made["embd"] = _mine(grid.embedding_groups(dense))
    made["pos_embd"] = None
    return Groups(parallel, ProcessGroupCollection(**made))


def module_groups(cfg, name: str) -> Groups | None:
    """The groups of module ``name`` of a finalized ``MimoParallelismConfig``
    (``mbridge.sharding.mimo``) over its own ranks, created here (every rank must call it,
    for every module, in the same order); None on a rank that does not hold the module."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from mbridge.sharding import mimo

    start()
    dense = dict(tp=("tp",), cp=("cp",), dp=("dp",), pp=("pp",), dp_cp=("dp", "cp"),
                 tp_cp=("tp", "cp"), mp=("tp", "cp", "pp"),
                 # one distributed-optimizer instance: its gradient statistics span the module
                 intra_dist_opt=("tp", "cp", "dp", "pp"))
    expert = dict(ep=("ep",), expt_tp=("etp",), expt_dp=("edp",), tp_ep=("etp", "ep"),
                  tp_ep_pp=("etp", "ep", "pp"))
    made = {k: _mine(mimo.module_groups(cfg, name, d)) for k, d in dense.items()}
    made |= {k: _mine(mimo.module_groups(cfg, name, d, expert=True)) for k, d in expert.items()}
    made["embd"] = _mine(mimo.embedding_groups(cfg, name))
    made["pos_embd"] = None
    if dist.get_rank() not in mimo.module_ranks(cfg, name):
        return None
    return Groups(cfg.module_parallelisms[name].parallel, ProcessGroupCollection(**made))


def _mine(rank_lists):
    """Create every group in ``rank_lists`` (collective: all ranks create all groups) and
    return the one holding this rank."""
    me, found = dist.get_rank(), None
    for ranks in rank_lists:
        group = dist.new_group(list(ranks))
        if me in ranks:
            found = group
    return found


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


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
