"""Issue 16, finding 12 (training half): a training rank killed with SIGKILL left
Megatron-Core's checkpoint-writer processes (the Manager ``dist_checkpointing.save`` spawns,
and the resource tracker it keeps open) orphaned and blocked forever. Launched as a user
would; the rank is killed once it has saved, and every process it started must be gone."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_killed_rank_takes_its_checkpoint_writers_with_it(tmp_path):
    cmd = [sys.executable, "-m", "mbridge.train", "--recipe", "tiny_llama_pretrain",
           "train.train_iters=100000", "scheduler.lr_warmup_iters=1", "train.eval_iters=0",
           f"checkpoint.save={tmp_path / 'ckpt'}", "checkpoint.save_interval=1",
           "checkpoint.most_recent_k=2", "logging.progress_bar=false",
           "logging.tensorboard=false", f"logging.output_dir={tmp_path / 'out'}"]
    rank = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    children = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and rank.poll() is None:
            children = psutil.Process(rank.pid).children(recursive=True)
            if (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists() and \
                    any("spawn_main" in " ".join(c.cmdline()) for c in children):
                break
            time.sleep(0.5)
        assert rank.poll() is None and children, "the run never saved a checkpoint"
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:  # do not leave them behind for the next test
        p.kill()
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
