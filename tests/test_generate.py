"""Greedy generation on Megatron-Core (``mbridge generate``, ``mbridge.generation``), on CPU
with real processes:

- at TP=2 and at PP=2 the greedy continuation of a tiny random HF Llama equals
  ``transformers``' greedy ``generate`` on the same model, token for token;
- a tiny chat fine-tune memorises a handful of question/answer pairs: afterwards
  ``mbridge generate --chat`` (TP=2, from the training checkpoint) answers each question with
  its answer, and the HF model ``mbridge convert export`` writes from that checkpoint greedily
  generates the same tokens;
- bad input exits 2 with a message naming it, before any process starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import make_hf

sys.path.insert(0, str(Path(__file__).parent / "train"))
from sft_tokenizer import make_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["what is the capital of france ?", "hello how are you"]
QA = [("what is the capital of france ?", "paris ."), ("what is the capital of germany ?",
      "berlin ."), ("what is the capital of italy ?", "rome ."), ("two plus two ?", "four ."),
      ("what color is the sky ?", "the sky is blue ."), ("how are you ?", "fine thanks .")]


def mbridge(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mbridge", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def generated(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def hf_greedy(hf_dir, prompt_ids, n, eos):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen") / "hf"
    make_hf("llama", d)
    make_tokenizer(d, "plain")
    return d


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]])
def test_greedy_equals_transformers_generate(hf, layout):
    args = ["generate", "--hf", str(hf), "--max-new-tokens", "12", "--json", *layout]
    for p in PROMPTS:
        args += ["--prompt", p]
    out = generated(mbridge(*args))
    assert [o["prompt"] for o in out] == PROMPTS
    for o in out:
        assert len(o["ids"]) >= 1
        assert o["ids"] == hf_greedy(hf, o["prompt_ids"], 12, eos=3), o["prompt"]


def test_chat_finetune_memorises_and_exports(hf, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "training.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in QA))
    save = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    train = subprocess.run(
        [sys.executable, "-m", "mbridge.train", "--recipe", "tiny_llama_finetune",
         f"checkpoint.pretrained_checkpoint={hf}", f"data.dataset_root={root}",
         "train.train_iters=50", "train.global_batch_size=6", "train.eval_iters=0",
         "scheduler.lr_decay_style=constant", f"checkpoint.save={save}",
         f"logging.output_dir={tmp_path}/logs", "logging.tensorboard=false",
         "logging.progress_bar=false"], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    args = ["generate", "--mcore", str(save), "--chat", "--tp", "2", "--stop-token", "<|end|>",
            "--max-new-tokens", "10", "--json"]
    for q, _ in QA:
        args += ["--prompt", q]
    out = generated(mbridge(*args))
    assert [o["text"] for o in out] == [a for _, a in QA]
    exported = tmp_path / "exported"
    assert mbridge("convert", "export", "--mcore", str(save), "--out", str(exported),
                   "--quiet").returncode == 0
    end = 7  # <|end|>
    for o in out:
        assert o["ids"][-1] == end
        assert hf_greedy(exported, o["prompt_ids"], 10, eos=end) == o["ids"], o["prompt"]


@pytest.mark.parametrize("args,message", [
    (["--hf", "{tmp}/nothing"], "is not a directory"),
    (["--hf", "{hf}", "--tp", "3"], "not divisible"),
    (["--hf", "{hf}", "--stop-token", "<|nope|>"], "is not a token"),
    (["--hf", "{hf}", "--max-new-tokens", "0"], "must be >= 1"),
])
def test_bad_input_exits_2(hf, tmp_path, args, message, capsys):
    from mbridge.cli import main

    args = [a.format(tmp=tmp_path, hf=hf) for a in args]
    assert main(["generate", "--prompt", "hello", *args]) == 2
    assert message in capsys.readouterr().err
