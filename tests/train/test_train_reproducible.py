"""Issue 16, finding 2: one config and seed give the same run in every launch. Each run here
is its own process, launched as a user would (``python -m mbridge.train`` for one rank,
``torchrun`` for two): seeding that only one process sees, or that a model loaded from
``model.hf_path`` hides, cannot pass.

- two launches of ``--recipe tiny_llama_pretrain`` log identical losses, at TP=1 and TP=2;
- a run stopped by ``train.exit_interval`` and resumed in a new launch logs the losses of a
  straight run launched separately, bit for bit;
- data-parallel replicas start (and, with lr 0, stay) with identical weights, and a second
  launch builds the same weights.

Every launch here is a new interpreter (``fresh=True``): ranks forked from the test server
share its hash seed and start-up, which could hide what differs between two launches.
"""

from pathlib import Path

import pytest
from dist_util import logged_losses, torchrun, train_cli

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "init_digest.py"
QUICK = ["train.train_iters=6", "logging.log_interval=1", "train.eval_iters=0",
         "logging.tensorboard=false", "logging.progress_bar=false"]


def run(tmp_path: Path, name: str, *overrides: str, nproc: int = 1) -> list:
    out = tmp_path / name
    train_cli("--recipe", "tiny_llama_pretrain", *QUICK, f"logging.output_dir={out}",
              *overrides, nproc=nproc, cwd=tmp_path, fresh=True)
    return logged_losses(out)


def test_two_launches_log_identical_losses(tmp_path):
    first, second = run(tmp_path, "a"), run(tmp_path, "b")
    assert [s for s, _ in first] == [1, 2, 3, 4, 5, 6]
    assert first == second  # bit for bit (json keeps every digit of a float)


def test_two_launches_at_tp2_log_identical_losses(tmp_path):
    tp2 = "model.tensor_model_parallel_size=2"
    first, second = (run(tmp_path, n, tp2, "train.train_iters=4", nproc=2) for n in "ab")
    assert len(first) == 4 and first == second


def test_exit_and_resume_in_new_launches_equals_a_straight_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    straight = run(tmp_path, "straight")
    first = run(tmp_path, "first", "train.exit_interval=3", f"checkpoint.save={ckpt}")
    second = run(tmp_path, "second", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    assert [s for s, _ in first] == [1, 2, 3] and [s for s, _ in second] == [4, 5, 6]
    assert first + second == straight  # bit for bit


def test_data_parallel_replicas_start_identical(tmp_path):
    args = ["train.train_iters=2", "scheduler.lr_warmup_iters=0", "optimizer.lr=0.0",
            "optimizer.min_lr=0.0",
            "optimizer.use_distributed_optimizer=false", "logging.tensorboard=false",
            "logging.progress_bar=false", "train.eval_iters=0"]
    first = torchrun(SCRIPT, *args, f"logging.output_dir={tmp_path}/a", fresh=True)
    second = torchrun(SCRIPT, *args, f"logging.output_dir={tmp_path}/b", fresh=True)
    assert len(first) == 2 and first[0]["digest"] == first[1]["digest"]  # DP=2 replicas
    assert [r["digest"] for r in second] == [r["digest"] for r in first]  # and every launch
