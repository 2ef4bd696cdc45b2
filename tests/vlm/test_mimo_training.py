"""Training tiny LLaVA with a layout per module (``model.module_parallelisms``: MIMO) at two
ranks through ``torchrun -m mbridge.train`` (real Megatron-Core over gloo, real processes),
against the one-rank run of the same recipe:

- homogeneous (both modules TP=2: the one-layout path);
- heterogeneous: the vision module (CLIP tower + projector) on rank 0, the language model on
  rank 1; embeddings sent forward, their gradients back; with the tower frozen (the projector
  trains on rank 0) and with the tower training;
- colocated fan-in: vision TP=1 DP=2 (each rank encodes half the batch), language TP=2 DP=1
  (both ranks need every embedding); fan-out: vision TP=2 DP=1, language TP=1 DP=2 (with
  evaluation, which the same plan feeds).

At four ranks: homogeneous TP=2 x DP=2; colocated fan-in (images TP=1 DP=4, language TP=2
DP=2) and fan-out (images TP=2 DP=2, language TP=1 DP=4); heterogeneous with the images on
ranks 0-1 (DP=2) and the language model on ranks 2-3 at TP=2 and at PP=2 (Megatron-Core's
1F1B over the module's pipeline group: embeddings into its first stage, their gradients
back from it, the loss on its last stage).

Every step's loss equals the one-rank run's within 1e-5 relative (fp32: tensor-parallel sums
and batched image encodings reorder float32 adds; seen: 4e-8), and so does the gradient norm
over all modules together (1e-5). The unfrozen tower's losses differ from the frozen one's
after the first update: its gradients reach it. A colocated run stopped by
``train.exit_interval`` and resumed (``checkpoint.load``) gives the straight run's losses
bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_util import logged_losses, train_cli

pytestmark = pytest.mark.slow  # every test launches training runs

HETERO = ("model.deployment_mode=heterogeneous", "model.module_parallelisms.images.rank_offset=0",
          "model.module_parallelisms.language.rank_offset=1")
FAN_IN = ("model.deployment_mode=colocated", "model.module_parallelisms.images.data_parallel=2",
          "model.module_parallelisms.language.tensor_parallel=2")
FAN_OUT = ("model.deployment_mode=colocated", "model.module_parallelisms.images.tensor_parallel=2",
           "model.module_parallelisms.language.data_parallel=2")
EVAL = ("train.eval_iters=1", "train.eval_interval=3")
HOMOGENEOUS = ("model.deployment_mode=homogeneous",
               "model.module_parallelisms.images.tensor_parallel=2",
               "model.module_parallelisms.language.tensor_parallel=2")
UNFROZEN = ("model.freeze_vision_model=false",)


@pytest.fixture(scope="module")
def work(llava, tmp_path_factory):
    from llava_models import make_dataset

    root = tmp_path_factory.mktemp("mimo")
    make_dataset(root / "instruct", samples=8, seed=2, kind="instruct")
    shutil.copy(root / "instruct" / "training.jsonl", root / "instruct" / "validation.jsonl")
    return llava[0], root / "instruct"


def finetune(work, out: Path, *extra: str, nproc: int = 1, check: bool = True):
    hf_dir, data = work
    return train_cli("--recipe", "tiny_llava_finetune",
                     f"checkpoint.pretrained_checkpoint={hf_dir}", f"data.dataset_root={data}",
                     f"logging.output_dir={out}", *extra,
                     nproc=nproc, check=check)


def metrics(out: Path) -> list[tuple[float, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]


def validation(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["val_loss"]) for r in map(json.loads, lines) if "val_loss" in r]


@pytest.fixture(scope="module")
def one_rank(work, tmp_path_factory):
    """The one-rank runs: {frozen tower: metrics, unfrozen: metrics, "validation": the
    frozen run's validation losses}."""
    out = {}
    for name, extra in (("frozen", EVAL), ("unfrozen", UNFROZEN)):
        d = tmp_path_factory.mktemp(f"ref_{name}")
        finetune(work, d, *extra)
        out[name] = metrics(d)
        if name == "frozen":
            out["validation"] = validation(d)
    return out


def assert_same(got, want):
    assert len(got) == len(want) == 6
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-5)
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-5)


@pytest.fixture(scope="module")
def fan_in_unfrozen(work, tmp_path_factory) -> Path:
    """The output directory of a two-rank colocated fan-in run, tower training."""
    d = tmp_path_factory.mktemp("fan_in_unfrozen")
    finetune(work, d, *FAN_IN, *UNFROZEN, nproc=2)
    return d


@pytest.mark.parametrize("case", ["homogeneous", "heterogeneous", "heterogeneous unfrozen",
                                  "colocated fan-in", "colocated fan-in unfrozen",
                                  "colocated fan-out"])
def test_two_ranks_give_one_rank_losses(case, work, one_rank, tmp_path, request):
    layout = {"homogeneous": HOMOGENEOUS, "heterogeneous": HETERO, "colocated fan-in": FAN_IN,
              "colocated fan-out": (*FAN_OUT, *EVAL)}[case.removesuffix(" unfrozen")]
    unfrozen = case.endswith("unfrozen")
    if case == "colocated fan-in unfrozen":  # the resume test's straight run
        tmp_path = request.getfixturevalue("fan_in_unfrozen")
    else:
        finetune(work, tmp_path, *layout, *(UNFROZEN if unfrozen else ()), nproc=2)
    got = metrics(tmp_path)
    assert_same(got, one_rank["unfrozen" if unfrozen else "frozen"])
    assert [s for s, _ in logged_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    if case == "colocated fan-out":  # evaluation runs through the same plan
        got, want = validation(tmp_path), one_rank["validation"]
        assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_unfrozen_tower_trains(one_rank):
    frozen, unfrozen = one_rank["frozen"], one_rank["unfrozen"]
    assert [f[0] for f in frozen[:2]] == [u[0] for u in unfrozen[:2]]  # lr 0 at step 1
    assert unfrozen[0][1] > frozen[0][1]  # the tower's gradients add to the norm
    assert abs(frozen[2][0] - unfrozen[2][0]) > 1e-4


M = "model.module_parallelisms"
FOUR = {  # four ranks (gloo), each against the one-rank run of the same recipe settings
    "homogeneous tp2 dp2": ("model.deployment_mode=homogeneous", f"{M}.images.tensor_parallel=2",
                            f"{M}.images.data_parallel=2", f"{M}.language.tensor_parallel=2",
                            f"{M}.language.data_parallel=2"),
    # images TP=1 DP=4 into language TP=2 DP=2
    "colocated fan-in": ("model.deployment_mode=colocated", f"{M}.images.data_parallel=4",
                         f"{M}.language.tensor_parallel=2", f"{M}.language.data_parallel=2"),
    # images TP=2 DP=2 out to language TP=1 DP=4: one sample per language replica
    "colocated fan-out": ("model.deployment_mode=colocated", f"{M}.images.tensor_parallel=2",
                          f"{M}.images.data_parallel=2", f"{M}.language.data_parallel=4",
                          "train.micro_batch_size=1"),
    # images on ranks 0-1 (DP=2), language on ranks 2-3
    "heterogeneous language tp2": (*HETERO[:2], f"{M}.images.data_parallel=2",
                                   f"{M}.language.rank_offset=2",
                                   f"{M}.language.tensor_parallel=2"),
    "heterogeneous language pp2": (*HETERO[:2], f"{M}.images.data_parallel=2",
                                   f"{M}.language.rank_offset=2",
                                   f"{M}.language.pipeline_parallel=2", *EVAL),
}


@pytest.fixture(scope="module")
def one_rank_micro_1(work, tmp_path_factory):
    """The one-rank run with train.micro_batch_size=1 (the fan-out runs' setting)."""
    d = tmp_path_factory.mktemp("ref_micro_1")
    finetune(work, d, "train.micro_batch_size=1")
    return metrics(d)


@pytest.mark.parametrize("case", sorted(FOUR))
def test_four_ranks_give_one_rank_losses(case, work, one_rank, one_rank_micro_1, tmp_path):
    """torchrun --nproc-per-node 4: per-step losses and gradient norms equal the one-rank
    run's within 1e-5 relative (fp32 sums in another order); the language model's pipeline
    (PP=2, heterogeneous) also gives the one-rank validation losses."""
    finetune(work, tmp_path, *FOUR[case], nproc=4)
    want = one_rank_micro_1 if "fan-out" in case else one_rank["frozen"]
    assert_same(metrics(tmp_path), want)
    assert [s for s, _ in logged_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    if "pp2" in case:
        got, want = validation(tmp_path), one_rank["validation"]
        assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)


def test_colocated_resume_is_exact(work, fan_in_unfrozen, tmp_path, monkeypatch, capsys):
    """A colocated run (fan-in, tower training: both modules have optimizer state on both
    ranks) stopped by train.exit_interval=3 and resumed by a new launch with checkpoint.load
    gives the straight run's steps 4-6 bit for bit (losses and gradient norms); resuming at
    another layout is refused before anything is built, unless checkpoint.load_optim=false
    (weights and progress only: step 4 is the straight run's, the fresh Adam state then
    departs from it)."""
    from mbridge.train.__main__ import main

    hf_dir, data = work
    layout, ckpt = (*FAN_IN, *UNFROZEN), tmp_path / "ckpt"
    finetune(work, tmp_path / "first", *layout, f"checkpoint.save={ckpt}",
             "train.exit_interval=3", nproc=2)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    shutil.copytree(ckpt, tmp_path / "at_3")
    proc = finetune(work, tmp_path / "resumed", *layout, f"checkpoint.save={ckpt}",
                    f"checkpoint.load={ckpt}", nproc=2)
    assert f"resumed from {ckpt / 'iter_0000003'} at step 3" in proc.stdout
    straight = metrics(fan_in_unfrozen)  # launched alone
    assert metrics(tmp_path / "first") == straight[:3]
    assert metrics(tmp_path / "resumed") == straight[3:]  # exact: == on the floats
    assert [s for s, _ in logged_losses(tmp_path / "resumed")] == [4, 5, 6]
    common = ["--recipe", "tiny_llava_finetune", f"checkpoint.pretrained_checkpoint={hf_dir}",
              f"data.dataset_root={data}", f"checkpoint.load={tmp_path / 'at_3'}", *UNFROZEN]
    for world, extra, message in (
            ("2", FAN_OUT, "its optimizer state is per rank: resume at the saved"),
            ("1", (), "holds a MIMO checkpoint")):
        monkeypatch.setenv("WORLD_SIZE", world)
        assert main([*common, *extra, "--print-config"]) == 2
        assert message in capsys.readouterr().err
    finetune(work, tmp_path / "weights_only", *FAN_OUT, *UNFROZEN,
             f"checkpoint.load={tmp_path / 'at_3'}", "checkpoint.load_optim=false", nproc=2)
    got = metrics(tmp_path / "weights_only")
    assert got[0] == pytest.approx(straight[3], rel=1e-5)
    assert abs(got[1][0] - straight[4][0]) > 1e-4


@pytest.mark.parametrize("extra, message", [
    (("model.deployment_mode=colocated", "model.module_parallelisms.images.data_parallel=2",
      "model.module_parallelisms.language.pipeline_parallel=2"),
     "colocated mode needs pipeline_parallel=1 for every module"),
    (("model.deployment_mode=heterogeneous", "model.module_parallelisms.images.rank_offset=0",
      "model.module_parallelisms.language.rank_offset=0"),
     "modules 'images' and 'language' both hold rank 0"),
    ((*FAN_IN, "train.global_batch_size=3", "train.micro_batch_size=1"),
     "global batch size 3 is not divisible by module 'images''s data_parallel=2"),
])
def test_bad_layout_exits_2_naming_the_fix(extra, message, work, tmp_path):
    proc = finetune(work, tmp_path, *extra, nproc=2, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "step 1" not in proc.stdout


def tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_frozen_tower_comes_out_bit_identical(work, tmp_path):
    """A heterogeneous run's checkpoint is an HF directory, one file per module, each
    written by its module's rank: the frozen tower equal to the source, bit for bit."""
    import torch

    finetune(work, tmp_path, *HETERO, f"checkpoint.save={tmp_path / 'ckpt'}", nproc=2)
    out = tmp_path / "ckpt" / "iter_0000006"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-images.safetensors", "model-language.safetensors"]
    src, dst = tensors(work[0]), tensors(out)
    assert sorted(src) == sorted(dst)
    vision = [k for k in src if k.startswith("vision_tower.")]
    assert len(vision) == 55 and all(torch.equal(src[k], dst[k]) for k in vision)
    for prefix in ("language_model.", "multi_modal_projector."):
        assert any(not torch.equal(src[k], dst[k]) for k in src if k.startswith(prefix))
    for name in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (work[0] / name).read_bytes()


def test_checkpoint_is_the_one_rank_model_and_loads_at_other_layouts(work, tmp_path):
    """The trained model (tower training) of a heterogeneous run equals the one-rank run's
    export within 1e-5 (six Adam steps over float32 sums in another order; seen 6e-7), and
    starts a one-rank run and a colocated run at the same loss (1e-5 relative)."""
    from mbridge.cli import main

    finetune(work, tmp_path / "het", *HETERO, *UNFROZEN,
             f"checkpoint.save={tmp_path / 'het_ckpt'}", nproc=2)
    finetune(work, tmp_path / "one", *UNFROZEN, f"checkpoint.save={tmp_path / 'one_ckpt'}")
    assert main(["convert", "export", "--mcore", str(tmp_path / "one_ckpt"), "--out",
                 str(tmp_path / "one_hf"), "--quiet"]) == 0
    got, want = tensors(tmp_path / "het_ckpt" / "iter_0000006"), tensors(tmp_path / "one_hf")
    assert sorted(got) == sorted(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in got) < 1e-5
    hf_dir, data = work
    ckpt = tmp_path / "het_ckpt" / "iter_0000006"
    first = []
    for name, extra, nproc in (("again_one", (), 1), ("again_col", FAN_IN, 2)):
        train_cli("--recipe", "tiny_llava_finetune", f"checkpoint.pretrained_checkpoint={ckpt}",
                  f"data.dataset_root={data}", f"logging.output_dir={tmp_path / name}",
                  "train.train_iters=2", *extra, nproc=nproc)
        first.append(logged_losses(tmp_path / name)[0][1])
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    assert first[0] < metrics(tmp_path / "het")[0][0]  # it starts from the trained model
