"""The tests' launcher (``dist_util._launch``): a launch forked from the fork server
(``zygote.py``) behaves as the new interpreter it stands for: argv, working directory,
environment and the torchrun variables, both output streams, the exit code, a failing rank
stopping the others, a timeout killing the launch, and a changed environment sending the
launch to a real process."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from dist_util import _ZYGOTE, _launch, user_env

SCRIPT = """
import json, os, sys, time
rank = int(os.environ.get("RANK", 0))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "ppid": os.getppid(),
                  "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT",
                                                         "PROBE")},
                  "path0": sys.path[0], "main": __name__}), flush=True)
print(f"err from {rank}", file=sys.stderr)
mode = sys.argv[1]
if mode == "exit" and rank == int(sys.argv[2]):
    sys.exit(int(sys.argv[3]))
if mode == "raise":
    raise ValueError("boom")
if mode == "hang" and rank != 0:
    time.sleep(600)
if mode == "hang" and rank == 0:
    sys.exit(1)
if mode == "sleep":
    time.sleep(600)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def launch(script, *args, nproc=1, env=None, **kw):
    env = env or user_env(OMP_NUM_THREADS="1", PROBE="x")
    return _launch([str(script), *args], env, nproc, nproc > 1, **kw)


def lines(proc):
    return [json.loads(x) for x in proc.stdout.splitlines()]


@pytest.mark.skipif(os.environ.get("MBRIDGE_TEST_LAUNCH", "fork") != "fork",
                    reason="the suite launches real processes (MBRIDGE_TEST_LAUNCH)")
def test_forked_launch_is_the_process_it_stands_for(script, tmp_path):
    proc = launch(script, "ok", nproc=2, cwd=tmp_path)
    assert _ZYGOTE.failed is None and proc.returncode == 0, proc.stderr
    got = sorted(lines(proc), key=lambda r: r["env"]["RANK"])
    assert [r["env"]["RANK"] for r in got] == ["0", "1"]
    assert {r["env"]["WORLD_SIZE"] for r in got} == {"2"}
    assert {r["env"]["PROBE"] for r in got} == {"x"}
    assert all(r["argv"] == [str(script), "ok"] and r["cwd"] == str(tmp_path)
               and r["path0"] == str(tmp_path) and r["main"] == "__main__" for r in got)
    assert sorted(proc.stderr.split("\n")[:2]) == ["err from 0", "err from 1"]
    # forked: the ranks are children of the server's launch agent, not of this process
    assert all(r["ppid"] != os.getpid() for r in got)
    one = launch(script, "ok", cwd=tmp_path)
    assert lines(one)[0]["env"]["RANK"] is None  # plain python: no rendezvous variables


@pytest.mark.parametrize("nproc", [1, 2])
def test_exit_codes_and_tracebacks(script, nproc):
    assert launch(script, "exit", str(nproc - 1), "3", nproc=nproc).returncode != 0
    if nproc == 1:
        assert launch(script, "exit", "0", "3").returncode == 3  # exactly, as python's
    raised = launch(script, "raise", nproc=nproc)
    assert raised.returncode != 0 and "ValueError: boom" in raised.stderr


def test_a_failing_rank_stops_the_others(script):
    start = time.perf_counter()
    proc = launch(script, "hang", nproc=2, timeout=120)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 60  # not the 600 s the other rank sleeps


def test_timeout_kills_the_launch(script):
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, "sleep", nproc=2, timeout=5)


def test_a_changed_environment_gets_a_real_process(script):
    launch(script, "ok")  # the server is up
    env = user_env(OMP_NUM_THREADS="1", PROBE="x", SOMETHING_NEW="1")
    proc = launch(script, "ok", env=env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc)[0]["path0"] == str(script.parent)
    assert lines(proc)[0]["ppid"] == os.getpid()  # refused by the server: python, our child
