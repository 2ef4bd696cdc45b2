"""Issue 16, findings 9 (training side), 14 and 15, run as a user would: bad input exits 2
with one line naming the problem and the fix (no traceback), and metrics.jsonl holds one
run's steps.

- a truncated ``.distcp`` on resume (torch's CheckpointException is a BaseException, which
  escaped as a traceback);
- token ids beyond the model's vocabulary (an index error at step 1; a device assert on GPU);
- ``model.seq_length`` beyond the model's ``max_position_embeddings``;
- a run from step 0 into an output directory with an earlier run's metrics.jsonl starts a
  new file (the earlier one moves to metrics.jsonl.1); a resumed run appends.
"""

import json
import subprocess
import sys

import pytest
from dist_util import logged_losses, train_cli
from test_train_preprocess import LINES, make_tokenizer

from mbridge.train import config, recipes
from mbridge.train.config import ConfigError
from mbridge.train.plan import plan_run

BASE = ["--recipe", "tiny_llama_pretrain", "train.eval_iters=0", "logging.log_interval=1",
        "logging.tensorboard=false", "logging.progress_bar=false", "scheduler.lr_warmup_iters=1"]


def refused(proc) -> str:
    """The one-line message of a run that exited 2."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_truncated_distcp_on_resume_exits_2(tmp_path):
    ckpt = tmp_path / "ckpt"
    train_cli(*BASE, "train.train_iters=2", f"checkpoint.save={ckpt}",
              f"logging.output_dir={tmp_path}/a", cwd=tmp_path)
    shards = sorted((ckpt / "iter_0000002").glob("*.distcp"))
    assert shards
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train_cli(*BASE, "train.train_iters=4", f"checkpoint.save={ckpt}",
                     f"checkpoint.load={ckpt}", f"logging.output_dir={tmp_path}/b",
                     cwd=tmp_path, check=False)
    line = refused(proc)  # the size check before loading, or torch's CheckpointException
    assert line.startswith("error: ") and f"{ckpt}/iter_0000002" in line
    assert "truncated" in line or "CheckpointException" in line, line


@pytest.mark.slow
def test_token_ids_beyond_the_vocabulary_exit_2_before_step_1(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")  # about 30 ids
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 40))
    prefix = tmp_path / "corpus_text_document"
    pre = subprocess.run([sys.executable, "-m", "mbridge", "data", "preprocess", "--input",
                          str(src), "--tokenizer", str(tok), "--output-prefix", str(prefix),
                          "--append-eod", "--no-progress"], capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr
    proc = train_cli(*BASE, "train.train_iters=2", "model.spec.vocab_size=16",
                     f"data.blend=[{prefix}]", "data.split=90,10,0",
                     f"logging.output_dir={tmp_path}/run", cwd=tmp_path, check=False)
    line = refused(proc)
    assert line.startswith("error: data.blend holds token id ") and \
        "beyond the model's vocabulary of 16" in line
    assert logged_losses(tmp_path / "run") == []  # no step ran


def test_seq_length_beyond_the_model_positions_is_refused(tmp_path):
    cfg = config.apply_overrides(recipes.tiny_llama_pretrain(), ["model.seq_length=512"])
    with pytest.raises(ConfigError, match="model.seq_length=512 is longer than the model's "
                                          "max_position_embeddings=256"):
        plan_run(cfg, cfg.model.spec, 1)
    proc = subprocess.run([sys.executable, "-m", "mbridge.train", "--recipe",
                           "tiny_llama_pretrain", "model.seq_length=512"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert "lower model.seq_length" in refused(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_metrics_jsonl_holds_one_run_and_a_resumed_run_appends(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    train_cli(*BASE, "train.train_iters=2", f"checkpoint.save={ckpt}",
              f"logging.output_dir={out}", cwd=tmp_path)
    train_cli(*BASE, "train.train_iters=3", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
              f"logging.output_dir={out}", cwd=tmp_path)
    assert [s for s, _ in logged_losses(out)] == [1, 2, 3]  # resumed: appended
    again = train_cli(*BASE, "train.train_iters=2", f"logging.output_dir={out}", cwd=tmp_path)
    assert [s for s, _ in logged_losses(out)] == [1, 2]  # a new run: a new file
    kept = [json.loads(x)["step"] for x in (out / "metrics.jsonl.1").read_text().splitlines()]
    assert kept == [1, 2, 3] and "metrics.jsonl.1" in again.stdout
