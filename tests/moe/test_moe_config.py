"""MoE config translation: HF config <-> ModelSpec round trips through transformers' own
config classes, the Megatron-Core settings each architecture needs, settings Megatron-Core
0.16 cannot express named with the reason, and layouts that cannot host a model refused at
``finalize`` with what to change. Also the CPU shim's MoE/MLA bridges."""

import math

import pytest
import torch
from moe_models import CONFIGS, hf_config

from mbridge import config as mconfig
from mbridge import rope
from mbridge.specs import ParallelSpec, check_model_fits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trips_through_transformers(name):
    from transformers import AutoConfig

    spec = mconfig.from_hf_config(hf_config(name).to_dict())
    back = mconfig.to_hf_config(spec)
    assert mconfig.from_hf_config(back) == spec
    reloaded = AutoConfig.for_model(back.pop("model_type"), **back)
    assert mconfig.from_hf_config(reloaded.to_dict()) == spec


def kwargs(name, **parallel):
    spec = mconfig.from_hf_config(hf_config(name).to_dict())
    return mconfig.transformer_config_kwargs(spec, ParallelSpec(**parallel))


def test_megatron_settings_per_architecture():
    q3 = kwargs("qwen3_moe", ep=2)
    assert (q3["num_moe_experts"], q3["moe_router_topk"], q3["moe_ffn_hidden_size"]) == (8, 2, 32)
    assert q3["moe_layer_freq"] == [1, 0, 1, 1] and not q3["moe_router_pre_softmax"]
    assert q3["expert_model_parallel_size"] == 2
    q2 = kwargs("qwen2_moe")
    assert q2["moe_router_pre_softmax"] and q2["moe_shared_expert_gate"]
    assert q2["moe_shared_expert_intermediate_size"] == 48 and q2["moe_layer_freq"] == 1
    ds = kwargs("deepseek_v3")
    assert ds["multi_latent_attention"] and ds["qk_layernorm"] and ds["kv_channels"] == 12
    assert (ds["moe_router_score_function"], ds["moe_router_enable_expert_bias"]) == \
        ("sigmoid", True)
    assert (ds["moe_router_num_groups"], ds["moe_router_group_topk"]) == (2, 1)
    assert ds["moe_router_topk_scaling_factor"] == 2.5 and ds["moe_router_dtype"] == "fp32"
    assert ds["moe_layer_freq"] == [0, 1, 1, 1]
    assert (ds["rotary_scaling_factor"], ds["mscale_all_dim"]) == (4.0, 0.7)
    oss = kwargs("gpt_oss")
    assert oss["add_bias_linear"] and oss["softmax_type"] == "learnable"
    assert oss["window_attn_skip_freq"] == [1, 0, 1, 0] and oss["window_size"] == (4, 0)
    assert (oss["activation_func"], oss["glu_linear_offset"]) == ("quick_gelu", 1.0)
    assert oss["activation_func_clamp_value"] == 1.5
    scale = rope.rope_attention_factor(mconfig.from_hf_config(
        hf_config("gpt_oss").to_dict()).rope) ** 2 / 4.0  # head_dim 16
    assert oss["softmax_scale"] == pytest.approx(scale) and scale > 1 / 4.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_megatron_accepts_the_config(name):
    from mbridge.shell import model

    spec = mconfig.from_hf_config(hf_config(name).to_dict())
    cfg = model.transformer_config(spec, ParallelSpec(ep=2))
    assert cfg.num_moe_experts == spec.moe.num_experts
    assert cfg.moe_token_dispatcher_type == ("alltoall" if torch.cuda.is_available()
                                             else "allgather")
    assert type(cfg).__name__ == ("MLATransformerConfig" if spec.mla else "TransformerConfig")


@pytest.mark.parametrize("name,overrides,message", [
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave=False"),
    ("deepseek_v3", dict(norm_topk_prob=False), "always renormalises sigmoid"),
    ("deepseek_v3", dict(num_experts_per_tok=4), "agree only when that quotient is 2"),
    ("deepseek_v3", dict(rms_norm_eps=1e-5), "eps 1e-6 whatever rms_norm_eps"),
    ("deepseek_v3", dict(attention_bias=True), "down-projections have no bias"),
    ("deepseek_v3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                              original_max_position_embeddings=128,
                                              mscale=1.0, mscale_all_dim=0.5)),
     "mscale != mscale_all_dim"),
    ("gpt_oss", dict(swiglu_alpha=1.5), "fixes it at 1.702"),
    ("gpt_oss", dict(quantization_config=dict(quant_method="mxfp4")), "dequantise first"),
    ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window=True"),
])
def test_inexpressible_settings_are_named(name, overrides, message):
    with pytest.raises(NotImplementedError, match=message):
        mconfig.from_hf_config(hf_config(name, **overrides).to_dict())


@pytest.mark.parametrize("name,overrides,parallel,message", [
    ("qwen3_moe", {}, dict(ep=3), "num_experts=8 is not divisible by expert parallel size 3"),
    ("qwen3_moe", {}, dict(etp=3), "moe ffn_hidden_size=32 is not divisible by expert tensor"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=5), dict(tp=2),
     "shared expert ffn_hidden_size=5 is not divisible by tensor parallel size 2"),
    ("gpt_oss", {}, dict(etp=2), "expert biases only at size 1"),
    ("deepseek_v3", dict(kv_lora_rank=17), dict(tp=2),
     "kv_lora_rank \\+ qk_rope_head_dim=25 is not divisible by tensor parallel size 2"),
])
def test_layouts_that_cannot_host_the_model(name, overrides, parallel, message):
    spec = mconfig.from_hf_config(hf_config(name, **overrides).to_dict())
    with pytest.raises(ValueError, match=message):
        check_model_fits(spec, ParallelSpec(**parallel))


def test_cpu_shim_bridges_the_te_only_moe_and_mla_paths():
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mbridge.shell import dist

    if torch.cuda.is_available():
        pytest.skip("the shim applies only without CUDA")
    dist.init(ParallelSpec())
    assert moe_utils.te_general_gemm is None and mla.HAVE_TE is False
    x, w = torch.randn(5, 8), torch.randn(3, 8)  # the router's gating GEMM runs on torch.mm
    assert torch.equal(moe_utils.router_gating_linear(x, w, None, torch.float32), x @ w.t())
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, kv_channels=3,
                            use_cpu_initialization=True)
    DotProductAttention(cfg, 1, None, "self", softmax_scale=0.5, k_channels=5, v_channels=3)
    with pytest.raises(ValueError, match="v_channels=4 but kv_channels=3"):
        DotProductAttention(cfg, 1, None, "self", k_channels=5, v_channels=4)


# config.json fields of released checkpoints (values as published; weights not needed)
HUB = {
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", decoder_sparse_step=1,
        head_dim=128, hidden_act="silu", hidden_size=2048, intermediate_size=6144,
        max_position_embeddings=40960, mlp_only_layers=[], moe_intermediate_size=768,
        norm_topk_prob=True, num_attention_heads=32, num_experts=128, num_experts_per_tok=8,
        num_hidden_layers=48, num_key_value_heads=4, rms_norm_eps=1e-6, rope_scaling=None,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
        use_sliding_window=False, vocab_size=151936),
    "DeepSeek-V3": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", first_k_dense_replace=3,
        hidden_act="silu", hidden_size=7168, intermediate_size=18432, kv_lora_rank=512,
        max_position_embeddings=163840, moe_intermediate_size=2048, moe_layer_freq=1,
        n_group=8, n_routed_experts=256, n_shared_experts=1, norm_topk_prob=True,
        num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
        num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536,
        qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-6,
        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096, type="yarn"),
        rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid",
        tie_word_embeddings=False, topk_group=4, topk_method="noaux_tc", v_head_dim=128,
        vocab_size=129280),
    "gpt-oss-20b": dict(
        architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True,
        head_dim=64, hidden_act="silu", hidden_size=2880, intermediate_size=2880,
        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
        num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24,
        num_key_value_heads=8, num_local_experts=32, rms_norm_eps=1e-5,
        rope_scaling=dict(beta_fast=32.0, beta_slow=1.0, factor=32.0,
                          original_max_position_embeddings=4096, rope_type="yarn",
                          truncate=False), rope_theta=150000, sliding_window=128,
        swiglu_limit=7.0, tie_word_embeddings=False, vocab_size=201088),
}


@pytest.mark.parametrize("name,parallel", [
    ("Qwen3-30B-A3B", dict(tp=4, ep=8)), ("DeepSeek-V3", dict(tp=8, ep=64, pp=16)),
    ("gpt-oss-20b", dict(tp=8, ep=4))])
def test_released_configs_translate(name, parallel):
    spec = mconfig.from_hf_config(HUB[name])
    kw = mconfig.transformer_config_kwargs(spec, ParallelSpec(**parallel))
    assert kw["num_moe_experts"] == spec.moe.num_experts > 1
    if name == "DeepSeek-V3":
        assert kw["moe_layer_freq"] == [0] * 3 + [1] * 58
        assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (8, 4)
        assert (kw["rotary_scaling_factor"], kw["mscale_all_dim"]) == (40, 1.0)
        assert spec.moe.shared_ffn_hidden_size == 2048 and spec.head_dim == 128
    if name == "gpt-oss-20b":
        assert kw["window_attn_skip_freq"] == [1, 0] * 12 and kw["window_size"] == (127, 0)
        assert kw["softmax_scale"] == pytest.approx((0.1 * math.log(32) + 1) ** 2 / 8)
