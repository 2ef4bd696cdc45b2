"""Run config: YAML/JSON round trips, dotted overrides validated against the structs, every
recipe plans at its intended size, and bad configs, data paths and checkpoints fail before
anything trains (in-process checks raise before torch.distributed starts)."""

import json
import subprocess
import sys

import pytest

from mbridge.io.hf import CheckpointError
from mbridge.train import config, recipes
from mbridge.train.config import ConfigError, RunConfig, apply_overrides
from mbridge.train.plan import plan_run


def test_yaml_and_json_round_trip():
    cfg = recipes.tiny_llama_pretrain()
    assert config.from_text(cfg.to_yaml()) == cfg
    assert config.from_text(json.dumps(cfg.to_dict()), "json") == cfg
    assert config.from_text("") == RunConfig()
    partial = config.from_text("train:\n  train_iters: 7\noptimizer: {lr: 0.5}\n")
    assert partial.train.train_iters == 7 and partial.optimizer.lr == 0.5


def test_overrides_set_typed_values():
    cfg = apply_overrides(recipes.tiny_llama_pretrain(), [
        "train.train_iters=5", "optimizer.lr=1e-3", "checkpoint.save=123",
        "data.mock=false", "data.blend=[a, b]", "data.blend_weights=[0.3, 0.7]",
        "model.virtual_pipeline_model_parallel_size=null", "model.spec.num_layers=8",
        "mixed_precision=bf16_mixed", "logging.tensorboard=false"])
    assert cfg.train.train_iters == 5 and cfg.optimizer.lr == 1e-3
    assert cfg.checkpoint.save == "123"  # a text field keeps the text
    assert cfg.data.blend == ("a", "b") and cfg.data.blend_weights == (0.3, 0.7)
    assert cfg.model.spec.num_layers == 8 and cfg.mixed_precision == "bf16_mixed"


@pytest.mark.parametrize("override,message", [
    ("train.iters=5", "unknown config key 'train.iters'; did you mean .*train.train_iters"),
    ("train.train_iters=abc", "Expected `int`, got `str` - at `train.train_iters`"),
    ("optimizer.optimizer=lion", "optimizer.optimizer"),
    ("mixed_precision=bf16", "mixed_precision.*expected one of 'fp32', 'bf16_mixed', "
                             "'fp16_mixed'"),
    ("model.spec.num_heads=3", "num_heads=3 is not divisible"),
    ("train.train_iters", "not key=value"),
    ("train=3", "train"),
    ("train.train_iters.x=1", "unknown config key .train.train_iters.x."),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(recipes.tiny_llama_pretrain(), [override])


@pytest.mark.parametrize("name,world", [("llama32_1b_pretrain", 8), ("llama3_8b_pretrain", 16),
                                        ("qwen3_8b_pretrain", 8), ("tiny_llama_pretrain", 2)])
def test_recipes_plan(name, world):
    cfg = recipes.get(name)()
    plan = plan_run(cfg, cfg.model.spec, world)
    assert plan.dp_size * plan.parallel.model_parallel_size == world
    assert plan.num_microbatches * cfg.train.micro_batch_size * plan.dp_size == \
        cfg.train.global_batch_size
    assert recipes.get(name)(hf_path="/x").model.spec is None


@pytest.mark.parametrize("name,spec,world", [
    ("llama32_1b_finetune", recipes.LLAMA32_1B, 8), ("llama3_8b_finetune", recipes.LLAMA3_8B, 8),
    ("qwen3_8b_finetune", recipes.QWEN3_8B, 8), ("tiny_llama_finetune", recipes.TINY_LLAMA, 2)])
def test_finetune_recipes_plan(name, spec, world):
    """A fine-tuning recipe takes its model from the pretrained checkpoint (here the spec
    that checkpoint would give) and its data from a dataset root."""
    cfg = recipes.get(name)(pretrained_checkpoint="/ckpt", dataset_root="/data")
    assert cfg.model.spec is None and cfg.model.hf_path is None
    plan = plan_run(cfg, spec, world)
    assert plan.num_microbatches * cfg.train.micro_batch_size * plan.dp_size == \
        cfg.train.global_batch_size
    with pytest.raises(ConfigError, match="set exactly one of model.hf_path"):
        plan_run(recipes.get(name)(dataset_root="/data"), spec, world)
    with pytest.raises(ConfigError, match="not several and not none"):
        plan_run(apply_overrides(cfg, ["data.mock=true"]), spec, world)
    with pytest.raises(ConfigError, match="pad_to_multiple_of needs"):
        plan_run(apply_overrides(cfg, ["data.sft.pad_to_multiple_of=8",
                                       "model.pipeline_model_parallel_size=2"]), spec, world)


@pytest.mark.parametrize("overrides,world,message", [
    (["train.global_batch_size=6"], 2, "global_batch_size=6 must be a positive multiple"),
    (["model.tensor_model_parallel_size=4"], 2, "num_query_groups=2 is not divisible"),
    (["model.pipeline_model_parallel_size=3"], 3, "num_layers=4 cannot be split"),
    (["model.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
    (["model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=2",
      "train.global_batch_size=2"], 2, "at least pipeline_model_parallel_size"),
    (["data.blend=[x]", "data.mock=true"], 1, "set one of data.mock=true, data.blend"),
    (["model.hf_path=/x", "model.spec.num_layers=2"], 1,
     "exactly one of model.hf_path"),
    (["checkpoint.save_interval=5"], 1, "needs checkpoint.save"),
    (["model.sequence_parallel=true"], 1, "sequence_parallel needs"),
    (["train.train_iters=0"], 1, "train_iters=0 must be positive"),
    (["model.compiled_cross_entropy=true", "model.tensor_model_parallel_size=2"], 2,
     "compiled_cross_entropy=true needs model.tensor_model_parallel_size=1"),
    (["model.moe_fuse_wgrad_accumulation=true"], 1,
     "moe_fuse_wgrad_accumulation=true needs model.moe_stacked_experts=true"),
    (["model.moe_stacked_experts=true", "model.expert_model_parallel_size=2"], 2,
     "moe_stacked_experts=true needs model.expert_model_parallel_size=1"),
    (["model.moe_sorted_dispatch=true", "model.expert_tensor_parallel_size=2"], 2,
     "moe_sorted_dispatch=true needs model.expert_model_parallel_size=1"),
    (["model.moe_stacked_experts=true"], 1,
     "moe_stacked_experts=true, but LlamaForCausalLM has no mixture-of-experts layers"),
])
def test_inconsistent_configs_fail_in_planning(overrides, world, message):
    cfg = apply_overrides(recipes.tiny_llama_pretrain(), overrides)
    with pytest.raises(ConfigError, match=message):
        plan_run(cfg, recipes.TINY_LLAMA, world)


def test_flops_formula_by_hand():
    from mbridge.specs import ModelSpec
    from mbridge.train.flops import peak_tflops, throughput, train_flops_per_token

    spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4,
                     ffn_hidden_size=6, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2)
    # per layer: qkv 4*(2+2)*2=32, proj 2*2*4=16, mlp 3*4*6=72 -> 120; attention 2*8*2*2=64
    assert train_flops_per_token(spec, 8) == 3 * (2 * 2 * (120 + 64) + 2 * 4 * 10)
    rate = throughput(1000, 2.0, 1e12, 2, 989.0)
    assert rate.tokens_per_s == 500 and rate.tflops_per_device == 250
    assert rate.mfu == pytest.approx(250 / 989)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops(None) is None
    assert throughput(1, 1.0, 1.0, 1, None).mfu is None


# ---- failures before training, in process (no process group is started) ----------------

def pretrain_error(cfg, error=ConfigError):
    import torch.distributed as tdist

    from mbridge.shell.pretrain import pretrain

    started = tdist.is_initialized()  # other in-process tests may have started one already
    with pytest.raises(error) as info:
        pretrain(cfg)
    assert tdist.is_initialized() == started  # the failure came before any group was started
    return str(info.value)


def test_missing_data_path_fails_before_training(tmp_path):
    cfg = apply_overrides(recipes.tiny_llama_pretrain(),
                          ["data.mock=false", f"data.blend=[{tmp_path}/nope_text_document]"])
    assert "nope_text_document.bin and .idx not found" in pretrain_error(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"], "sequence_parallel"),
    (["model.context_parallel_size=2"], "context_parallel_size > 1 needs Transformer Engine")])
def test_parallelism_needing_te_fails_before_training(overrides, message, monkeypatch):
    from mbridge.shell.model import have_te

    if have_te():
        pytest.skip("Transformer Engine is usable here")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert message in pretrain_error(apply_overrides(recipes.tiny_llama_pretrain(), overrides))


def test_missing_hf_checkpoint_fails_before_training(tmp_path):
    cfg = apply_overrides(recipes.tiny_llama_pretrain(), [f"model.hf_path={tmp_path}/none"])
    cfg = config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "spec": None}})
    assert "model.hf_path" in pretrain_error(cfg) and "is not a directory" in pretrain_error(cfg)


@pytest.mark.parametrize("damage,message", [
    ("tracker", "should hold a step number"), ("missing", "does not exist"),
    ("no-metadata", "no metadata.json"), ("garbage", "is unreadable"),
    ("file", "is not a directory"), ("empty+exit", "holds no checkpoint")])
def test_unreadable_checkpoint_fails_before_training(tmp_path, damage, message):
    root = tmp_path / "ckpt"
    root.mkdir()
    over = [f"checkpoint.load={root}"]
    if damage == "tracker":
        (root / "latest_checkpointed_iteration.txt").write_text("ten")
    elif damage == "missing":
        (root / "latest_checkpointed_iteration.txt").write_text("10")
    elif damage in ("no-metadata", "garbage"):
        it = root / "iter_0000010"
        it.mkdir()
        for name in ("common.pt", ".metadata") + (("metadata.json",) if damage == "garbage"
                                                  else ()):
            (it / name).write_bytes(b"\x00garbage")
    elif damage == "file":
        (tmp_path / "f").write_text("x")
        over = [f"checkpoint.load={tmp_path / 'f'}"]
    else:
        over.append("checkpoint.exit_on_missing_checkpoint=true")
    cfg = apply_overrides(recipes.tiny_llama_pretrain(), over)
    assert message in pretrain_error(cfg, CheckpointError)


def test_cli_reports_bad_config_with_exit_code_2(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("train:\n  train_iters: 5\n  warmup: 3\n")
    for args in (["--recipe", "tiny_llama_pretrain", "optimizer.lrr=1"], ["--config", str(bad)]):
        proc = subprocess.run([sys.executable, "-m", "mbridge.train", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert "did you mean optimizer.lr" in subprocess.run(
        [sys.executable, "-m", "mbridge.train", "--recipe", "tiny_llama_pretrain",
         "optimizer.lrr=1"], capture_output=True, text=True).stderr
    shown = subprocess.run([sys.executable, "-m", "mbridge.train", "--recipe",
                            "tiny_llama_pretrain", "train.train_iters=4", "--print-config"],
                           capture_output=True, text=True, timeout=120)
    assert config.from_text(shown.stdout).train.train_iters == 4


def test_wandb_asked_for_but_missing_fails_before_training():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: nothing is missing")
    cfg = apply_overrides(recipes.tiny_llama_pretrain(), ["logging.wandb_project=p"])
    assert "wandb is not installed" in pretrain_error(cfg)


PEFT_RECIPES = sorted(n for n in recipes.RECIPES if n.endswith("_peft"))


@pytest.mark.parametrize("name", PEFT_RECIPES)
def test_peft_recipes_hold_lora(name):
    """Every ``*_peft`` recipe is its ``*_finetune`` recipe with LoRA on (the ``peft``
    section's defaults) at Megatron-Bridge's lr 1e-4 (the tiny CPU one 1e-3), writing to
    its own directories."""
    cfg = recipes.get(name)(pretrained_checkpoint="/ckpt", dataset_root="/data")
    full = recipes.get(name.replace("_peft", "_finetune"))(pretrained_checkpoint="/ckpt",
                                                           dataset_root="/data")
    assert cfg.peft == config.PeftConfig() and cfg.peft.scheme == "lora" and full.peft is None
    assert cfg.optimizer.lr == (1e-3 if name.startswith("tiny") else recipes.PEFT_LR)
    assert cfg.logging.output_dir == f"runs/{name}"
    assert cfg.train == full.train and cfg.data == full.data


def test_peft_recipe_builds_adapters_only(tmp_path):
    """The model and optimizer ``tiny_llama_peft`` builds hold trainable adapters only: every
    parameter that requires a gradient is a LoRA tensor, and the optimizer's elements are
    exactly theirs."""
    from mbridge.shell import dist
    from mbridge.shell.runtime import MegatronRuntime
    from mbridge.train.config import adapter_spec

    cfg = recipes.tiny_llama_peft(pretrained_checkpoint="/ckpt", dataset_root="/data")
    plan = plan_run(cfg, recipes.TINY_LLAMA, 1)
    groups = dist.init(plan.parallel, seed=cfg.rng.seed)
    runtime = MegatronRuntime(recipes.TINY_LLAMA, plan, groups, model=cfg.model,
                              optimizer=cfg.optimizer, ddp=cfg.parallel,
                              mixed_precision=cfg.mixed_precision,
                              micro_batch_size=cfg.train.micro_batch_size,
                              peft=adapter_spec(cfg.peft), seed=cfg.rng.seed)
    params = [(n, p) for c in runtime.model for n, p in c.named_parameters()]
    trainable = [(n, p) for n, p in params if p.requires_grad]
    assert trainable and all(".adapter.linear_" in n for n, _ in trainable)
    sites = {n.split(".adapter.")[0].rsplit(".", 1)[-1] for n, _ in trainable}
    assert sites == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    held = sum(p.numel() for g in runtime.optimizer.param_groups for p in g["params"])
    assert held == sum(p.numel() for _, p in trainable) < sum(p.numel() for _, p in params)


def test_output_gradient_accumulation_fusion_applies_or_says_why():
    """``model.output_gradient_accumulation_fusion=true`` makes the untied output layer of
    ``tiny_llama_pretrain`` add its weight gradient into DDP's buffer in its GEMM
    (``fast_layers.fuse_output_wgrad``); on a frozen output layer (the PEFT recipe's base) it
    stops with the reason, where the default (None) leaves it unfused off CUDA."""
    from mbridge.shell import dist
    from mbridge.shell.runtime import MegatronRuntime
    from mbridge.train.config import adapter_spec

    def runtime(cfg, *overrides):
        cfg = apply_overrides(cfg, overrides)
        plan = plan_run(cfg, recipes.TINY_LLAMA, 1)
        groups = dist.init(plan.parallel, seed=cfg.rng.seed)
        return MegatronRuntime(recipes.TINY_LLAMA, plan, groups, model=cfg.model,
                               optimizer=cfg.optimizer, ddp=cfg.parallel,
                               mixed_precision=cfg.mixed_precision,
                               micro_batch_size=cfg.train.micro_batch_size,
                               peft=adapter_spec(cfg.peft) if cfg.peft else None,
                               seed=cfg.rng.seed)

    def fused(rt):
        return rt.model[0].module.output_layer.gradient_accumulation_fusion

    on = "model.output_gradient_accumulation_fusion=true"
    assert fused(runtime(recipes.tiny_llama_pretrain(), on)) is True
    assert fused(runtime(recipes.tiny_llama_pretrain())) is False  # CPU: the default leaves it
    peft = recipes.tiny_llama_peft(pretrained_checkpoint="/ckpt", dataset_root="/data")
    with pytest.raises(ValueError, match="output_gradient_accumulation_fusion=true needs an "
                                         "output layer of its own that is trained"):
        runtime(peft, on)
