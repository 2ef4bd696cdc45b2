"""Pipeline placement agrees with Megatron-Core's own layer offsets and counts."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbridge.sharding.plan import key_placement, layer_placement, stage_layer_counts
from mbridge.specs import ParallelSpec


@st.composite
def layouts(draw):
    pp = draw(st.integers(2, 4))
    vpp = draw(st.sampled_from([None, 2]))
    v = vpp or 1
    first = draw(st.sampled_from([None, v, 2 * v]))
    last = draw(st.sampled_from([None, v, 3 * v]))
    middle = pp - (first is not None) - (last is not None)
    per = v * draw(st.integers(1 if middle else 0, 2))
    layers = (first or 0) + (last or 0) + per * middle
    if layers == 0:
        layers, first, last = pp * v, None, None
    return layers, ParallelSpec(pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_placement_matches_megatron(case):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layers, par = case
    fixed = (par.first_stage_layers is not None) + (par.last_stage_layers is not None)
    if par.vpp and par.pp == fixed:
        with pytest.raises(ValueError, match="at least one stage besides"):
            layer_placement(layers, par)
        return
    cfg = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                            pipeline_model_parallel_size=par.pp,
                            virtual_pipeline_model_parallel_size=par.vpp,
                            num_layers_in_first_pipeline_stage=par.first_stage_layers,
                            num_layers_in_last_pipeline_stage=par.last_stage_layers,
                            pipeline_dtype=__import__("torch").float32)
    placement = layer_placement(layers, par)
    assert len(placement) == layers
    for stage in range(par.pp):
        for chunk in range(par.vpp_size):
            vp = chunk if par.vpp else None
            mine = [i for i, (s, c, _) in enumerate(placement) if (s, c) == (stage, chunk)]
            n = get_num_layers_to_build(cfg, vp_stage=vp, pp_rank=stage)
            assert len(mine) == n
            if n:
                assert mine[0] == get_transformer_layer_offset(cfg, vp_stage=vp, pp_rank=stage)
                assert mine == list(range(mine[0], mine[0] + n))


def test_uneven_split_that_cannot_work_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be split over pipeline parallel size 3"):
        stage_layer_counts(7, ParallelSpec(pp=3))
    with pytest.raises(ValueError, match="not divisible by virtual pipeline size 2"):
        stage_layer_counts(6, ParallelSpec(pp=2, vpp=2))


def test_tied_embedding_lives_on_first_and_last_stage():
    par = ParallelSpec(pp=2, vpp=2)
    key = "embedding.word_embeddings.weight"
    assert key_placement(key, 4, par, tie_embeddings=True) == (
        (0, 0, key), (1, 1, "output_layer.weight"))
    assert key_placement(key, 4, par) == ((0, 0, key),)
    assert key_placement("decoder.layers.2.mlp.linear_fc2.weight", 4, par) == (
        (0, 1, "decoder.layers.0.mlp.linear_fc2.weight"),)
