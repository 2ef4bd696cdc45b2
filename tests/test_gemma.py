"""Gemma's extras change the logits, so the parity tests (tests/test_parity.py, fp32 within
1e-5 of HF) depend on each of them: a model built with one of them switched off (the same
HF weights loaded) differs from HF by more than 1e-3 somewhere. The tiny models
(tests/models.py) cap attention logits at 5 and final logits at 3, use windows of 4 and 5 on
a 12-token sequence and, in Gemma 3, a local rope of theta 1e4 beside a linear-scaled global
one of 1e6. Also: settings the translation cannot express are refused by name.
"""

import pytest
from models import hf_config, hf_logits, sample_ids

from mbridge import AutoBridge
from mbridge import config as mconfig
from mbridge.shell import forward
from mbridge.specs import ParallelSpec

TOL = 1e-5


def logits_diff(model_dir, attention="sdpa", extra_config=None, **spec_changes):
    """``|logits - HF logits|`` ``[batch, seq, vocab]`` of the model built from ``model_dir``
    with ``spec_changes`` applied to its spec (weights loaded as usual)."""
    bridge = AutoBridge.from_hf_pretrained(model_dir)
    provider = bridge.to_megatron_provider()
    provider.spec = provider.spec.replace(**spec_changes)
    provider.attention_backend = attention
    provider.extra_config = extra_config or {}
    model = provider.finalize().provide_distributed_model()
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    got = forward.logits(model, ids, provider.parallel_spec(), bridge.spec.vocab_size,
                         bridge.spec.hidden_size)
    return (got - hf_logits(model_dir, ids)).abs()


@pytest.mark.parametrize("name,change", [
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(embedding_scale=None)),
    ("gemma3", dict(final_logit_softcap=None)),
    ("gemma3", dict(local_rope=None)),  # the global rope on every layer
    # transformers' Gemma3Attention never applies attn_logit_softcapping (the fixture sets
    # 5.0): capping here would differ from HF
    ("gemma3", dict(attn_logit_softcap=5.0)),
])
def test_each_feature_changes_the_logits(dense_models, name, change):
    assert logits_diff(dense_models[name]).max() < TOL  # as built: HF's logits
    assert logits_diff(dense_models[name], **change).max() > 1e-3


@pytest.mark.parametrize("name,window", [("gemma2", 4), ("gemma3", 5)])
@pytest.mark.parametrize("attention", ["sdpa", "megatron"])
def test_sliding_layers_honour_the_window(dense_models, name, window, attention):
    """Without the window the first ``window`` positions keep HF's logits (nothing lies
    outside their window) and later ones differ."""
    diff = logits_diff(dense_models[name], attention, extra_config={"window_size": None})
    assert diff[:, :window].max() < TOL
    assert diff[:, window:].max() > 1e-3


def test_windows_and_ropes_follow_layer_types():
    """``layer_types`` -> Megatron-Core's per-layer window list; Gemma 3's ropes by type."""
    spec = mconfig.from_hf_config(hf_config("gemma3").to_dict())
    kw = mconfig.transformer_config_kwargs(spec, ParallelSpec())
    assert kw["window_attn_skip_freq"] == [1, 1, 0, 1] and kw["window_size"] == (4, 0)
    assert kw["softmax_scale"] == 40 ** -0.5 and kw["activation_func"] == "gelu_tanh"
    assert (spec.rope.kind, spec.rope.theta, spec.rope.factor) == ("linear", 1e6, 4.0)
    assert (spec.local_rope.kind, spec.local_rope.theta) == ("default", 1e4)
    gemma2 = mconfig.from_hf_config(hf_config("gemma2").to_dict())
    assert gemma2.window_layers == (True, False, False, True) and gemma2.local_rope is None
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (5.0, 3.0)


@pytest.mark.parametrize("name,change,message", [
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    ("gemma2", dict(attention_bias=True), "attention_bias"),
    ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3", dict(rope_parameters={
        "full_attention": dict(rope_type="yarn", rope_theta=1e6, factor=4.0),
        "sliding_attention": dict(rope_type="default", rope_theta=1e4)}), "rope_type='yarn'"),
])
def test_unsupported_settings_are_named(name, change, message):
    cfg = {**hf_config(name).to_dict(), **change}
    with pytest.raises(NotImplementedError, match=message):
        mconfig.from_hf_config(cfg)


def test_transformer_engine_spec_is_refused_and_never_chosen_by_default():
    """Asking for TE's spec is an error naming the architecture; by default (``use_te=None``)
    the Gemma builder has no TE variant, so the local layers are built even with TE present."""
    from mbridge.shell import model

    spec = mconfig.from_hf_config(hf_config("gemma2").to_dict())
    with pytest.raises(NotImplementedError, match="Gemma2ForCausalLM with Transformer Engine"):
        model.build_chunks(spec, ParallelSpec(), 0, use_te=True)
    assert model.builder_of(spec).te is False
    assert model.builder_of(mconfig.from_hf_config(hf_config("llama").to_dict())).te is True
