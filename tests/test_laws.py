"""Laws of the pure core, over generated specs (hypothesis): exact round trips, inverse op
pairs, declared keys, and mapping/sharding commuting (what lets import read only slices)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.mappings.ops import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from mbridge.sharding.layout import COLUMN, GATED_COLUMN, ROW, shard, unshard, vocab_layout
from mbridge.sharding.plan import layer_placement
from mbridge.specs import check_model_fits
from mbridge.testing import (
    check_commutes_with_sharding,
    check_declared_keys,
    check_mcore_round_trip,
    check_round_trip,
    groups_of,
    hf_shapes,
    hf_trees,
    layouts,
    mcore_trees,
    model_specs,
    moe_specs,
    tp_sizes,
)

SETTINGS = settings(max_examples=40, deadline=None)


def spec_and(strategy):
    """``(spec, draw)`` pairs: a dense spec and a value ``strategy(spec)`` draws for it."""
    return model_specs().flatmap(lambda s: st.tuples(st.just(s), strategy(s)))


@SETTINGS
@given(spec_and(hf_trees))
def test_to_hf_inverts_to_mcore_bit_for_bit(spec_tree):
    spec, tree = spec_tree
    check_round_trip(groups_of(spec), tree)


@SETTINGS
@given(spec_and(mcore_trees))
def test_to_mcore_inverts_to_hf_bit_for_bit(spec_tree):
    spec, tree = spec_tree
    check_mcore_round_trip(groups_of(spec), tree)


@SETTINGS
@given(spec_and(hf_trees))
def test_keys_read_and_written_are_the_declared_keys(spec_tree):
    spec, tree = spec_tree
    check_declared_keys(groups_of(spec), tree)


@SETTINGS
@given(spec_and(lambda s: st.tuples(tp_sizes(s), hf_trees(s))))
def test_unshard_inverts_shard_and_mapping_commutes_with_sharding(spec_tp_tree):
    spec, (tp, tree) = spec_tp_tree
    check_commutes_with_sharding(groups_of(spec), tree, tp)


@SETTINGS
@given(st.data(), model_specs() | moe_specs())
def test_drawn_layouts_fit_the_spec(data, spec):
    parallel = data.draw(layouts(spec))
    check_model_fits(spec, parallel)  # raises if not
    assert len(layer_placement(spec.num_layers, parallel)) == spec.num_layers
    assert parallel.vpp is None or parallel.pp > 1
    assert spec.moe is not None or parallel.ep == parallel.etp == 1


def transformers_shape(spec, key: str) -> tuple[int, ...]:
    """HF tensor shapes of a Llama-style model, written out independently of the mappings."""
    h, d, ffn = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    table = {
        "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
        "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
        "o_proj.weight": (h, q), "q_proj.bias": (q,), "k_proj.bias": (kv,),
        "v_proj.bias": (kv,), "q_norm.weight": (d,), "k_norm.weight": (d,),
        "gate_proj.weight": (ffn, h), "up_proj.weight": (ffn, h), "down_proj.weight": (h, ffn),
    }
    return next((shape for suffix, shape in table.items() if key.endswith(suffix)), (h,))


@SETTINGS
@given(model_specs())
def test_derived_hf_shapes_are_transformers_shapes(spec):
    """``hf_trees`` derives HF shapes from the mcore shapes and ``to_hf``; they are the ones
    transformers' modules have."""
    shapes = hf_shapes(spec)
    assert shapes and all(shape == transformers_shape(spec, k) for k, shape in shapes.items())
    assert ("lm_head.weight" in shapes) != spec.tie_embeddings


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
