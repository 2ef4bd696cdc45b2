"""Training Qwen2.5-VL on CPU through ``python -m mbridge.train`` (real Megatron-Core over
gloo, real processes): ``tiny_qwen25vl_pretrain`` on caption records with one or two PNG
images each, of different sizes and aspect ratios (each image its own grid).

- the first step's loss is transformers' cross entropy over the text tokens only, within
  1e-5 relative (fp32; the per-token sums add in another order);
- only the patch merger (the vision projection) trains: the rest of the tower and the
  language model come out bit-identical;
- TP=2 and PP=2 (the tower on the first stage) give TP=1's losses (1e-5 relative:
  tensor-parallel sums reorder float32 adds);
- stopped after step 3 and resumed in a new launch, the losses are the straight run's;
- bad input exits 2 before a model is built, naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import logged_losses, train_cli
from qwen_models import expand, make_dataset
from test_llava_training import tensors

from mbridge.cli import main

pytestmark = pytest.mark.slow  # every test launches training runs

RECIPE = "tiny_qwen25vl_pretrain"


@pytest.fixture(scope="module")
def work(qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_dataset(root / "caption", samples=8, seed=1)
    return qwen[0], root / "caption"


def pretrain(hf_dir: Path, data: Path, out: Path, *extra: str, nproc: int = 1,
             check: bool = True):
    return train_cli("--recipe", RECIPE, f"model.hf_path={hf_dir}",
                     f"data.dataset_root={data}", f"logging.output_dir={out}", *extra,
                     nproc=nproc, check=check)


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    pretrain(*work, out, f"checkpoint.save={out / 'ckpt'}")
    return out, logged_losses(out)


def hf_first_step_loss(hf_dir: Path, data: Path, samples: int = 4) -> float:
    """Token-weighted cross entropy of transformers' model over the first global batch,
    image placeholders left out (the EOS the data appends scored)."""
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(hf_dir)
    images = AutoImageProcessor.from_pretrained(hf_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    image = model.config.image_token_id
    total, count = 0.0, 0
    for line in data.read_text().splitlines()[:samples]:
        r = json.loads(line)
        vis = images(images=[Image.open(data.parent / p).convert("RGB") for p in r["images"]],
                     return_tensors="pt")
        grids = [tuple(g) for g in vis["image_grid_thw"].tolist()]
        ids = torch.tensor([expand(tok(r["text"])["input_ids"], grids, image)
                            + [tok.eos_token_id]])
        with torch.no_grad():
            logits = model.eval()(input_ids=ids, mm_token_type_ids=(ids == image).int(),
                                  **vis).logits[0, :-1]
        labels = ids[0, 1:].clone()
        labels[labels == image] = -100
        loss = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum",
                                                 ignore_index=-100)
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / count


def test_loss_is_hf_loss_and_only_the_merger_trains(work, reference, tmp_path):
    hf_dir, data = work
    out, losses = reference
    assert [s for s, _ in losses] == list(range(1, 7)) and losses[-1][1] < losses[0][1]
    assert losses[0][1] == pytest.approx(hf_first_step_loss(hf_dir, data / "training.jsonl"),
                                         rel=1e-5)
    assert main(["convert", "export", "--mcore", str(out / "ckpt"), "--out",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    src, dst = tensors(hf_dir), tensors(tmp_path / "hf")
    assert sorted(src) == sorted(dst)
    moved = {k for k in src if not torch.equal(src[k], dst[k])}
    assert moved and all(k.startswith("visual.merger.") for k in moved)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes()


@pytest.mark.parametrize("layout", ["model.tensor_model_parallel_size=2",
                                    "model.pipeline_model_parallel_size=2"])
def test_tp2_and_pp2_give_tp1_losses(layout, work, reference, tmp_path):
    """PP=2: the second stage rotates by the 3-D positions it computes from the batch's
    tokens and grids."""
    pretrain(*work, tmp_path, layout, nproc=2)
    got, want = logged_losses(tmp_path), reference[1]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_resume_is_exact(work, reference, tmp_path):
    """Stopped after step 3 and resumed in a new launch: steps 4-6 log the straight run's
    losses exactly."""
    ckpt = tmp_path / "ckpt"
    pretrain(*work, tmp_path / "a", f"checkpoint.save={ckpt}", "train.exit_interval=3")
    assert [s for s, _ in logged_losses(tmp_path / "a")] == [1, 2, 3]
    pretrain(*work, tmp_path / "b", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    assert logged_losses(tmp_path / "b") == reference[1][3:]

def _two_tokens_one_image(hf, data):
    lines = (data / "training.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["text"] = "<|image_pad|> " + record["text"]
    (data / "training.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")


def _processor_merges_otherwise(hf, data):
    cfg = json.loads((hf / "preprocessor_config.json").read_text())
    cfg["merge_size"] = 1  # 4x the tokens the tower's 2x2 merger makes
    (hf / "preprocessor_config.json").write_text(json.dumps(cfg))


def _processor_patches_otherwise(hf, data):
    cfg = json.loads((hf / "preprocessor_config.json").read_text())
    cfg["patch_size"] = 2
    (hf / "preprocessor_config.json").write_text(json.dumps(cfg))


def _no_processor(hf, data):
    (hf / "preprocessor_config.json").unlink()


def _unknown_act(hf, data):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "swish2"
    (hf / "config.json").write_text(json.dumps(cfg))


BAD = {"image tokens vs images": (_two_tokens_one_image,
                                  "image token(s) '<|image_pad|>' for 1"),
       "image tokens vs features": (_processor_merges_otherwise,
                                    "image tokens (id 7) for 1 image(s) of 4 features"),
       "patches vs tower": (_processor_patches_otherwise,
                            "the image processor gives patches of 24 values"),
       "no processor files": (_no_processor, "holds no processor_config.json or "
                                             "preprocessor_config.json"),
       "unsupported vision config": (_unknown_act,
                                     "vision_config.hidden_act='swish2' is not supported")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_before_building(case, work, tmp_path):
    hf_dir, data = work
    shutil.copytree(hf_dir, tmp_path / "hf")
    shutil.copytree(data, tmp_path / "data")
    corrupt, message = BAD[case]
    corrupt(tmp_path / "hf", tmp_path / "data")
    proc = pretrain(tmp_path / "hf", tmp_path / "data", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "step 1" not in proc.stdout
