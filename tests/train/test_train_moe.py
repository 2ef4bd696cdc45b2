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
