"""Training LLaVA on CPU through ``python -m mbridge.train`` (real Megatron-Core over gloo,
real processes): the ``tiny_llava_*`` recipes on image-text records this test writes (PNG
images of several sizes, one or two per record, and a JSONL).

- the first step's loss is transformers' cross entropy over the text tokens only (image
  placeholders and prompts left out), within 1e-5 relative (fp32; the per-token sums add
  in another order);
- a frozen vision tower comes out of training bit-identical (the exported checkpoint's
  ``vision_tower.*`` equal the source), while what trains changed;
- TP=2 and PP=2 (the tower on the first stage) give TP=1's losses (1e-5 relative:
  tensor-parallel sums reorder float32 adds);
- a run stopped and resumed logs exactly the uninterrupted run's losses;
- bad input exits 2 before a model is built, naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import logged_losses, train_cli
from llava_models import make_dataset
from safetensors.torch import load_file

from mbridge.cli import main

pytestmark = pytest.mark.slow  # every test launches training runs

FINETUNE = "tiny_llava_finetune"


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def work(llava, tmp_path_factory):
    """The HF LLaVA and two datasets: captions and instructions."""
    root = tmp_path_factory.mktemp("train")
    make_dataset(root / "caption", samples=8, seed=1)
    make_dataset(root / "instruct", samples=8, seed=2, kind="instruct")
    return llava[0], root


def finetune(work, out: Path, *extra: str, nproc: int = 1, check: bool = True):
    hf_dir, root = work
    return train_cli("--recipe", FINETUNE, f"checkpoint.pretrained_checkpoint={hf_dir}",
                     f"data.dataset_root={root / 'instruct'}", f"logging.output_dir={out}",
                     *extra, nproc=nproc, check=check)


@pytest.fixture(scope="module")
def reference(work, tmp_path_factory):
    """An uninterrupted TP=1 fine-tune that saves its last step: (output dir, losses)."""
    out = tmp_path_factory.mktemp("ref")
    finetune(work, out, f"checkpoint.save={out / 'ckpt'}")
    return out, logged_losses(out)


def hf_first_step_loss(hf_dir: Path, data: Path, samples: int = 4) -> float:
    """Token-weighted cross entropy of transformers' LLaVA over the first global batch,
    scoring completion tokens only (and the EOS the data appends)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for line in data.read_text().splitlines()[:samples]:
        r = json.loads(line)
        images = [Image.open(data.parent / p).convert("RGB") for p in r["images"]]
        enc = proc(text=[r["prompt"]], images=images, return_tensors="pt")
        completion = proc.tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.cat([enc["input_ids"][0], torch.tensor(completion),
                         torch.tensor([proc.tokenizer.eos_token_id])]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0, :-1]
        labels = ids[0, 1:].clone()
        labels[: enc["input_ids"].shape[1] - 1] = -100  # the prompt (images included)
        loss = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum",
                                                 ignore_index=-100)
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / count


def test_loss_is_hf_loss_on_text_tokens(work, reference):
    hf_dir, root = work
    (step, loss), *_ = reference[1]
    assert step == 1
    want = hf_first_step_loss(hf_dir, root / "instruct" / "training.jsonl")
    assert loss == pytest.approx(want, rel=1e-5)


def test_frozen_vision_tower_is_bit_identical(work, reference, tmp_path):
    hf_dir, _ = work
    out, losses = reference
    assert len(losses) == 6 and losses[-1][1] < losses[0][1]
    assert main(["convert", "export", "--mcore", str(out / "ckpt"), "--out",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    src, dst = tensors(hf_dir), tensors(tmp_path / "hf")
    assert sorted(src) == sorted(dst)
    vision = [k for k in src if k.startswith("vision_tower.")]
    assert len(vision) == 55 and all(torch.equal(src[k], dst[k]) for k in vision)
    for prefix in ("language_model.", "multi_modal_projector."):  # what trained moved
        assert any(not torch.equal(src[k], dst[k]) for k in src if k.startswith(prefix))
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes()


@pytest.mark.parametrize("layout", ["model.tensor_model_parallel_size=2",
                                    "model.pipeline_model_parallel_size=2"])
def test_tp2_and_pp2_give_tp1_losses(layout, work, reference, tmp_path):
    finetune(work, tmp_path, layout, nproc=2)
    got, want = logged_losses(tmp_path), reference[1]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_resume_is_exact(work, reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    finetune(work, tmp_path / "a", f"checkpoint.save={ckpt}", "train.exit_interval=3")
    assert [s for s, _ in logged_losses(tmp_path / "a")] == [1, 2, 3]
    finetune(work, tmp_path / "b", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    resumed = logged_losses(tmp_path / "b")
    assert resumed == reference[1][3:]


def test_pretrain_recipe_trains_the_projection_only(work, tmp_path):
    hf_dir, root = work
    train_cli("--recipe", "tiny_llava_pretrain", f"model.hf_path={hf_dir}",
              f"data.dataset_root={root / 'caption'}", f"logging.output_dir={tmp_path}",
              f"checkpoint.save={tmp_path / 'ckpt'}")
    losses = logged_losses(tmp_path)
    assert len(losses) == 6 and losses[-1][1] < losses[0][1]
    assert main(["convert", "export", "--mcore", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    src, dst = tensors(hf_dir), tensors(tmp_path / "hf")
    moved = {k.split(".")[0] for k in src if not torch.equal(src[k], dst[k])}
    assert moved == {"multi_modal_projector"}


def _copy(work, tmp_path):
    hf_dir, root = work
    shutil.copytree(hf_dir, tmp_path / "hf")
    shutil.copytree(root / "instruct", tmp_path / "data")
    return tmp_path / "hf", tmp_path / "data"


def _two_tokens_one_image(hf, data):
    lines = (data / "training.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["prompt"] = "<image> <image> " + record["prompt"]
    (data / "training.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")


def _processor_counts_other_features(hf, data):
    cfg = json.loads((hf / "processor_config.json").read_text())
    cfg["patch_size"] = 8  # the processor expands each image into 4 tokens, the tower makes 16
    (hf / "processor_config.json").write_text(json.dumps(cfg))


def _no_processor(hf, data):
    (hf / "processor_config.json").unlink()


def _unsupported_strategy(hf, data):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "crop"
    (hf / "config.json").write_text(json.dumps(cfg))


def _missing_image(hf, data):
    for p in (data / "images").glob("*_0.png"):
        p.unlink()


BAD = {"image tokens vs images": (_two_tokens_one_image, "image token(s) '<image>' for 1"),
       "image tokens vs features": (_processor_counts_other_features,
                                    "image tokens (id 4) for 1 image(s) of 16 features"),
       "no processor files": (_no_processor, "holds no processor_config.json or "
                                             "preprocessor_config.json"),
       "unsupported vision config": (_unsupported_strategy,
                                     "vision_feature_select_strategy='crop' is not supported"),
       "missing image": (_missing_image, "No such file")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_before_building(case, work, tmp_path):
    hf, data = _copy(work, tmp_path)
    corrupt, message = BAD[case]
    corrupt(hf, data)
    proc = train_cli("--recipe", FINETUNE, f"checkpoint.pretrained_checkpoint={hf}",
                     f"data.dataset_root={data}", f"logging.output_dir={tmp_path / 'out'}",
                     check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "step 1" not in proc.stdout
