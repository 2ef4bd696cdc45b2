"""Issue 16, finding 7: `mbridge data preprocess` run again into an existing prefix replaced
the .bin/.idx but Megatron-Core kept using the index cache it had built beside them (keyed
by path): a smaller corpus then crashed training, a larger one trained on stale indices.
As a user would: preprocess, train, preprocess again into the same prefix, train again; the
run on the larger corpus logs exactly the losses of the same corpus under a fresh prefix."""

import json
import subprocess
import sys

import pytest
from dist_util import logged_losses, train_cli
from test_train_preprocess import LINES, make_tokenizer

pytestmark = pytest.mark.slow

TRAIN = ["--recipe", "tiny_llama_pretrain", "train.train_iters=2", "logging.log_interval=1",
         "train.eval_iters=0", "logging.tensorboard=false", "logging.progress_bar=false",
         "scheduler.lr_warmup_iters=1", "data.split=98,2,0"]


def preprocess(work, tok, name, prefix, n, shift):
    texts = [" ".join(LINES[(i + shift) % 5].split()[: 2 + (i * shift) % 4]) for i in range(n)]
    src = work / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    proc = subprocess.run([sys.executable, "-m", "mbridge", "data", "preprocess", "--input",
                           str(src), "--tokenizer", str(tok), "--output-prefix", str(prefix),
                           "--append-eod", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{n} documents" in proc.stdout, proc.stderr


def train(work, prefix, name, *extra):
    train_cli(*TRAIN, f"data.blend=[{prefix}]", f"logging.output_dir={work}/{name}", *extra,
              cwd=work)
    return logged_losses(work / name)


def test_preprocess_again_into_a_prefix_never_trains_on_stale_indices(tmp_path):
    """One explicit data.path_to_cache for every run on the prefix (preprocess cannot know it):
    the index cache's key must change with the files."""
    tok = make_tokenizer(tmp_path / "tok")
    prefix = tmp_path / "data" / "corpus_text_document"
    cache = f"data.path_to_cache={tmp_path / 'cache'}"
    preprocess(tmp_path, tok, "first", prefix, 400, 1)
    train(tmp_path, prefix, "first", cache)
    assert list((tmp_path / "cache").iterdir())  # Megatron-Core's index cache
    preprocess(tmp_path, tok, "smaller", prefix, 60, 2)
    assert len(train(tmp_path, prefix, "smaller", cache)) == 2
    preprocess(tmp_path, tok, "larger", prefix, 900, 3)
    fresh = tmp_path / "fresh" / "corpus_text_document"
    preprocess(tmp_path, tok, "larger", fresh, 900, 3)
    assert train(tmp_path, prefix, "larger", cache) == train(tmp_path, fresh, "fresh")
    # the default cache (PREFIX/cache/) of the files preprocess replaces goes with them
    assert list((fresh / "cache" / "GPTDataset_indices").iterdir())
    preprocess(tmp_path, tok, "again", fresh, 50, 4)
    assert not fresh.exists()
