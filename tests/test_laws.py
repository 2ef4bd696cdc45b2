"""Laws of the pure core, over generated specs (hypothesis): exact round trips, inverse op
pairs, declared keys, and mapping/sharding commuting (what lets import read only slices)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import model_specs, random_hf_tree, tp_sizes

from mbridge.architectures import get
from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.sharding import shard_tree, unshard_tree
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, ROW, shard, unshard, vocab_layout

SETTINGS = settings(max_examples=40, deadline=None)


def trees_equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def groups_of(spec):
    return get(spec.architecture).mapping(spec)


@SETTINGS
@given(model_specs(), st.integers(0, 2**16))
def test_to_hf_inverts_to_mcore_bit_for_bit(spec, seed):
    for group in groups_of(spec):
        tree = random_hf_tree(spec, [group], seed)
        assert trees_equal(group.to_hf(group.to_mcore(tree)), tree)


@SETTINGS
@given(model_specs(), st.integers(0, 2**16))
def test_keys_read_and_written_are_the_declared_keys(spec, seed):
    groups = groups_of(spec)
    hf_all = [k for g in groups for k in g.hf_keys]
    assert len(hf_all) == len(set(hf_all)), "an HF key is read by two groups"
    for group in groups:
        tree = random_hf_tree(spec, [group], seed)
        mcore = group.to_mcore(tree)
        assert tuple(mcore) == group.mcore_keys
        assert tuple(group.to_hf(mcore)) == group.hf_keys


@SETTINGS
@given(model_specs().flatmap(lambda s: st.tuples(st.just(s), tp_sizes(s))),
       st.integers(0, 2**16))
def test_unshard_inverts_shard_and_mapping_commutes_with_sharding(spec_tp, seed):
    spec, tp = spec_tp
    for group in groups_of(spec):
        tree = random_hf_tree(spec, [group], seed)
        mcore = group.to_mcore(tree)
        shards = [shard_tree(mcore, group.mcore_layouts, tp, r) for r in range(tp)]
        assert trees_equal(unshard_tree(shards, group.mcore_layouts), mcore)
        for r in range(tp):
            local = group.to_mcore(shard_tree(tree, group.hf_layouts, tp, r))
            assert trees_equal(local, shards[r])


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 8]),
       st.integers(0, 3), st.integers(0, 2**16))
def test_qkv_pair_inverts(groups, per_group, head_dim, extra_dims, seed):
    gen = torch.Generator().manual_seed(seed)
    rest = (3,) * min(extra_dims, 1)
    q = torch.randn(groups * per_group * head_dim, *rest, generator=gen)
    k, v = (torch.randn(groups * head_dim, *rest, generator=gen) for _ in range(2))
    fused = fuse_qkv(q, k, v, head_dim)
    assert fused.shape[0] == groups * (per_group + 2) * head_dim
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, per_group, head_dim), (q, k, v)))
    # the first group's rows are its q heads, then its k, then its v
    assert torch.equal(fused[: per_group * head_dim], q[: per_group * head_dim])
    assert torch.equal(fused[per_group * head_dim: (per_group + 1) * head_dim], k[:head_dim])


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 5), st.integers(0, 2**16))
def test_gate_up_pair_inverts(ffn, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(ffn, hidden, generator=gen), torch.randn(ffn, hidden, generator=gen)
    g2, u2 = split_gate_up(fuse_gate_up(gate, up))
    assert torch.equal(g2, gate) and torch.equal(u2, up)


@SETTINGS
@given(st.sampled_from([COLUMN, ROW, GATED_COLUMN]), st.sampled_from([1, 2, 4]),
       st.integers(1, 3), st.integers(0, 2**16))
def test_unshard_inverts_shard(layout, tp, mult, seed):
    t = torch.randn(2 * tp * mult, 2 * tp * mult, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unshard([shard(t, layout, tp, r) for r in range(tp)], layout), t)


@SETTINGS
@given(st.integers(1, 700), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 8, 128]))
def test_vocab_padding_round_trip(vocab, tp, multiple):
    layout = vocab_layout(vocab, multiple)
    t = torch.arange(vocab * 2, dtype=torch.float32).reshape(vocab, 2)
    shards = [shard(t, layout, tp, r) for r in range(tp)]
    assert len({s.shape for s in shards}) == 1
    assert sum(s.shape[0] for s in shards) % (multiple * tp) == 0
    assert torch.equal(unshard(shards, layout), t)
    assert torch.cat(shards)[vocab:].abs().sum() == 0  # padding rows are zero


def test_te_names_invert():
    from mbridge.keys import local_key, te_key

    for key in ("decoder.layers.3.input_layernorm.weight",
                "decoder.layers.0.pre_mlp_layernorm.weight",
                "decoder.layers.1.self_attention.linear_qkv.weight"):
        assert local_key(te_key(key)) == key
    assert te_key("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
