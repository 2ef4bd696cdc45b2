"""The seams between building, loading and wrapping, and explicit process groups:

- ``sharding.grid`` draws the same rank groups as Megatron-Core's own ``RankGenerator``
  (hypothesis over layouts and world sizes);
- two models with different layouts live in one 4-rank world on their own groups
  (``dist.new_groups``), Megatron-Core's ``parallel_state`` never started, each matching
  the HF logits and exporting the checkpoint bit for bit;
- ``pre_wrap_hook`` runs after loading and before DDP, may add parameters no checkpoint
  holds, and those are not exported;
- ``AutoBridge.from_megatron_checkpoint`` loads an offline-converted checkpoint;
- ``import mbridge`` and opening an AutoBridge patch nothing (the CPU shim is applied only
  where the shell builds or runs a model);
- ``dist.init`` of the layout ``parallel_state`` already runs keeps its groups (no new
  gloo threads per model provided); restarted by anyone else, it starts new ones.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_util import torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from models import hf_logits, sample_ids

from mbridge import AutoBridge, offline
from mbridge.sharding import grid
from mbridge.shell import forward
from mbridge.specs import ParallelSpec

TOL = 1e-5
SCRIPTS = Path(__file__).parent / "scripts"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.sampled_from([1, 2, 3]),
       st.sampled_from([1, 2]), st.sampled_from([1, 2]))
def test_grid_matches_megatron_rank_generator(tp, pp, dp, cp, ep):
    from megatron.core.parallel_state import RankGenerator

    parallel = ParallelSpec(tp=tp, pp=pp, cp=cp)
    world = tp * pp * dp * cp
    dense = grid.dense_grid(parallel, world)
    theirs = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for mine, token in ((("tp",), "tp"), (("pp",), "pp"), (("dp",), "dp"), (("cp",), "cp"),
                        (("tp", "cp", "pp"), "tp-cp-pp"), (("dp", "cp"), "cp-dp")):
        assert grid.groups_over(dense, mine) == tuple(sorted(tuple(sorted(g))
                                                             for g in theirs.get_ranks(token)))
    if (world // pp) % ep == 0:
        experts = grid.expert_grid(parallel.replace(ep=ep, cp=1), world)
        theirs = RankGenerator(tp=1, ep=ep, dp=world // (ep * pp), pp=pp, cp=1,
                               order="tp-ep-dp-pp")
        for mine, token in ((("ep",), "ep"), (("edp",), "dp")):
            assert grid.groups_over(experts, mine) == tuple(
                sorted(tuple(sorted(g)) for g in theirs.get_ranks(token)))


def test_grid_refuses_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*cp\\*pp = 4"):
        grid.dense_grid(ParallelSpec(tp=2, pp=2), 6)
    assert grid.embedding_groups(grid.dense_grid(ParallelSpec(pp=2), 4)) == ((0, 2), (1, 3))


@pytest.mark.slow
def test_two_layouts_in_one_world(dense_models):
    rows = torchrun(SCRIPTS / "two_layouts.py", str(dense_models["llama"]), "tp=2,pp=2",
                    "tp=1", nproc=4)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["parallel_state_initialized"] is False
        a, b = r["a"], r["b"]
        assert (a["tp_rank"], a["pp_rank"], a["dp_rank"]) == (r["rank"] % 2, r["rank"] // 2, 0)
        assert (b["tp_rank"], b["pp_rank"], b["dp_rank"]) == (0, 0, r["rank"])
        for model in (a, b):
            assert model["logits_diff"] < TOL and model["exact"], model


def add_adapter(chunks):
    """A hook adding a zero LoRA-style parameter next to every fused qkv (no checkpoint
    holds it): the model's function is unchanged."""
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            qkv = layer.self_attention.linear_qkv
            qkv.register_parameter("lora_b", torch.nn.Parameter(torch.zeros(4, 4)))


def test_pre_wrap_hook_runs_after_loading_and_before_ddp(dense_models):
    model_dir = dense_models["qwen3"]
    bridge = AutoBridge.from_hf_pretrained(model_dir)
    seen = []

    def record(chunks):
        # weights are loaded already: the first layer's norm is the checkpoint's, not ones
        norm = chunks[0].decoder.layers[0].self_attention.q_layernorm.weight
        seen.append((type(chunks[0]).__name__, bool((norm != 1).any())))
        return chunks

    provider = bridge.to_megatron_provider()
    provider.register_pre_wrap_hook(record)
    model = provider.finalize().provide_distributed_model(
        wrap_with_ddp=True, pre_wrap_hook=[add_adapter, record])
    assert seen == [("GPTModel", True), ("GPTModel", True)]
    assert type(model[0]).__name__ == "DistributedDataParallel"
    names = [n for n, _ in model[0].module.named_parameters()]
    assert sum(n.endswith("lora_b") for n in names) == bridge.spec.num_layers
    ids = sample_ids(bridge.spec.vocab_size)
    got = forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                         bridge.spec.hidden_size)
    assert (got - hf_logits(model_dir, ids)).abs().max().item() < TOL
    exported = dict(bridge.export_hf_weights(model))
    assert not any("lora" in k for k in exported)


def test_from_megatron_checkpoint_loads_an_offline_conversion(dense_models, tmp_path):
    model_dir = dense_models["llama"]
    offline.import_hf(model_dir, tmp_path / "mcore")
    bridge = AutoBridge.from_megatron_checkpoint(tmp_path / "mcore")
    assert bridge.spec == AutoBridge.from_hf_pretrained(model_dir).spec
    provider = bridge.to_megatron_provider()
    model = provider.finalize().provide_distributed_model()
    ids = sample_ids(bridge.spec.vocab_size)
    got = forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                         bridge.spec.hidden_size)
    assert (got - hf_logits(model_dir, ids)).abs().max().item() < TOL
    bridge.save_hf_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


PATCHES_NOTHING = """
import sys, torch
original = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda)
import mbridge
from mbridge import AutoBridge
bridge = AutoBridge.from_hf_pretrained(sys.argv[1])
bridge.to_megatron_provider().finalize()
now = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.cuda)
print("patched" if now != original else "untouched")
"""


def test_import_and_autobridge_patch_nothing(dense_models):
    out = subprocess.run([sys.executable, "-c", PATCHES_NOTHING, str(dense_models["llama"])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "untouched"


REINIT = """
import os
from megatron.core import parallel_state as ps
from mbridge.shell import dist
from mbridge.specs import ParallelSpec

threads = lambda: len(os.listdir("/proc/self/task"))
first = dist.init(ParallelSpec())
before = threads()
again = [dist.init(ParallelSpec(vocab_multiple=m)) for m in (128, 64, 128)]
print("kept", threads() == before,
      all(g.collection.tp is first.collection.tp for g in again),
      [g.parallel.vocab_multiple for g in again])
ps.destroy_model_parallel()
fresh = dist.init(ParallelSpec())
print("restarted", fresh.collection.tp is not first.collection.tp,
      ps.get_tensor_model_parallel_group() is fresh.collection.tp)
"""


def test_init_of_the_running_layout_keeps_its_groups():
    out = subprocess.run([sys.executable, "-c", REINIT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["kept True True [128, 64, 128]", "restarted True True"]
