"""Run a Python script under ``torchrun --nproc-per-node N`` (gloo on CPU) from a test.

The script prints one JSON line per rank prefixed ``RESULT `` and the helper returns them,
so a single launch checks many things and the test asserts on what every rank saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def user_env(**extra: str) -> dict:
    """This process's environment as a user's shell would pass it to a launch: without the
    group-of-one rendezvous variables ``shell/dist.start`` sets in ``os.environ`` when a test
    starts torch.distributed in-process. Inherited, they make a plain ``python`` child rank 0
    of a store on the port this process still listens on (EADDRINUSE)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return {**env, **extra}


def _clip(text: str, head: int, tail: int) -> str:
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters ...]\n{text[-tail:]}"


def failure_text(proc) -> str:
    """A failed launch's output for the assertion: stderr's start (where the first failing
    rank's traceback usually is, before the other ranks' and the agent's) and end, then the
    end of stdout."""
    return (f"--- stderr ---\n{_clip(proc.stderr, 4000, 4000)}\n"
            f"--- stdout (end) ---\n{proc.stdout[-2000:]}")


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600) -> list[dict]:
    """Launch ``script`` on ``nproc`` ranks; return the parsed ``RESULT`` lines, rank order.
    Fails the calling test with the full output if any rank fails."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{failure_text(proc)}")
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r.get("rank", 0))


def report(**fields) -> None:
    """Called inside a launched script: print one RESULT line for this rank."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    # One write call per line: with unbuffered stdout, print() writes text and newline
    # separately, and two ranks sharing the pipe can interleave between them.
    sys.stdout.write("RESULT " + json.dumps({"rank": rank, **fields}) + "\n")
    sys.stdout.flush()


def train_cli(*args: str, nproc: int = 1, cwd: str | Path | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``python -m mbridge.train ARGS`` as a user would: a plain ``python`` process
    for one rank, ``torchrun --nproc-per-node N`` for more. With ``check`` a non-zero exit
    fails the calling test with the output; a run past ``timeout`` fails it too (a hang)."""
    env = user_env(OMP_NUM_THREADS="1")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "--master-addr=127.0.0.1"]
    proc = subprocess.run([*launcher, "-m", "mbridge.train", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mbridge.train failed ({proc.returncode}):\n{failure_text(proc)}")
    return proc


def logged_losses(output_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of ``output_dir/metrics.jsonl``."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]
