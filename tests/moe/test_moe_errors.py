"""Checkpoints whose experts disagree with their config fail before any weight is copied,
naming the tensors: an expert tensor missing, or experts the config does not know about
(an expert left behind would otherwise be dropped silently on export)."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from mbridge import AutoBridge
from mbridge.io.hf import CheckpointError


def edited(src, dst, drop=(), config=None):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def load(directory):
    provider = AutoBridge.from_hf_pretrained(directory).to_megatron_provider()
    provider.finalize()
    provider.provide_distributed_model()


def test_missing_expert_is_named(moe_dirs, tmp_path):
    gone = "model.layers.2.mlp.experts.5.up_proj.weight"
    with pytest.raises(CheckpointError, match=f"lacks 1 tensors .*{gone}"):
        load(edited(moe_dirs["qwen3_moe"], tmp_path / "m", drop=[gone]))


def test_missing_stacked_rows_are_named(moe_dirs, tmp_path):
    model = edited(moe_dirs["qwen3_moe_stacked"], tmp_path / "m", config=dict(num_experts=9))
    with pytest.raises(CheckpointError, match=r"gate_up_proj\[8\]"):
        load(model)


def test_experts_beyond_the_config_are_named(moe_dirs, tmp_path):
    model = edited(moe_dirs["mixtral"], tmp_path / "m", config=dict(num_local_experts=2))
    with pytest.raises(CheckpointError, match="does not read.*block_sparse_moe.experts.[23]"):
        load(model)
