"""Config translation: HF config -> ModelSpec -> HF config keeps what matters, rope
frequencies match transformers' own for every supported rope type, specs encode to JSON."""

import pytest
import torch
from models import CONFIGS, hf_config

from mbridge import config as mconfig
from mbridge import rope
from mbridge.specs import ModelSpec, ParallelSpec


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_round_trips_through_hf_config(name):
    cfg = hf_config(name).to_dict()
    spec = mconfig.from_hf_config(cfg)
    again = mconfig.from_hf_config(mconfig.to_hf_config(spec))
    assert again == spec
    assert ModelSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rope_inv_freq_equals_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config(name)
    spec = mconfig.from_hf_config(cfg.to_dict())
    params = cfg.rope_parameters
    # Gemma 3 keys its ropes by layer type: global (spec.rope) and sliding (spec.local_rope)
    ropes = ({"full_attention": spec.rope, "sliding_attention": spec.local_rope}
             if "full_attention" in params else {None: spec.rope})
    for layer_type, ours in ropes.items():
        kind = (params[layer_type] if layer_type else params)["rope_type"]
        if kind == "default":
            expected = 1.0 / (ours.theta ** (
                torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim))
        else:
            expected, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", layer_type=layer_type)
        assert torch.equal(rope.rope_inv_freq(ours, spec.head_dim), expected), layer_type


def test_transformer_config_kwargs_carry_the_architecture():
    spec = mconfig.from_hf_config(hf_config("mistral").to_dict())
    kw = mconfig.transformer_config_kwargs(spec, ParallelSpec(tp=2))
    assert kw["num_query_groups"] == 2 and kw["kv_channels"] == 16
    assert kw["window_size"] == (4, 0)  # HF window 5 = the query plus 4 before it
    qwen3 = mconfig.from_hf_config(hf_config("qwen3").to_dict())
    assert mconfig.transformer_config_kwargs(qwen3, ParallelSpec())["qk_layernorm"]


def test_unsupported_settings_are_named():
    with pytest.raises(NotImplementedError, match="rope_type='longrope'"):
        mconfig.from_hf_config(hf_config("llama", rope_parameters=dict(
            rope_type="longrope", rope_theta=1e4, factor=2.0, short_factor=[1.0] * 8,
            long_factor=[1.0] * 8, original_max_position_embeddings=64)).to_dict())
    with pytest.raises(NotImplementedError, match="attention_bias"):
        mconfig.from_hf_config(hf_config("llama", attention_bias=True).to_dict())
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 4"):
        mconfig.transformer_config_kwargs(
            mconfig.from_hf_config(hf_config("llama").to_dict()), ParallelSpec(tp=4))


def test_differences_names_only_the_fields_that_differ():
    from mbridge.specs import differences

    spec = mconfig.from_hf_config(hf_config("llama").to_dict())
    other = spec.replace(num_layers=3, rope=spec.rope.replace(theta=1.0))
    assert differences(spec, spec) == ()
    assert differences(spec, other) == ("num_layers: 4 vs 3", "rope.theta: 50000.0 vs 1.0")
