"""Mixture-of-experts training over gloo on CPU: a tiny Qwen3-MoE started from its HF
checkpoint trains at EP=2 (two ranks, each holding half of the experts, with the expert
data-parallel optimizer) with the per-step losses of one rank holding all of them, and its
loss falls. fp32; the layouts differ only in summation order (measured: 5e-8 relative over
10 steps), so the tolerance is the dense layouts' (tests/train/test_train_dist.py)."""

from pathlib import Path

import pytest
from dist_util import torchrun

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "train_runs.py"
RTOL = 1e-5
VOCAB = "model.make_vocab_size_divisible_by=4"  # the tiny MoE vocabulary is 300


def test_expert_parallel_training_matches_one_rank(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
    from moe_models import make_hf

    make_hf("qwen3_moe", tmp_path / "hf")
    one = torchrun(SCRIPT, str(tmp_path), str(tmp_path / "hf"), f"ep1:{VOCAB}", nproc=1)
    two = torchrun(SCRIPT, str(tmp_path), str(tmp_path / "hf"),
                   f"ep2:{VOCAB};model.expert_model_parallel_size=2", nproc=2)
    ref = one[0]["losses"]
    assert len(ref) == 10 and ref[-1] < ref[0] - 0.5
    assert len(two) == 2
    for rank in two:
        assert rank["losses"] == pytest.approx(ref, rel=RTOL), rank["rank"]
    assert two[0]["digest"] != two[1]["digest"]  # each rank holds different experts


def test_fast_moe_path_trains_as_megatron_core_and_resumes(tmp_path):
    """The one-GPU MoE path through the run config, on one rank: the static-shape dispatcher
    (on by default where it serves) gives the losses of Megatron-Core's own dispatcher bit for
    bit; stacked experts with their gradients added into DDP's buffer by the backward
    (``model.moe_stacked_experts``, ``model.moe_fuse_wgrad_accumulation``) the same within
    1e-6 (the clipping norm sums per parameter, in another grouping); a stacked run stopped
    at step 5 and resumed gives the uninterrupted run's losses bit for bit; resuming its
    optimizer state unstacked is refused by name (the same elements in another order)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
    from dist_util import train_cli
    from moe_models import make_hf

    hf, ck = tmp_path / "hf", tmp_path / "ck"
    make_hf("qwen3_moe", hf)
    stacked = "model.moe_stacked_experts=true;model.moe_fuse_wgrad_accumulation=true"
    runs = torchrun(SCRIPT, str(tmp_path), str(hf),
                    f"megatron:{VOCAB};model.moe_sorted_dispatch=false",
                    f"sorted:{VOCAB}", f"stacked:{VOCAB};{stacked}",
                    f"part:{VOCAB};{stacked};train.exit_interval=5;checkpoint.save={ck};"
                    "checkpoint.save_interval=5",
                    f"rest:{VOCAB};{stacked};checkpoint.save={ck};checkpoint.load={ck}",
                    nproc=1)
    losses = {r["run"]: r["losses"] for r in runs}
    assert len(losses["megatron"]) == 10 and losses["megatron"][-1] < losses["megatron"][0]
    assert losses["sorted"] == losses["megatron"]
    assert losses["stacked"] == pytest.approx(losses["sorted"], rel=1e-6)
    assert losses["part"] + losses["rest"] == losses["stacked"]
    proc = train_cli("--recipe", "tiny_llama_pretrain", "model.spec=null",
                     f"model.hf_path={hf}", VOCAB, f"checkpoint.load={ck}",
                     "train.train_iters=12", f"logging.output_dir={tmp_path}/unstacked",
                     cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert (f"the optimizer state of {ck}/iter_0000010 was saved with "
            "model.moe_stacked_experts=true: resume with the same value, or set "
            "checkpoint.load_optim=false") in proc.stderr, proc.stderr[-2000:]


def test_stacking_experts_that_cannot_be_is_refused(tmp_path):
    """GPT-OSS's experts carry biases, which the stacked layout does not hold: asking for it
    exits 2 naming the key, before a step is taken."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "moe"))
    from dist_util import train_cli
    from moe_models import make_hf

    make_hf("gpt_oss", tmp_path / "hf")
    proc = train_cli("--recipe", "tiny_llama_pretrain", "model.spec=null",
                     f"model.hf_path={tmp_path / 'hf'}", VOCAB, "model.moe_stacked_experts=true",
                     f"logging.output_dir={tmp_path}/out", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.moe_stacked_experts=true, but the experts of" in proc.stderr
    assert "set model.moe_stacked_experts=false" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
