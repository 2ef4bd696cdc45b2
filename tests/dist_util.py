"""Run a Python script under ``torchrun --nproc-per-node N`` (gloo on CPU) from a test.

The script prints one JSON line per rank prefixed ``RESULT `` and the helper returns them,
so a single launch checks many things and the test asserts on what every rank saw.

Launches fork from a server that has the heavy imports done (``zygote.py``: about 7.5 s a
process on the CI machine); ``fresh=True`` launches a new interpreter, and torchrun for
several ranks, as a user would, and so does every launch under
``MBRIDGE_TEST_LAUNCH=process``. Tests of what a launch itself does (exit codes and
messages of a user's command, a fresh interpreter's reproducibility, signals) pass
``fresh=True``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
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


class _Zygote:
    """The fork server of this test session (``zygote.py``), started at the first launch."""

    def __init__(self):
        self.proc = None
        self.path = None
        self.env = None
        self.failed = None

    def start(self, env: dict) -> bool:
        if self.failed is not None:
            return False
        if self.proc is None:
            home = tempfile.mkdtemp(prefix="mbridge-zygote-")
            atexit.register(shutil.rmtree, home, ignore_errors=True)
            self.path = os.path.join(home, "sock")
            self.env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("zygote.py")), self.path],
                env=dict(self.env, PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
                stderr=(log := tempfile.TemporaryFile("w+")), text=True)
            atexit.register(self.proc.kill)
            if self.proc.stdout.readline().strip() != "ready":
                log.seek(0)
                self.failed = f"exited {self.proc.wait()}: {log.read()[-2000:]}"
                warnings.warn(f"tests/zygote.py {self.failed}\nso every launch of this "
                              "session starts a new interpreter (slower)", RuntimeWarning,
                              stacklevel=3)
                return False
        return True

    def run(self, argv: list[str], env: dict, cwd, nproc: int, torchrun: bool,
            timeout: float):
        """``subprocess.run``'s CompletedProcess for the launch, or None where the server
        refuses it (then the caller launches it for real)."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            req = {"argv": argv, "env": env, "cwd": str(cwd or os.getcwd()), "nproc": nproc,
                   "torchrun": torchrun, "master_port": free_port()}
            socket.send_fds(conn, [json.dumps(req).encode()], [out.fileno(), err.fileno()])
            conn.settimeout(timeout)
            reader = conn.makefile("r")
            first = json.loads(reader.readline())
            if "refused" in first:
                if os.environ.get("MBRIDGE_TEST_LAUNCH_DEBUG"):
                    with open(os.environ["MBRIDGE_TEST_LAUNCH_DEBUG"], "a") as f:
                        f.write(f"{os.environ.get('PYTEST_CURRENT_TEST')}: {first['refused']}\n")
                return None
            try:
                code = json.loads(reader.readline())["returncode"]
            except TimeoutError:
                os.killpg(first["pid"], signal.SIGKILL)
                out.seek(0)
                err.seek(0)
                raise subprocess.TimeoutExpired(argv, timeout, out.read(),
                                                err.read()) from None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, code, out.read(), err.read())


_ZYGOTE = _Zygote()


def _launch(argv: list[str], env: dict, nproc: int, torchrun: bool, cwd=None,
            timeout: float = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run ``python ARGV`` on ``nproc`` ranks (under torchrun if ``torchrun``) with ``env``:
    forked from the server where it can, else as new processes."""
    if not fresh and os.environ.get("MBRIDGE_TEST_LAUNCH", "fork") == "fork" \
            and _ZYGOTE.start(env):
        proc = _ZYGOTE.run(argv, env, cwd, nproc, torchrun, timeout)
        if proc is not None:
            return proc
    launcher = [sys.executable] if not torchrun else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "--master-addr=127.0.0.1"]
    return subprocess.run([*launcher, *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 600,
             fresh: bool = False) -> list[dict]:
    """Launch ``script`` on ``nproc`` ranks; return the parsed ``RESULT`` lines, rank order.
    Fails the calling test with the full output if any rank fails."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = dict(user_env(), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    proc = _launch([str(script), *args], env, nproc, True, timeout=timeout, fresh=fresh)
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
              check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """Launch ``python -m mbridge.train ARGS`` as a user would: a plain ``python`` process
    for one rank, ``torchrun --nproc-per-node N`` for more (forked from the test server
    unless ``fresh``: the module docstring). With ``check`` a non-zero exit fails the calling
    test with the output; a run past ``timeout`` fails it too (a hang)."""
    env = user_env(OMP_NUM_THREADS="1")
    proc = _launch(["-m", "mbridge.train", *args], env, nproc, nproc > 1, cwd=cwd,
                   timeout=timeout, fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"mbridge.train failed ({proc.returncode}):\n{failure_text(proc)}")
    return proc


def logged_losses(output_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every training line of ``output_dir/metrics.jsonl``."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]
