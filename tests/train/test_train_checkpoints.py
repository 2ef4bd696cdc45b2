"""Issue 16, finding 5: checkpoints are never lost to a rerun. Launched as a user would.

- re-running a command whose ``checkpoint.save`` holds checkpoints, without resuming from it,
  exits 2 naming ``checkpoint.load`` and leaves them as they are; with
  ``checkpoint.load`` = ``checkpoint.save`` the same command resumes;
- a run resumed from a tracker behind a higher checkpoint (a crash between the rename and
  the tracker write) keeps the checkpoint it just wrote, whatever ``most_recent_k`` says, and
  the tracker names a checkpoint that exists.
"""

import pytest
from dist_util import logged_losses, train_cli

pytestmark = pytest.mark.slow

BASE = ["--recipe", "tiny_llama_pretrain", "train.eval_iters=0", "logging.log_interval=1",
        "logging.tensorboard=false", "logging.progress_bar=false", "scheduler.lr_warmup_iters=1"]


def listing(d):
    return sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())


def test_rerun_refuses_to_restart_over_checkpoints_and_resumes_when_told(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [*BASE, "train.train_iters=4", f"checkpoint.save={ckpt}", "checkpoint.save_interval=2"]
    train_cli(*cmd, f"logging.output_dir={tmp_path}/a", cwd=tmp_path)
    before = listing(ckpt)
    assert [n for n, _ in before] == ["iter_0000002", "iter_0000004",
                                      "latest_checkpointed_iteration.txt"]
    again = train_cli(*cmd, f"logging.output_dir={tmp_path}/b", cwd=tmp_path, check=False)
    assert again.returncode == 2, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last == (f"error: checkpoint.save={ckpt} already holds checkpoints of another run "
                    "(up to iter_0000004) and this run starts from scratch; to continue that "
                    f"run set checkpoint.load={ckpt}, or give checkpoint.save an empty directory")
    assert listing(ckpt) == before and not (tmp_path / "b").exists()
    resumed = train_cli(*cmd[:-2], "train.train_iters=6", f"checkpoint.save={ckpt}",
                        f"checkpoint.load={ckpt}", f"logging.output_dir={tmp_path}/c",
                        cwd=tmp_path)
    assert f"resumed from {ckpt}/iter_0000004 at step 4" in resumed.stdout
    assert [s for s, _ in logged_losses(tmp_path / "c")] == [5, 6]


def test_retention_keeps_the_checkpoint_just_written(tmp_path):
    ckpt = tmp_path / "ckpt"
    train_cli(*BASE, "train.train_iters=4", f"checkpoint.save={ckpt}",
              "checkpoint.save_interval=2", f"logging.output_dir={tmp_path}/a", cwd=tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2\n")  # the tracker fell behind
    train_cli(*BASE, "train.train_iters=3", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
              "checkpoint.most_recent_k=1", f"logging.output_dir={tmp_path}/b", cwd=tmp_path)
    tracked = (ckpt / "latest_checkpointed_iteration.txt").read_text().strip()
    assert tracked == "3" and (ckpt / "iter_0000003" / "metadata.json").is_file()
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
