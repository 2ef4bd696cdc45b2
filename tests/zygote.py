"""A fork server for the tests' launches: ``python zygote.py SOCKET`` imports torch,
Megatron-Core, transformers and mbridge's training stack once, then forks each launch's ranks
from that state.

Why: on the 2-core CI machine a launch spends about 7.5 s per process importing (torch 2.2 s,
Megatron-Core's compiled fusions and distributed checkpointing 3 s, transformers 1.5 s)
against 1-2 s of tiny-model work; the suite launches some hundred ranks. A forked rank is a
real process: its own memory, its own gloo group over TCP, its own exit code.

What a fork does not give, and where the tests keep real launches (``dist_util``'s
``fresh=True``, or ``MBRIDGE_TEST_LAUNCH=process`` for the whole suite): the interpreter's
start-up (``PYTHONHASHSEED``, warnings printed while importing, import-time reads of the
environment), and torchrun's own agent. A request whose environment differs from the
server's beyond the variables applied per launch is refused, and the client launches it
for real (``dist_util._launch``).

Protocol, one connection per launch: the client sends one JSON line ``{"argv", "env",
"cwd", "nproc", "master_port"}`` with its stdout and stderr file descriptors attached
(SCM_RIGHTS); the server answers ``{"refused": reason}``, or ``{"pid": P}`` (the launch's
process group: the client kills it on a timeout) then ``{"returncode": N}``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import runpy
import signal
import socket
import sys
import traceback
import warnings

_FILTERS = list(warnings.filters)  # the interpreter's own, before any import adds to them
_BASE_PATH = sys.path[1:]  # without this file's directory
# set per launch (the client compares the rest with the server's environment)
PER_LAUNCH = {"PYTHONPATH", "PYTHONWARNINGS", "PYTEST_CURRENT_TEST", "RANK", "LOCAL_RANK",
              "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "OMP_NUM_THREADS"}


def _per_launch(key: str) -> bool:
    # inductor's own, set in the test process as it compiles (a pointer for its C++
    # wrapper), read only right after it sets it
    return key in PER_LAUNCH or key.startswith("_TORCHINDUCTOR_")


PRELOAD = ("torch", "torch.distributed", "torch.distributed.checkpoint", "transformers",
           "safetensors.torch", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel",
           "megatron.core.datasets.blended_megatron_dataset_builder", "mbridge.train",
           "mbridge.shell.pretrain", "mbridge.shell.runtime", "mbridge.io.mcore")
PRELOAD_TRANSFORMERS = ("AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoImageProcessor",
                        "AutoModelForCausalLM", "PreTrainedModel", "PreTrainedTokenizerFast")


def _rank_env(req: dict, rank: int) -> dict:
    env = dict(req["env"])
    n = req["nproc"]
    if req["torchrun"]:  # what torchrun --nproc-per-node N --master-addr 127.0.0.1 sets
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                   LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", ROLE_RANK=str(rank),
                   ROLE_WORLD_SIZE=str(n), GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(req["master_port"]))
    return env


def _run_rank(req: dict, rank: int, out: int, err: int) -> int:
    """In the forked rank: become the process ``python ARGV`` would have been, run it,
    return its exit code."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((devnull, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
    os.environ.clear()
    os.environ.update(_rank_env(req, rank))
    os.chdir(req["cwd"])
    random.seed()  # the server's state is every fork's otherwise
    argv = req["argv"]
    module = argv[1] if argv[0] == "-m" else None
    first = os.getcwd() if module else os.path.dirname(os.path.abspath(argv[0]))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *_BASE_PATH]
    warnings.filters[:] = _FILTERS
    warnings._filters_mutated()
    opts = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
    sys.warnoptions[:] = opts
    warnings._processoptions(opts)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    try:
        if module:
            sys.argv = [module, *argv[2:]]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def _launch(conn: socket.socket, req: dict, out: int, err: int) -> None:
    """The launch's agent (a forked child of the server): fork the ranks, wait, and on the
    first failure stop the others, as torchrun does."""
    os.setsid()
    conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
    ranks = {}
    for rank in range(req["nproc"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            os._exit(_run_rank(req, rank, out, err))
        ranks[pid] = rank
    first_failure = None

    def kill(_signum=None, _frame=None):
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGALRM, kill)
    while ranks:
        pid, status = os.wait()
        ranks.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first_failure is None:
            first_failure = code
            for other in ranks:
                os.kill(other, signal.SIGTERM)
            signal.alarm(30)
    conn.sendall(json.dumps({"returncode": first_failure or 0}).encode() + b"\n")


def serve(path: str) -> None:
    base_env = dict(os.environ)  # before the imports (torch's inductor sets its cache dir)
    for name in PRELOAD:
        __import__(name)
    import transformers

    for name in PRELOAD_TRANSFORMERS:  # lazy names: each one's module loads on first use
        getattr(transformers, name)
    imported = dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        req = json.loads(msg)
        # a variable may differ from the server's start only where the server's imports
        # set it to the same value (the test process imported the same: torch's inductor
        # puts its cache directory into the environment)
        changed = sorted(k for k in set(req["env"]) | set(base_env) if not _per_launch(k)
                         and req["env"].get(k) not in (base_env.get(k), imported.get(k)))
        if changed:
            conn.sendall(json.dumps({"refused": f"environment differs: {changed[:4]}"})
                         .encode() + b"\n")
        elif os.fork() == 0:
            server.close()
            _launch(conn, req, *fds)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
