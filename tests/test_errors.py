"""Bad input gives an error that names the problem, and nothing is written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbridge import AutoBridge
from mbridge.io.hf import CheckpointError, atomic_dir


def copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_architecture(dense_models, tmp_path):
    d = shutil.copytree(dense_models["llama"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'FancyNewForCausalLM'.*"
                                         "LlamaForCausalLM"):
        AutoBridge.from_hf_pretrained(d)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        AutoBridge.from_hf_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        AutoBridge.from_hf_pretrained(tmp_path / "nope")


def test_missing_tensor(dense_models, tmp_path):
    d = copy_with(dense_models["llama"], tmp_path / "m",
                  lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    provider = AutoBridge.from_hf_pretrained(d).to_megatron_provider().finalize()
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
        provider.provide_distributed_model()


def test_misshaped_tensor(dense_models, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    d = copy_with(dense_models["llama"], tmp_path / "m",
                  lambda t: t.__setitem__(key, torch.zeros(8, 64)))
    provider = AutoBridge.from_hf_pretrained(d).to_megatron_provider().finalize()
    with pytest.raises(CheckpointError, match=rf"misshaped.*{key}: \[8, 64\]"):
        provider.provide_distributed_model()


def test_parallel_sizes_that_do_not_divide(dense_models):
    provider = AutoBridge.from_hf_pretrained(dense_models["qwen3"]).to_megatron_provider()
    provider.tensor_model_parallel_size = 4
    with pytest.raises(ValueError, match="num_query_groups=2 is not divisible by tensor "
                                         "parallel size 4"):
        provider.finalize()
    provider.tensor_model_parallel_size = 1
    provider.pipeline_model_parallel_size = 3
    with pytest.raises(ValueError, match="num_layers=4 cannot be split over pipeline"):
        provider.finalize()


def test_index_pointing_outside_or_at_missing_shard(dense_models, tmp_path):
    d = shutil.copytree(dense_models["llama"], tmp_path / "m")
    keys = list(load_file(d / "model.safetensors"))
    for target, message in (("../evil.safetensors", "outside"),
                            ("model-00009.safetensors", "does not exist")):
        index = {"metadata": {}, "weight_map": {k: target for k in keys}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=message):
            AutoBridge.from_hf_pretrained(d)


def test_truncated_safetensors(dense_models, tmp_path):
    d = shutil.copytree(dense_models["llama"], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoBridge.from_hf_pretrained(d)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    assert (target / "keep").read_text() == "x"


def test_parameter_no_mapping_writes_is_named(dense_models):
    """Providers skip random init when they load weights, so a parameter the checkpoint does
    not fill would hold garbage: load_hf names it instead."""
    bridge = AutoBridge.from_hf_pretrained(dense_models["llama"])
    provider = bridge.to_megatron_provider(load_weights=False).finalize()
    model = provider.provide_distributed_model()
    model[0].decoder.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"1 model parameters have no tensor.*stray"):
        bridge.load_hf_weights(model, provider.parallel_spec())
