"""Issue 16, finding 6: the README's training command runs as written. The command is read
from README.md (so the two cannot drift); only its placeholder paths are replaced, by a tiny
HF Llama, a corpus made with ``mbridge data preprocess`` and a temporary directory.

- ``--print-config`` on the command as written (1000 steps, 8 ranks) checks it as a run would
  and prints it: the checkpoint replaces the recipe's architecture, the data its mock data,
  and the warmup fits the steps; a config that cannot run exits 2 instead of printing;
- the command trains on 2 CPU ranks (sizes shrunk by overrides appended to it), and the same
  command run again resumes from its checkpoints instead of starting over them.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dist_util import logged_losses, train_cli
from models import make_hf
from test_train_splits import corpus  # noqa: F401 (fixture)

from mbridge.train import config

README = Path(__file__).parents[2] / "README.md"


def readme_command() -> list[str]:
    """The README's `--recipe llama32_1b_pretrain` command, continuation lines joined."""
    text = README.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if "--recipe llama32_1b_pretrain" in x)
    return shlex.split(line.split("#")[0])


@pytest.fixture(scope="module")
def command(corpus, tmp_path_factory):  # noqa: F811
    work, prefix = corpus
    hf = work / "Llama-3.2-1B"
    make_hf("llama", hf, max_position_embeddings=131072)  # as the real one
    swap = {"/path/to/Llama-3.2-1B": str(hf), "/data/corpus_text_document": str(prefix),
            "/ckpt": str(work / "ckpt")}
    pattern = re.compile("|".join(map(re.escape, swap)))
    args = [pattern.sub(lambda m: swap[m.group(0)], a) for a in readme_command()]
    assert args[:3] == ["torchrun", "--nproc-per-node", "8"] and args[3:5] == ["-m",
                                                                                "mbridge.train"]
    return work, args[5:]


def print_config(args, cwd):
    env = dict(os.environ, WORLD_SIZE="8")
    return subprocess.run([sys.executable, "-m", "mbridge.train", *args, "--print-config"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_print_config_checks_the_readme_command(command):
    work, args = command
    shown = print_config(args, work)
    assert shown.returncode == 0, shown.stderr[-3000:]
    cfg = config.from_text(shown.stdout)
    assert cfg.model.spec is None and cfg.model.hf_path.endswith("Llama-3.2-1B")
    assert cfg.data.mock is False and cfg.train.train_iters == 1000
    bad = print_config([*args, "scheduler.lr_warmup_iters=2000"], work)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "warmup (2000 iters) must be shorter than the decay (1000 iters)" in bad.stderr


@pytest.mark.slow
def test_readme_command_trains_and_resumes_when_run_again(command):
    work, args = command
    small = ["model.seq_length=32", "train.global_batch_size=4", "train.eval_iters=1",
             "scheduler.lr_warmup_iters=1", "checkpoint.save_interval=2",
             "logging.tensorboard=false", "logging.progress_bar=false", "logging.log_interval=1"]
    train_cli(*args, *small, "train.train_iters=4", nproc=2, cwd=work, fresh=True)
    out = work / "runs" / "llama32_1b_pretrain"
    assert [s for s, _ in logged_losses(out)] == [1, 2, 3, 4]
    assert (work / "ckpt" / "iter_0000004").is_dir()
    again = train_cli(*args, *small, "train.train_iters=6", nproc=2, cwd=work,
                      fresh=True)
    assert f"resumed from {work / 'ckpt' / 'iter_0000004'} at step 4" in again.stdout
    assert [s for s, _ in logged_losses(out)] == [1, 2, 3, 4, 5, 6]
