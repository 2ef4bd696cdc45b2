"""Qwen2.5-VL between Hugging Face and Megatron-Core: the pure mapping on the real
checkpoint's tensors, the 3-D rope positions against transformers' own ``get_rope_index``,
logits against transformers' ``Qwen2_5_VLForConditionalGeneration`` at TP=1, TP=2 and PP=2
(real processes over gloo; images of three sizes and aspect ratios at their own resolution,
one or two per sample, so window attention splits the larger ones), online and offline round
trips bit for bit (every tensor, vision tower and merger included), the processor files
carried through, and bad input refused before a model is built.

fp32 logits agree within 1e-5: both sides run the same float32 operations (the tower is
HF's own module), but Megatron-Core's fused qkv and vocab-parallel output may reorder sums.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_util import torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from qwen_models import hf_inputs, hf_logits
from test_llava_conversion import tensors

from mbridge import AutoBridge
from mbridge.architectures import qwen2_5_vl as qwen_arch
from mbridge.architectures import registry
from mbridge.cli import main
from mbridge.io.hf import SIDE_FILES, HFCheckpoint
from mbridge.rope import mrope_position_ids
from mbridge.shell import forward
from mbridge.testing import laws

SCRIPT = Path(__file__).parent / "scripts" / "vlm_parity.py"
N_VISION = 1 + 3 * 12 + 5  # patch embedding, 3 blocks, merger
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def test_mapping_round_trips_the_checkpoint(qwen):
    hf_dir, _ = qwen
    ckpt = HFCheckpoint(hf_dir)
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    groups = bridge.architecture.mapping(bridge.spec)
    tree = {k: ckpt.read(k) for k in ckpt.keys()}
    laws.check_round_trip(groups, tree)
    laws.check_declared_keys(groups, tree)
    laws.check_commutes_with_sharding(groups, tree, 2)
    assert sorted(k for g in groups for k in g.hf_keys) == sorted(ckpt.keys())
    mcore = {k: v for g in groups for k, v in g.to_mcore({x: tree[x] for x in g.hf_keys}).items()}
    assert {k: tuple(v.shape) for k, v in mcore.items()} == \
        bridge.architecture.mcore_shapes(bridge.spec)
    assert sum(k.startswith("modality_submodules.images.encoders.qwen2_5_vl.")
               for k in mcore) == N_VISION


def test_spec_config_and_names(qwen):
    cfg = json.loads((qwen[0] / "config.json").read_text())
    spec = registry.from_hf_config(cfg)
    v = spec.vision
    assert (spec.architecture, v.text_architecture, spec.qkv_bias) == (
        "Qwen2_5_VLForConditionalGeneration", "Qwen2ForCausalLM", True)
    assert (spec.rope.theta, spec.rope.mrope_section) == (50000.0, (2, 1, 1))
    assert (v.tower, v.full_attention_layers, v.tokens_for_grid((1, 6, 10))) == (
        "qwen2_5_vl", (1,), 15)
    assert registry.from_hf_config(registry.to_hf_config(spec)) == spec
    # older files: text settings at the top level, rope_scaling type "mrope"
    flat = {**{k: v for k, v in cfg.items() if k != "text_config"}, **cfg["text_config"]}
    flat.pop("rope_parameters")
    flat.update(rope_theta=50000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                model_type="qwen2_5_vl")
    assert registry.from_hf_config(flat) == spec
    assert qwen_arch.hf_options(["visual.x", "model.norm.weight"]) == qwen_arch.SAVED
    assert qwen_arch.hf_options(["model.visual.x", "model.language_model.norm.weight"]) == \
        qwen_arch.MODULE


def test_rope_positions_are_transformers(qwen):
    """The pure port gives transformers' ``get_rope_index`` exactly (padding included), and
    the positions matter: HF with 1-D positions gives other logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir, data = qwen
    ids, pixels, grid = hf_inputs(hf_dir, data)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    image = model.config.image_token_id
    want, _ = model.model.get_rope_index(ids, (ids == image).int(), image_grid_thw=grid)
    got = mrope_position_ids(ids, grid, image_token_id=image, spatial_merge_size=2)
    assert torch.equal(got, want) and not torch.equal(got[1], got[0])
    with torch.no_grad():
        flat = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    assert (flat - hf_logits(hf_dir, ids, pixels, grid)).abs().max() > 1e-3


# a row: runs of text (0-3 tokens) and images on grids (1, 2a, 2b), text between images as
# <|vision_end|> <|vision_start|> put it
ROW = st.lists(st.tuples(st.integers(0, 3), st.none() | st.tuples(st.integers(1, 3),
                                                                  st.integers(1, 3))),
               min_size=1, max_size=4)


@functools.cache
def _hf_model(hf_dir: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(ROW, min_size=1, max_size=3))
def test_rope_positions_equal_transformers_on_any_layout(qwen, rows):
    model = _hf_model(qwen[0])
    image = model.config.image_token_id
    seqs, grids = [], []
    for row in rows:
        ids = []
        for text, img in row:
            ids += [20] * (text or int(bool(ids) and ids[-1] == image))
            if img is not None:
                grids.append((1, 2 * img[0], 2 * img[1]))
                ids += [image] * (img[0] * img[1])
        seqs.append(ids)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [1] * (width - len(s)) for s in seqs])
    grid = torch.tensor(grids) if grids else None
    got = mrope_position_ids(ids, grid, image_token_id=image, spatial_merge_size=2)
    if grid is None:
        assert torch.equal(got, torch.arange(width).expand(3, len(seqs), -1))
        return
    want, _ = model.model.get_rope_index(ids, (ids == image).int(), image_grid_thw=grid)
    assert torch.equal(got, want)


def test_rope_positions_refuse_mismatched_images():
    ids = torch.tensor([[5, 9, 9, 9, 6]])
    with pytest.raises(ValueError, match=r"grid \(1, 4, 4\): 4 features, but its run of "
                                         "image tokens holds 3"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), image_token_id=9,
                           spatial_merge_size=2)
    with pytest.raises(ValueError, match="more runs of image tokens"):
        mrope_position_ids(ids, None, image_token_id=9, spatial_merge_size=2)
    with pytest.raises(ValueError, match="image_grid_thw has 2 images"):
        mrope_position_ids(torch.tensor([[5, 9, 9, 9, 9]]), torch.tensor([[1, 4, 4]] * 2),
                           image_token_id=9, spatial_merge_size=2)


def test_autobridge_forward_at_tp1_refuses_a_token_count_mismatch(qwen):
    hf_dir, data = qwen
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    model = provider.finalize().provide_distributed_model()
    ids, pixels, grid = hf_inputs(hf_dir, data)
    spec = bridge.spec
    got = forward.logits(model, ids, provider.parallel_spec(), spec.vocab_size,
                         spec.hidden_size, pixel_values=pixels, image_grid_thw=grid)
    assert (got - hf_logits(hf_dir, ids, pixels, grid)).abs().max() <= 1e-5
    short = ids.clone()
    short[0, (short[0] == spec.vision.image_token_id).nonzero()[0]] = 20
    with pytest.raises(ValueError, match="its run of image tokens holds 3"):
        forward.logits(model, short, provider.parallel_spec(), spec.vocab_size,
                       spec.hidden_size, pixel_values=pixels, image_grid_thw=grid)


@pytest.mark.slow
def test_parity_and_round_trips_at_tp1_tp2_pp2(qwen, tmp_path):
    """Online (from the HF directory) and offline (from ``mbridge convert import``'s
    checkpoint) at every layout: logits within 1e-5 of HF's, export bit-exact."""
    hf_dir, data = qwen
    assert main(["convert", "import", "--hf", str(hf_dir), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    results = torchrun(SCRIPT, str(tmp_path / "out"), str(hf_dir), str(data),
                       "tp=1;tp=2;pp=2", str(tmp_path / "mc"), nproc=2, timeout=1200)
    assert len(results) == 2 * 3 * 2
    for r in results:
        assert r["logits_diff"] <= 1e-5, r
        assert r["exact"] and r["export_names"] and r["n_vision"] == N_VISION, r
        assert r["image_tokens"] == 4 + 8 + 15  # grids 4x4 | 4x8 and 6x10, merged 2x2
        assert r["side_same"] and set(PROCESSOR_FILES) <= set(r["side"]), r


def test_offline_round_trip_and_verify(qwen, tmp_path, capsys):
    hf_dir, _ = qwen
    assert main(["convert", "import", "--hf", str(hf_dir), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert main(["convert", "export", "--mcore", str(tmp_path / "mc"), "--out",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    src, dst = tensors(hf_dir), tensors(tmp_path / "hf")
    assert sorted(src) == sorted(dst)
    assert all(torch.equal(src[k], dst[k]) and src[k].dtype == dst[k].dtype for k in src)
    for name in ("config.json", *SIDE_FILES):
        if (hf_dir / name).is_file():
            assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    capsys.readouterr()
    assert main(["convert", "verify", "--hf", str(hf_dir), "--mcore", str(tmp_path / "mc"),
                 "--logits", "--atol", "1e-5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{len(src)}/{len(src)} identical" in out and out.rstrip().endswith("PASS")


def _edit_config(hf_dir: Path, dst: Path, **changes) -> Path:
    shutil.copytree(hf_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        target = cfg[section] if section else cfg
        if value is None:
            target.pop(field)
        else:
            target[field] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


UNSUPPORTED = {
    "vision act": (dict(vision_config__hidden_act="tanh"),
                   "vision_config.hidden_act='tanh' is not supported"),
    "missing field": (dict(vision_config__window_size=None),
                      "vision_config has no window_size"),
    "vision tower": (dict(vision_config__model_type="siglip_vision_model"),
                     "vision_config.model_type='siglip_vision_model' is not supported"),
    "full attention": (dict(vision_config__fullatt_block_indexes=[5]),
                       "fullatt_block_indexes holds 5, outside the tower's 3 blocks"),
    "out hidden": (dict(vision_config__out_hidden_size=48),
                   "out_hidden_size=48 must equal the language model's hidden_size=32"),
    "mrope": (dict(text_config__rope_parameters={"rope_type": "default", "rope_theta": 5e4,
                                                 "mrope_section": [2, 2, 2]}),
              "mrope_section=[2, 2, 2] sums to 6; it must sum to head_dim / 2 = 4"),
    "image token": (dict(image_token_id=500), "image_token_id=500 is outside"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_exits_2(case, qwen, tmp_path, capsys):
    changes, message = UNSUPPORTED[case]
    src = _edit_config(qwen[0], tmp_path / "in", **changes)
    capsys.readouterr()
    assert main(["convert", "import", "--hf", str(src), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

