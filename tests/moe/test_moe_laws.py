"""Laws of the pure MoE core, over generated MoE specs and seeds (hypothesis), real tensors:

- mappings invert: ``to_mcore(to_hf(t)) == t`` and ``to_hf(to_mcore(h)) == h`` bit for bit,
  per-expert and stacked HF layouts alike, for every MoE architecture;
- the stacked layout is transformers' fused one: ``gate_up_proj[e] == cat(gate_e, up_e)``
  (``MergeModulelist`` + ``Concatenate`` in transformers/conversion_mapping.py);
- sharding commutes with the mappings over (expert-)tensor-parallel ranks, so each rank can
  read only its slices of HF tensors (and rows of stacked ones) and convert locally;
- expert placement: EP ranks hold disjoint contiguous blocks covering every expert;
- shard/unshard, stack/unstack, interleave/deinterleave, grouped/sequential names invert;
- ``coverage`` reads every stored tensor exactly once and names what is missing, left over
  or read twice.
"""

import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mbridge.architectures import registry
from mbridge.architectures.moe import deinterleave, interleave
from mbridge.keys import grouped_key, sequential_key
from mbridge.mappings.stacked import (
    coverage,
    index_key,
    restack,
    split_index,
    stack,
    stack_tree,
    stacked_counts,
    unstack,
    unstack_tree,
)
from mbridge.sharding import shard, unshard
from mbridge.sharding.expert import expert_placement, local_experts, split_of
from mbridge.sharding.layout import Layout
from mbridge.specs import ParallelSpec, RankSpec
from mbridge.testing import (
    MOE_ARCHITECTURES,
    check_commutes_with_sharding,
    check_declared_keys,
    check_mcore_round_trip,
    check_round_trip,
    groups_of,
    hf_trees,
    mcore_trees,
    moe_specs,
    trees_equal,
)

SETTINGS = settings(max_examples=25, deadline=None)
STACKABLE = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
             "DeepseekV3ForCausalLM")


def pick(tree: dict, keys) -> dict:
    return {k: tree[k] for k in keys}


def options(arch: str, stacked: bool) -> dict:
    return {"stacked": stacked} if arch in STACKABLE else {}


@SETTINGS
@given(st.data(), moe_specs(), st.booleans())
def test_mappings_invert(data, spec, stacked):
    groups = groups_of(spec, **options(spec.architecture, stacked))
    mcore = data.draw(mcore_trees(spec, groups))
    check_mcore_round_trip(groups, mcore)
    hf = {k: v for g in groups for k, v in g.to_hf(pick(mcore, g.mcore_keys)).items()}
    check_declared_keys(groups, hf)
    check_round_trip(groups, hf)
    check_round_trip(groups, data.draw(hf_trees(spec, groups)))


@SETTINGS
@given(st.data(), moe_specs().filter(lambda s: s.architecture in STACKABLE))
def test_stacked_is_transformers_fused_layout(data, spec):
    """The same mcore experts give per-expert HF tensors and stacked ones; stacked rows are
    [gate; up] as transformers fuses them, and stacking all rows gives [experts, ...]."""
    per_expert = groups_of(spec, stacked=False)
    stacked = groups_of(spec, stacked=True)
    flat, rows = {}, {}
    mcore = data.draw(mcore_trees(spec, per_expert))
    for a, b in zip(per_expert, stacked, strict=True):
        assert set(a.mcore_keys) == set(b.mcore_keys)
        flat.update(a.to_hf(pick(mcore, a.mcore_keys)))
        rows.update(b.to_hf(pick(mcore, b.mcore_keys)))
    fused = stack_tree(rows)
    names = {"MixtralForCausalLM": ("w1", "w3", "w2")}.get(
        spec.architecture, ("gate_proj", "up_proj", "down_proj"))
    sparse = "block_sparse_moe" if spec.architecture == "MixtralForCausalLM" else "mlp"
    for i in (i for i in range(spec.num_layers) if spec.moe.is_moe_layer(i)):
        gate_up = fused[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        down = fused[f"model.layers.{i}.mlp.experts.down_proj"]
        e = f"model.layers.{i}.{sparse}.experts.{{}}.{{}}.weight"
        assert gate_up.shape == (spec.moe.num_experts, 2 * spec.moe.ffn_hidden_size,
                                 spec.hidden_size)
        assert torch.equal(gate_up, torch.stack([
            torch.cat([flat[e.format(x, names[0])], flat[e.format(x, names[1])]])
            for x in range(spec.moe.num_experts)]))
        assert torch.equal(down, torch.stack([flat[e.format(x, names[2])]
                                              for x in range(spec.moe.num_experts)]))


def split_sizes():
    return st.sampled_from([2, 4])


@SETTINGS
@given(st.data(), split_sizes(), st.booleans())
def test_sharding_commutes_with_mappings(data, size, stacked):
    """Slicing HF tensors for a rank then converting equals converting then slicing, on every
    rank: TP of ``size`` for dense tensors, expert-TP of 1 or ``size`` for expert tensors."""
    spec = data.draw(moe_specs(split=size))
    etp = data.draw(st.sampled_from([1, size]))
    groups = groups_of(spec, **options(spec.architecture, stacked))
    check_commutes_with_sharding(groups, data.draw(hf_trees(spec, groups)), size, etp)


@given(st.integers(1, 6), st.sampled_from([1, 2, 4, 8]))
def test_expert_placement_blocks(per_rank, ep):
    experts = per_rank * ep
    held = {r: [] for r in range(ep)}
    for e in range(experts):
        key = f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc1.weight"
        r, local = expert_placement(key, experts, ep)
        j = int(local.split("local_experts.")[1].split(".")[0])
        assert local == key.replace(f"local_experts.{e}.", f"local_experts.{j}.")
        assert r * per_rank + j == e and 0 <= j < per_rank
        held[r].append(e)
    assert all(held[r] == list(local_experts(experts, ep, r)) for r in range(ep))
    assert expert_placement("decoder.layers.0.mlp.router.weight", experts, ep) == \
        (None, "decoder.layers.0.mlp.router.weight")


def test_expert_placement_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by expert parallel size 3"):
        expert_placement("d.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", 4, 3)
    with pytest.raises(ValueError, match="expert 9 is outside"):
        expert_placement("d.layers.0.mlp.experts.local_experts.9.linear_fc1.weight", 4, 2)


def test_split_of_picks_the_expert_group():
    parallel, rank = ParallelSpec(tp=4, etp=2), RankSpec(tp=3, etp=1)
    assert split_of(Layout(dim=0, expert=True), parallel, rank) == (2, 1)
    assert split_of(Layout(dim=0), parallel, rank) == (4, 3)


EXPERT_LAYOUTS = [Layout(dim=0, parts=2, expert=True), Layout(dim=1, expert=True),
                  Layout(dim=0, expert=True), Layout()]


@SETTINGS
@given(st.sampled_from(EXPERT_LAYOUTS), st.sampled_from([1, 2, 4]), st.integers(1, 3),
       st.integers(0, 2**16))
def test_expert_shard_unshard(layout, size, k, seed):
    t = torch.randn(4 * size * k, 2 * size * k, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unshard([shard(t, layout, size, r) for r in range(size)], layout), t)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**16))
def test_stack_and_interleave_invert(experts, width, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(experts, 3, 2 * width, generator=gen)
    assert torch.equal(stack(unstack(t)), t)
    assert torch.equal(interleave(deinterleave(t)), t)
    assert torch.equal(deinterleave(t), torch.cat([t[..., 0::2], t[..., 1::2]], -1))
    tree = {"a.gate_up_proj": t, "a.norm": t[0, 0]}
    rows = unstack_tree(tree, ["a.gate_up_proj"])
    assert sorted(rows) == ["a.gate_up_proj" + f"[{e}]" for e in range(experts)] + ["a.norm"]
    assert trees_equal(stack_tree(rows), tree)
    pairs = list(rows.items())
    random.Random(seed).shuffle(pairs)  # rows may arrive in any order
    assert trees_equal(dict(restack(pairs, stacked_counts(rows))), tree)


def test_restack_rejects_incomplete_and_repeated_rows():
    with pytest.raises(ValueError, match="incomplete"):
        list(restack([("x[0]", torch.ones(1))], {"x": 2}))
    with pytest.raises(ValueError, match="came twice"):
        list(restack([("x[0]", torch.ones(1))] * 2, {"x": 3}))
    assert split_index(index_key("m.down_proj", 7)) == ("m.down_proj", 7)
    assert split_index("m.down_proj") == ("m.down_proj", None)


@given(st.integers(0, 300), st.sampled_from(["weight", "bias"]), st.sampled_from([1, 2]))
def test_grouped_names_invert(expert, kind, fc):
    seq = f"decoder.layers.4.mlp.experts.local_experts.{expert}.linear_fc{fc}.{kind}"
    grouped = f"decoder.layers.4.mlp.experts.linear_fc{fc}.{kind}{expert}"
    assert grouped_key(seq) == grouped and sequential_key(grouped) == seq
    other = "decoder.layers.4.mlp.router.weight"
    assert grouped_key(other) == other == sequential_key(other)


@SETTINGS
@given(st.data(), moe_specs(), st.booleans())
def test_coverage_is_exact_and_finds_leftovers(data, spec, stacked):
    groups = groups_of(spec, **options(spec.architecture, stacked))
    keys = [k for g in groups for k in g.hf_keys]
    hf = data.draw(hf_trees(spec, groups))
    stored = {k: tuple(v.shape) for k, v in stack_tree(hf).items()}
    assert coverage(keys, stored).exact
    expert_keys = [k for k in keys if ".experts." in k]
    assume(expert_keys)  # not every drawn spec has an MoE layer
    dropped = [k for k in keys if k != expert_keys[-1]]
    assert not coverage(dropped, stored).exact
    assert split_index(expert_keys[-1])[0] in coverage(dropped, stored).unread
    assert coverage(keys + keys[:1], stored).repeated == (split_index(keys[0])[0],)
    extra = {**stored, "model.layers.0.mlp.experts.99.up_proj.weight": (1,)}
    assert coverage(keys, extra).unread == ("model.layers.0.mlp.experts.99.up_proj.weight",)
    assert coverage(keys + ["model.layers.0.mlp.gone.weight"], stored).missing == (
        "model.layers.0.mlp.gone.weight",)


def test_every_moe_architecture_is_registered():
    assert set(MOE_ARCHITECTURES) <= set(registry.supported())
