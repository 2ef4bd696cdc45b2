"""Issue 16, finding 1: ``data.split`` over a small indexed dataset. The default ``969,30,1``
gives the test split of a 400-document corpus no documents, and Megatron-Core's
``GPTDataset._get_num_epochs`` then looks for its tokens forever. The split plan
(``mbridge.train.split``) rounds as Megatron-Core does, leaves out the splits no run reads,
and refuses (exit 2, before the model is built) a split the run reads that gets nothing.
Runs as a user would: ``mbridge data preprocess``, then ``python -m mbridge.train``, with a
timeout so a hang fails."""

import json
import subprocess
import sys

import pytest
from dist_util import logged_losses, train_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train_preprocess import LINES, make_tokenizer

from mbridge.train.config import ConfigError
from mbridge.train.split import split_documents, unused_splits


@settings(deadline=None)  # the first example imports Megatron-Core
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=3).filter(lambda s: sum(s) > 0),
       st.integers(1, 5000))
def test_split_documents_round_as_megatron(shares, n):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    split = ",".join(map(str, shares))
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    theirs = tuple(0 if b is None else round(b[1] * float(n)) - round(b[0] * float(n))
                   for b in matrix)
    assert split_documents(split, n) == theirs


def test_unused_splits_and_refusals():
    assert split_documents("969,30,1", 400) == (388, 12, 0)
    assert unused_splits("969,30,1", {"c": 400}, eval_iters=2) == {2}
    assert unused_splits("969,30,1", {"c": 400}, eval_iters=0) == {1, 2}
    with pytest.raises(ConfigError, match="gives the validation split 0 of the 400 documents "
                                          "of c .*set train.eval_iters=0 or give it"):
        unused_splits("999,1,0", {"c": 400}, eval_iters=2)
    with pytest.raises(ConfigError, match="gives the train split 0 of the 3 documents of b"):
        unused_splits("1,98,1", {"a": 4000, "b": 3}, eval_iters=0)
    with pytest.raises(ConfigError, match="not up to three shares"):
        unused_splits("0,0,0", {}, eval_iters=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 400 documents through `mbridge data preprocess`, as a user makes them."""
    work = tmp_path_factory.mktemp("split")
    tok = make_tokenizer(work / "tok")
    texts = [" ".join(LINES[i % 5].split()[: 2 + i % 4]) for i in range(400)]
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = work / "corpus_text_document"
    proc = subprocess.run([sys.executable, "-m", "mbridge", "data", "preprocess", "--input",
                           str(work / "docs.jsonl"), "--tokenizer", str(tok), "--output-prefix",
                           str(prefix), "--append-eod", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "400 documents" in proc.stdout, proc.stderr
    return work, prefix


TRAIN = ["--recipe", "tiny_llama_pretrain", "train.train_iters=4", "logging.log_interval=1",
         "train.eval_interval=4", "logging.tensorboard=false", "logging.progress_bar=false",
         "data.mock=false"]


@pytest.mark.slow
def test_default_split_on_a_small_dataset_trains(corpus):
    work, prefix = corpus
    train_cli(*TRAIN, f"data.blend=[{prefix}]", f"logging.output_dir={work}/run", cwd=work,
              timeout=180)  # the default data.split=969,30,1: a hang fails here
    assert [s for s, _ in logged_losses(work / "run")] == [1, 2, 3, 4]
    logged = (work / "run" / "metrics.jsonl").read_text()
    assert '"val_loss"' in logged


@pytest.mark.slow
def test_a_split_the_run_reads_with_no_documents_exits_2(corpus):
    work, prefix = corpus
    proc = train_cli(*TRAIN, f"data.blend=[{prefix}]", "data.split=999,1,0",
                     f"logging.output_dir={work}/bad", cwd=work, timeout=180, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.split='999,1,0' gives the validation split 0 of the "
                           "400 documents of") and "data.split=98,2,0" in last
    assert "Traceback" not in proc.stderr and not (work / "bad").exists()
