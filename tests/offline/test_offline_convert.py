"""Offline conversion in this process, through the ``mbridge convert`` CLI where it matters:
HF -> distributed checkpoint -> HF is bit-exact (torch.equal, same dtype, same key set,
same config) for every dense architecture in fp32 and for bf16 with tokenizer and generation
files; ``--dtype`` casts; ``verify`` passes on a faithful checkpoint (logits included,
fp32 max |diff| <= 1e-4, measured about 1e-6) and fails with exit code 1 on a different one;
bad input exits 2 naming the problem, leaves no output directory, and leaves the input as it
was.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import CONFIGS, make_hf
from safetensors.torch import load_file, save_file

from mbridge import offline, verify
from mbridge.cli import main
from mbridge.io.hf import INDEX

SIDE = {"tokenizer_config.json": '{"model_max_length": 512}\n',
        "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n'}


def tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_identical(src: Path, dst: Path) -> None:
    a, b = tensors(src), tensors(dst)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((src / "config.json").read_text()) == \
        json.loads((dst / "config.json").read_text())


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_fp32(name, dense_models, tmp_path):
    src = dense_models[name]
    offline.import_hf(src, tmp_path / "mcore")
    out = offline.export_hf(tmp_path / "mcore", tmp_path / "hf", shard_size="60KB")
    assert out["shards"] > 1 and (tmp_path / "hf" / INDEX).is_file()
    assert_identical(src, tmp_path / "hf")
    report = verify.verify(src, tmp_path / "mcore")
    assert report.passed and report.identical == report.tensors == len(tensors(src))


def test_bf16_round_trip_through_the_cli(tmp_path):
    src = tmp_path / "src"
    make_hf("qwen3", src, dtype=torch.bfloat16)
    for name, text in SIDE.items():
        (src / name).write_text(text)
    before = snapshot(src)
    assert main(["convert", "import", "--hf", str(src), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert main(["convert", "export", "--mcore", str(tmp_path / "mc"), "--out",
                 str(tmp_path / "hf"), "--quiet"]) == 0
    assert snapshot(src) == before
    assert_identical(src, tmp_path / "hf")
    assert {t.dtype for t in tensors(tmp_path / "hf").values()} == {torch.bfloat16}
    for name in [*SIDE, "generation_config.json"]:
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
    from transformers import AutoModelForCausalLM

    ids = torch.arange(10).unsqueeze(0)
    logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
              for d in (src, tmp_path / "hf")]
    assert torch.equal(*logits)


def test_dtype_cast_and_verify_logits(dense_models, tmp_path, capsys):
    src = dense_models["llama"]
    assert main(["convert", "import", "--hf", str(src), "--out", str(tmp_path / "mc"),
                 "--dtype", "bfloat16", "--quiet"]) == 0
    offline.export_hf(tmp_path / "mc", tmp_path / "hf")
    a, b = tensors(src), tensors(tmp_path / "hf")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].bfloat16(), b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["convert", "verify", "--hf", str(src), "--mcore", str(tmp_path / "mc"),
                 "--logits", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "39 equal after casting" in printed and printed.rstrip().endswith("PASS")
    report = verify.verify(src, tmp_path / "mc", logits=True)
    assert report.logits_diff is not None and report.logits_diff < 1e-4


def test_verify_fails_on_other_weights(dense_models, tmp_path, capsys):
    other = tmp_path / "other"
    make_hf("mistral", other, seed=7)  # same config, other weights
    offline.import_hf(other, tmp_path / "mc")
    capsys.readouterr()
    assert main(["convert", "verify", "--hf", str(dense_models["mistral"]), "--mcore",
                 str(tmp_path / "mc"), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "differs     model.embed_tokens.weight" in printed and printed.rstrip().endswith("FAIL")


def sharded_copy(src: Path, dst: Path) -> Path:
    """An HF directory with several shards and an index json (what big models look like)."""
    offline.import_hf(src, dst.with_name(dst.name + ".mc"))
    offline.export_hf(dst.with_name(dst.name + ".mc"), dst, shard_size="60KB")
    return dst


def _truncate(d: Path):
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _missing_shard(d: Path):
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-09999-of-09999.safetensors"
    (d / INDEX).write_text(json.dumps(index))


def _outside(d: Path):
    index = json.loads((d / INDEX).read_text())
    shutil.copy(d / index["weight_map"]["model.norm.weight"], d.parent / "elsewhere.safetensors")
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (d / INDEX).write_text(json.dumps(index))


def _wrong_shape(d: Path):
    key = "model.layers.2.self_attn.o_proj.weight"
    name = json.loads((d / INDEX).read_text())["weight_map"][key]
    shard = load_file(d / name)
    shard[key] = shard[key][:, :-1].contiguous()
    save_file(shard, d / name, metadata={"format": "pt"})


def _unknown_architecture(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))


BAD_INPUTS = {"truncated safetensors": (_truncate, "cannot read"),
              "index names a missing shard": (_missing_shard, "does not exist"),
              "index names a path outside": (_outside, "outside"),
              "tensor of wrong shape": (_wrong_shape, "o_proj.weight has shape [64, 63]"),
              "unknown architecture": (_unknown_architecture, "unknown architecture")}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(case, dense_models, tmp_path, capsys):
    src = sharded_copy(dense_models["llama"], tmp_path / "in")
    corrupt, message = BAD_INPUTS[case]
    corrupt(src)
    before, siblings = snapshot(src), set(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["convert", "import", "--hf", str(src), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == siblings  # no output, no leftover temporary directory
    assert snapshot(src) == before


def test_export_bad_input_and_existing_output(dense_models, tmp_path, capsys):
    src = dense_models["qwen2"]
    offline.import_hf(src, tmp_path / "mc")
    (tmp_path / "empty").mkdir()
    cases = {"no metadata.json": ["--mcore", str(tmp_path / "empty")]}
    shutil.copytree(tmp_path / "mc", tmp_path / "no_hf")
    shutil.rmtree(tmp_path / "no_hf" / "hf")
    cases["no hf/config.json"] = ["--mcore", str(tmp_path / "no_hf")]
    cases["other model's config"] = ["--mcore", str(tmp_path / "mc"), "--hf-config",
                                     str(dense_models["qwen3"])]
    shutil.copytree(tmp_path / "mc", tmp_path / "cut")
    last = max((tmp_path / "cut").glob("*.distcp"), key=lambda p: int(p.stem.split("_")[-1]))
    last.write_bytes(last.read_bytes()[:-64])
    cases["truncated data file"] = ["--mcore", str(tmp_path / "cut")]
    shutil.copytree(tmp_path / "mc", tmp_path / "bad")
    last = max((tmp_path / "bad").glob("*.distcp"), key=lambda p: int(p.stem.split("_")[-1]))
    data = bytearray(last.read_bytes())
    data[-200:] = bytes(200)  # same size, last record garbled: fails after shards are written
    last.write_bytes(bytes(data))
    cases["corrupt data file"] = ["--mcore", str(tmp_path / "bad"), "--shard-size", "60KB"]
    (tmp_path / "exists").mkdir()
    cases["already exists"] = ["--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "exists")]
    for case, args in cases.items():
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        capsys.readouterr()
        assert main(["convert", "export", *args, *out, "--quiet"]) == 2, case
        assert "error:" in capsys.readouterr().err, case
        assert not (tmp_path / "out").exists(), case
    assert main(["convert", "export", "--mcore", str(tmp_path / "mc"), "--out",
                 str(tmp_path / "exists"), "--overwrite", "--quiet"]) == 0
    assert_identical(src, tmp_path / "exists")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("action", ["import", "export", "verify"])
def test_help(action, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["convert", action, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes: 0 success" in text and ("--mcore" in text or "--hf" in text)


def test_unused_hf_tensors_are_left_out_and_reported(dense_models, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(dense_models["qwen3"], src)
    weights = load_file(src / "model.safetensors")
    weights["model.rotary_emb.inv_freq"] = torch.arange(12.0)  # what old checkpoints carry
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["convert", "import", "--hf", str(src), "--out", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert "left out 1 HF tensors" in capsys.readouterr().err
    assert main(["convert", "verify", "--hf", str(src), "--mcore", str(tmp_path / "mc"),
                 "--quiet"]) == 0
    assert "not in the model (left out by import): 1 HF tensors" in capsys.readouterr().out
    offline.export_hf(tmp_path / "mc", tmp_path / "hf")
    assert tensors(tmp_path / "hf").keys() == weights.keys() - {"model.rotary_emb.inv_freq"}


def test_verify_names_only_the_config_fields_that_differ(dense_models, tmp_path, capsys):
    other = tmp_path / "other"
    make_hf("llama", other, num_hidden_layers=3, rms_norm_eps=1e-6)
    offline.import_hf(other, tmp_path / "mc")
    capsys.readouterr()
    assert main(["convert", "verify", "--hf", str(dense_models["llama"]), "--mcore",
                 str(tmp_path / "mc"), "--quiet"]) == 1
    problem = next(x for x in capsys.readouterr().out.splitlines() if "configs differ" in x)
    assert problem.split(": ", 1)[1] == "num_layers: 4 vs 3; norm_eps: 1e-05 vs 1e-06"
