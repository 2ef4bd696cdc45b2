"""``tiny_llama_finetune`` on real Megatron-Core over gloo on CPU, from a tiny HF model and
SFT JSONL (prompt/completion and chat records mixed) written here:

- DP=2, TP=2 and PP=2 give TP=1's per-step losses (the loss is the sum of token losses over
  the loss tokens of the whole global batch, whatever the layout: answers of different
  lengths on different ranks would make a mean of means differ);
- starting from the same weights as a distributed checkpoint (``mbridge convert import``,
  and the same without its HF files, as Megatron-LM saves one) gives the HF start's losses
  bit for bit;
- resume is exact: 10 steps straight == 5 + checkpoint + a new launch resuming for 5, bit for
  bit in losses and final weights;
- a validation loss is reported at the eval interval and falls;
- packed rows (``data.sft.pack`` or ``mbridge data pack`` files) train alike at TP=1, TP=2
  and PP=2;
- a dataset provider and a custom forward step are used when given;
- bad SFT input stops the run before training with exit code 2 and a message naming it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dist_util import torchrun
from models import make_hf
from sft_tokenizer import make_tokenizer

from mbridge.cli import main

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "finetune_runs.py"
# fp32 on CPU: layouts differ only in summation order (as tests/train/test_train_dist.py)
RTOL = 1e-5
QA = [("what is the capital of france ?", "paris ."), ("what is the capital of germany ?",
      "berlin"), ("what is the capital of italy ?", "rome"), ("two plus two ?", "four"),
      ("what color is the sky ?", "blue ! the sky is blue ."), ("hello", "hi there"),
      ("what color is grass ?", "green"), ("how are you ?", "fine thanks , how are you ?")]


def write_data(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (q, a) in enumerate(QA * 3):
        if i % 2:
            records.append({"input": q, "output": a})
        else:
            records.append({"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]})
    (root / "training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "validation.jsonl").write_text("".join(
        json.dumps({"input": q, "output": a}) + "\n" for q, a in QA))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mbridge.offline import import_hf

    work = tmp_path_factory.mktemp("finetune")
    hf = work / "hf"
    make_hf("llama", hf)
    make_tokenizer(hf, "plain")
    mcore = work / "mcore"
    import_hf(hf, mcore)
    mlm = work / "mlm"  # what Megatron-LM saves: no hf/ and no mbridge.json
    shutil.copytree(mcore, mlm)
    shutil.rmtree(mlm / "hf")
    (mlm / "mbridge.json").unlink()
    root = write_data(work / "data")
    ckpt = work / "ckpt"
    out = {}
    packed = work / "packed"
    assert main(["data", "pack", "--dataset-root", str(root), "--tokenizer", str(hf),
                 "--seq-length", "64", "--output", str(packed)]) == 0
    args = (str(work), str(hf), str(root))
    pack = "train.micro_batch_size=1;data.sft.pack=true"
    ref = torchrun(SCRIPT, *args, "tp1:", "custom:", f"packed-tp1:{pack}",
                   f"packed-file:train.micro_batch_size=1;data.dataset_root={packed}", nproc=1)
    many = torchrun(SCRIPT, *args, "dp2:", "tp2:model.tensor_model_parallel_size=2",
                    "pp2:model.pipeline_model_parallel_size=2",
                    f"mcore-tp2:model.tensor_model_parallel_size=2;"
                    f"checkpoint.pretrained_checkpoint={mcore}",
                    f"mlm-tp2:model.tensor_model_parallel_size=2;"
                    f"checkpoint.pretrained_checkpoint={mlm};model.hf_path={hf}",
                    f"first:train.exit_interval=5;checkpoint.save={ckpt}",
                    f"packed-tp2:{pack};model.tensor_model_parallel_size=2",
                    f"packed-pp2:{pack};model.pipeline_model_parallel_size=2")
    resumed = torchrun(SCRIPT, *args, f"resumed:checkpoint.load={ckpt}")
    for r in ref + many + resumed:
        out.setdefault(r["run"], []).append(r)
    return work, out


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_layouts_match_tp1(runs, layout):
    ref = runs[1]["tp1"][0]["losses"]
    assert len(ref) == 10 and ref[-1] < 0.7 * ref[0]
    for rank in runs[1][layout]:
        assert rank["losses"] == pytest.approx(ref, rel=RTOL), (layout, rank["rank"])


@pytest.mark.parametrize("layout", ["packed-tp2", "packed-pp2"])
def test_packed_training_matches_at_every_layout(runs, layout):
    """Packed rows (documents side by side, attention and positions kept inside each) train
    alike at TP=1, TP=2 and PP=2; ``mbridge data pack`` files give the rows packed at load."""
    out = runs[1]
    ref = out["packed-tp1"][0]["losses"]
    assert len(ref) == 10 and ref[-1] < 0.7 * ref[0]
    assert out["packed-file"][0]["losses"] == ref
    for rank in out[layout]:
        assert rank["losses"] == pytest.approx(ref, rel=RTOL), (layout, rank["rank"])


def test_distributed_checkpoint_start_equals_hf_start(runs):
    """mbridge's distributed checkpoint, and one without its HF files (Megatron-LM's; the HF
    config from model.hf_path), start where the HF directory does: same losses and weights,
    bit for bit."""
    out = runs[1]
    for hf, mcore, mlm in zip(out["tp2"], out["mcore-tp2"], out["mlm-tp2"]):
        assert mcore["losses"] == hf["losses"] == mlm["losses"]
        assert mcore["digest"] == hf["digest"] == mlm["digest"]


def test_exact_resume(runs):
    out = runs[1]
    for straight, first, resumed in zip(out["dp2"], out["first"], out["resumed"]):
        assert first["step"] == 5 and first["losses"] == straight["losses"][:5]
        assert resumed["losses"] == straight["losses"][5:]  # bit for bit
        assert resumed["step"] == 10 and resumed["digest"] == straight["digest"]


def test_validation_loss_is_reported(runs):
    val = runs[1]["tp1"][0]["val"]
    assert [s for s, _ in val] == [5, 10]
    assert val[1][1] < val[0][1]
    for rank in runs[1]["tp2"]:
        assert [s for s, _ in rank["val"]] == [5, 10]
        assert rank["val"][1][1] == pytest.approx(val[1][1], rel=RTOL)


def test_dataset_provider_and_forward_step_are_used(runs):
    work, out = runs
    ref, custom = out["tp1"][0], out["custom"][0]
    assert custom["provided"] == [str(work / "hf")]  # asked once, with the tokenizer's dir
    assert ref["provided"] == []
    # same weights and data at step 1: the custom step's loss is exactly twice the default's
    assert custom["losses"][0] == pytest.approx(2 * ref["losses"][0], rel=1e-6)


def _train(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "mbridge.train", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_bad_sft_input_exits_2_before_training(runs, tmp_path):
    work, _ = runs
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "training.jsonl").write_text('{"input": "hi", "output": "hello"}\n{"oops": 1}\n')
    base = ["--recipe", "tiny_llama_finetune", f"checkpoint.pretrained_checkpoint={work}/hf",
            f"logging.output_dir={tmp_path}/logs"]
    proc = _train(*base, f"data.dataset_root={bad}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training.jsonl:2: record has none of" in proc.stderr
    proc = _train(*base, f"data.dataset_root={tmp_path}/missing", cwd=tmp_path)
    assert proc.returncode == 2 and "no training.jsonl there" in proc.stderr
    proc = _train("--recipe", "tiny_llama_finetune", f"data.dataset_root={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and "set exactly one of model.hf_path" in proc.stderr
    proc = _train("--recipe", "tiny_llama_finetune", f"data.dataset_root={bad}",
                  f"checkpoint.pretrained_checkpoint={work}/mlm", cwd=tmp_path)
    assert proc.returncode == 2 and "set model.hf_path to a directory" in proc.stderr
