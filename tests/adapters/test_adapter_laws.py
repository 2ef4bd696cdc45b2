"""Laws of the pure adapter layer (hypothesis over dense specs, adapter specs and TP sizes):
the adapter mappings round-trip bit for bit and commute with sharding; a fused adapter and
the per-projection adapters it exports to are the same update (fused <-> per-projection
transforms invert); merging on each rank's shards gives the shards of the merged weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbridge import keys
from mbridge.adapters import (
    AdapterSpec,
    dora_factor,
    fuse_fn,
    layouts,
    mapping,
    merge,
    row_norm_sq,
    selection,
    shapes,
    site_delta,
    split_fn,
)
from mbridge.adapters.mapping import weight_layout
from mbridge.adapters.merge import site_magnitude
from mbridge.architectures import registry
from mbridge.sharding import shard
from mbridge.testing import (
    assert_trees_equal,
    check_mapping,
    mcore_trees,
    model_specs,
    moe_specs,
    random_tree,
    tp_sizes,
)

ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
FUSED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
CANON = ("linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_gate", "linear_fc1_up",
         "linear_fc2")
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def adapter_specs(draw, canonical: bool | None = None):
    canonical = draw(st.booleans()) if canonical is None else canonical
    names = CANON if canonical else FUSED
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    if canonical and not set(targets) & {"linear_q", "linear_k", "linear_v",
                                         "linear_fc1_gate", "linear_fc1_up"}:
        targets.append("linear_q")  # keep it canonical
    return AdapterSpec(scheme=draw(st.sampled_from(["lora", "dora"])), target_modules=targets,
                       dim=draw(st.integers(1, 4)), alpha=draw(st.sampled_from([1.0, 8.0, 16.0])))


def _spec_and_adapter(data, canonical=None):
    spec = data.draw(model_specs(data.draw(st.sampled_from(ARCHS))))
    return spec, data.draw(adapter_specs(canonical))


def _mcore_tree(data, spec, adapter):
    groups = mapping(adapter, spec)
    return groups, data.draw(mcore_trees(spec, groups, shapes=shapes(adapter, spec)))


def _to_hf(groups, tree):
    return {k: v for g in groups for k, v in g.to_hf({k: tree[k] for k in g.mcore_keys}).items()}


def _to_mcore(groups, tree):
    return {k: v for g in groups for k, v in g.to_mcore({k: tree[k] for k in g.hf_keys}).items()}


@SETTINGS
@given(st.data())
def test_adapter_mappings_obey_every_law(data):
    """Declared keys, both round trips, sharding commutes (per-projection and fused, LoRA and
    DoRA); the HF side is what peft writes (``base_model.model.`` + module + tensor)."""
    spec, adapter = _spec_and_adapter(data)
    groups, tree = _mcore_tree(data, spec, adapter)
    hf = _to_hf(groups, tree)
    assert all(keys.peft_module(k) is not None for k in hf)
    check_mapping(groups, hf, tp_sizes=(1, data.draw(tp_sizes(spec))), mcore_tree=tree)


@SETTINGS
@given(st.data())
def test_expert_adapter_mappings_obey_every_law(data):
    """The same laws on Qwen3-MoE and Qwen2-MoE specs (dense layers among MoE layers, a shared
    expert): every expert's linear_fc1/linear_fc2 is adapted with expert layouts, named as
    peft names transformers 4's per-expert modules, and sharding over expert-TP commutes."""
    arch = data.draw(st.sampled_from(["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"]))
    spec = data.draw(moe_specs(arch, split=2))
    adapter = data.draw(adapter_specs())
    if not any(t.startswith("linear_fc") for t in adapter.target_modules):
        adapter = adapter.replace(target_modules=(*adapter.target_modules, "linear_fc2"))
    groups, tree = _mcore_tree(data, spec, adapter)
    hf = _to_hf(groups, tree)
    moe_layers = [i for i in range(spec.num_layers) if spec.moe.is_moe_layer(i)]
    experts = {(a.layer, a.expert) for a in selection(adapter, spec) if a.site.expert}
    assert experts == {(i, e) for i in moe_layers for e in range(spec.moe.num_experts)}
    assert all(".mlp.experts.local_experts." not in k for k in hf)
    for a in selection(adapter, spec):
        if a.site.expert:
            assert all(lay.expert for pair in layouts(a.site, not a.split).values()
                       for lay in pair)
            assert a.hf(0).startswith(f"model.layers.{a.layer}.mlp.experts.{a.expert}.")
    check_mapping(groups, hf, tp_sizes=(1, 2), mcore_tree=tree)


@SETTINGS
@given(st.data())
def test_fused_and_per_projection_adapters_invert(data):
    """A fused adapter exported to peft and read back per projection (canonical variant) is
    the same update of every linear (within float32 rounding), and exporting the
    per-projection adapters gives the fused export's tensors bit for bit; reading them into
    the fused variant gives the fused tree back."""
    spec = data.draw(model_specs(data.draw(st.sampled_from(ARCHS))))
    scheme = data.draw(st.sampled_from(["lora", "dora"]))
    fused = AdapterSpec(scheme=scheme, dim=data.draw(st.integers(1, 3)), alpha=8.0)
    canon = fused.replace(target_modules=CANON)
    f_groups, f_tree = _mcore_tree(data, spec, fused)
    c_groups = mapping(canon, spec)
    hf = _to_hf(f_groups, f_tree)
    c_tree = _to_mcore(c_groups, hf)
    assert_trees_equal(_to_hf(c_groups, c_tree), hf, "per-projection export differs")
    assert_trees_equal(_to_mcore(f_groups, hf), f_tree, "fused read-back differs")
    gen = torch.Generator().manual_seed(0)
    for fa, ca in zip(selection(fused, spec), selection(canon, spec), strict=True):
        weight = torch.randn(_weight_shape(spec, fa), generator=gen)
        split, fuse = split_fn(fa.site, spec), fuse_fn(fa.site, spec)
        f_delta = site_delta(weight, [_pair(f_tree, fa, None)], fused.scale, split, fuse)
        c_delta = site_delta(weight, [_pair(c_tree, ca, j) for j in range(len(ca.site.parts))],
                             canon.scale, split, fuse)
        # the same rows of B times the same A, by matmuls of other shapes: float32 rounding
        torch.testing.assert_close(c_delta, f_delta, rtol=1e-6, atol=1e-6)


def _pair(tree, a, j):
    part = None if j is None else a.part(j)
    if j is not None and j not in a.parts:
        return None
    return (tree[keys.adapter_key(a.module, part, "linear_in.weight")],
            tree[keys.adapter_key(a.module, part, "linear_out.weight")])


@SETTINGS
@given(st.data())
def test_merge_commutes_with_sharding(data):
    """On every TP rank, merging the rank's shards of W, A and B gives that rank's shard of
    the merged full weight within float32 rounding (rtol 1e-6), for DoRA with each rank's
    magnitude shard and the row norms summed over ranks (row-parallel)."""
    spec, adapter = _spec_and_adapter(data)
    tp = data.draw(tp_sizes(spec))
    groups, tree = _mcore_tree(data, spec, adapter)
    for a in selection(adapter, spec):
        key = a.module + ".weight"
        weight = random_tree({key: _weight_shape(spec, a)}, seed=a.layer)[key]
        w_layout = weight_layout(a.site)
        full = _merged(weight, tree, a, adapter, spec, tp=1, rank=0)
        for r in range(tp):
            local = _merged(shard(weight, w_layout, tp, r), _shard(tree, a, adapter, tp, r), a,
                            adapter, spec, tp=tp, rank=r, full_tree=tree, full_weight=weight)
            want = shard(full, w_layout, tp, r)
            # float32 B·A on a shard's rows and on the whole may come from different matmul
            # kernels (fused or separate multiply-adds by row count): equal to the last bit
            # or two, not always bit for bit (hypothesis found such cases); a wrong shard is
            # off by whole values
            torch.testing.assert_close(local, want, rtol=1e-6, atol=1e-6,
                                       msg=f"{key} rank {r}/{tp}")


def _weight_shape(spec, a):
    return registry.get(spec.architecture).mcore_shape(spec, a.module + ".weight")


def _shard(tree, a, adapter, tp, r):
    wl = layouts(a.site, fused=not a.split)
    out = {}
    for j in (a.parts if a.split else (None,)):
        part = None if j is None else a.part(j)
        for t in ("linear_in.weight", "linear_out.weight", "magnitude"):
            k = keys.adapter_key(a.module, part, t)
            if k in tree:
                out[k] = shard(tree[k], wl[t][0], tp, r)
    return out


def _merged(weight, tree, a, adapter, spec, tp, rank, full_tree=None, full_weight=None):
    split, fuse = split_fn(a.site, spec), fuse_fn(a.site, spec)
    js = list(range(len(a.site.parts))) if a.split else [None]
    pairs = [_pair(tree, a, j) for j in js]
    delta = site_delta(weight, pairs, adapter.scale, split, fuse)
    if adapter.scheme == "lora":
        return merge(weight, delta)
    norm_sq = row_norm_sq(weight, delta)
    if a.site.parallel == "row" and tp > 1:  # the ranks' shares, summed (an all-reduce)
        wl = layouts(a.site, fused=not a.split)
        norm_sq = sum(row_norm_sq(shard(full_weight, wl["linear_in.weight"][0], tp, r),
                                  site_delta(shard(full_weight, wl["linear_in.weight"][0], tp, r),
                                             [_pair(_shard(full_tree, a, adapter, tp, r), a, j)
                                              for j in js], adapter.scale, split, fuse))
                      for r in range(tp))
    mags = [None if p is None else tree[keys.adapter_key(a.module, None if j is None else
                                                         a.part(j), "magnitude")]
            for j, p in zip(js, pairs, strict=True)]
    return merge(weight, delta, dora_factor(site_magnitude(norm_sq, mags, split, fuse), norm_sq))


def test_spec_checks_and_selection():
    spec = AdapterSpec(target_modules=["linear_qkv"], exclude_modules=["decoder.layers.1.*"])
    assert spec.target_modules == ("linear_qkv",) and not spec.canonical
    assert spec.selects("decoder.layers.0.self_attention.linear_qkv")
    assert not spec.selects("decoder.layers.1.self_attention.linear_qkv")
    assert not spec.selects("decoder.layers.0.self_attention.linear_proj")
    assert AdapterSpec(target_modules=["*.layers.2.*.linear_q"]).canonical
    with pytest.raises(ValueError, match="mix fused layers and their parts"):
        AdapterSpec(target_modules=["linear_qkv", "linear_q"])
    with pytest.raises(ValueError, match="dim=0"):
        AdapterSpec(dim=0)
    assert AdapterSpec.from_json(spec.to_json()) == spec
