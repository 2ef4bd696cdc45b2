"""LoRA and DoRA on real Megatron-Core (CPU, gloo) against Hugging Face peft on the HF base:

- fp32 logits within 1e-5 (max abs) of ``peft.PeftModel`` with the exported adapter, for
  LoRA, DoRA and the per-projection variant on a subset of parts with an excluded layer,
  at TP=1 (in process), TP=2, PP=2 and PP=2 x VPP=2 (one torchrun launch of two ranks),
  Llama and Qwen3;
  every layout draws the same initial adapter;
- an adapter made by peft (``init_lora_weights=False``, LoRA and DoRA) loads at TP=2, gives
  peft's logits and re-exports bit for bit;
- merged logits equal unmerged (1e-5) and the merged export loads in transformers with
  peft's logits (1e-5); the live model gets its weights back bit for bit after merging;
- only adapter parameters train; the hook and loader refuse what they cannot hold.

Tolerance: float32 accumulation-order noise at these sizes is about 1e-6 (tests/test_parity).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_util import torchrun
from models import hf_logits, make_hf, peft_logits, sample_ids
from peft_cases import HOOKS, perturb, same_files
from peft_cases import logits as _logits
from peft_cases import provide as _provide

from mbridge.peft import LoRA
from mbridge.shell import adapters

TOL = 1e-5
MODELS = ("llama", "qwen3")


def _peft_made(base: Path, out: Path, dora: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=16, use_dora=dora, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # DoRA's magnitudes start at the row norms: move them
        for name, p in peft_model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per (model, hook): the base, the TP=1 model's fresh export and a perturbed copy."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name in MODELS:
        base = root / name
        make_hf(name, base)
        for hook in HOOKS:
            bridge, _, model = _provide(base, HOOKS[hook]())
            fresh = root / f"{name}-{hook}-fresh"
            bridge.save_hf_adapter(model, fresh)
            perturb(fresh, root / f"{name}-{hook}-perturbed")
            out[name, hook] = dict(base=str(base), fresh=str(fresh),
                                   adapter=str(root / f"{name}-{hook}-perturbed"))
        for dora in (False, True):
            made = _peft_made(base, root / f"{name}-peft-{dora}", dora)
            out[name, f"peft-{dora}"] = dict(base=str(base), adapter=str(made))
    return out


@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize("name", MODELS)
def test_tp1_matches_peft(cases, name, hook, tmp_path):
    case = cases[name, hook]
    base, adapter = Path(case["base"]), Path(case["adapter"])
    bridge, provider, model = _provide(base, HOOKS[hook]())
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    fresh = _logits(bridge, provider, model, ids)
    assert (fresh - peft_logits(base, Path(case["fresh"]), ids)).abs().max() < TOL
    assert (fresh - hf_logits(base, ids)).abs().max() > 1e-2  # the adapter matters
    bridge.load_hf_adapter(model, adapter)
    ref = peft_logits(base, adapter, ids)
    got = _logits(bridge, provider, model, ids)
    assert (got - ref).abs().max() < TOL
    assert (got - fresh).abs().max() > 1e-3  # the loaded adapter replaced the fresh one
    bridge.save_hf_adapter(model, tmp_path / "again")
    assert same_files(adapter, tmp_path / "again")
    before = {k: v.clone() for c in model for k, v in c.state_dict().items() if "weight" in k}
    with adapters.merged(model):
        assert (_logits(bridge, provider, model, ids) - got).abs().max() < TOL
    after = {k: v for c in model for k, v in c.state_dict().items() if "weight" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    bridge.save_hf_pretrained(model, tmp_path / "merged", merge_adapters=True)
    assert (hf_logits(tmp_path / "merged", ids) - ref).abs().max() < TOL
    trainable = {n for c in model for n, p in c.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dora", [False, True])
def test_peft_made_adapter_at_tp1(cases, name, dora, tmp_path):
    case = cases[name, f"peft-{dora}"]
    base, adapter = Path(case["base"]), Path(case["adapter"])
    bridge, provider, model = _provide(base)
    model = bridge.load_hf_adapter(model, adapter)
    ids = sample_ids(bridge.spec.vocab_size, seq=12)
    got = _logits(bridge, provider, model, ids)
    assert (got - peft_logits(base, adapter, ids)).abs().max() < TOL
    bridge.save_hf_adapter(model, tmp_path / "again")
    assert same_files(adapter, tmp_path / "again")


@pytest.fixture(scope="module")
def two_ranks(cases, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft2")
    # every hook at both layouts on Llama; Qwen3 (q/k norms, head_dim 24) once each
    runs = [("llama", hook, layout) for hook in sorted(HOOKS) for layout in ("tp=2", "pp=2")]
    runs += [("qwen3", "dora", "tp=2"), ("qwen3", "canonical", "pp=2"),
             ("llama", "dora", "pp=2,vpp=2")]
    manifest = [dict(cases[name, hook], hook=hook, layout=layout) for name, hook, layout in runs]
    manifest += [dict(cases[name, f"peft-{dora}"], layout="tp=2",
                      tag=f"{name}-peft-{'dora' if dora else 'lora'}-tp2")
                 for name, dora in (("llama", False), ("llama", True), ("qwen3", True))]
    (root / "manifest.json").write_text(json.dumps(manifest))
    results = torchrun(Path(__file__).parents[1] / "scripts" / "peft_parity.py", str(root),
                       str(root / "manifest.json"))
    by_case: dict[str, list] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    assert len(by_case) == len(manifest)
    return by_case


def test_two_ranks_match_peft(two_ranks):
    for case, ranks in two_ranks.items():
        assert len(ranks) == 2, case
        for r in ranks:
            assert r["loaded"] < TOL and r["merged"] < TOL and r["exact"], (case, r)
            assert r["unmerged_back"] == 0.0, (case, r)
            if "fresh" in r:
                assert r["fresh"] < TOL, (case, r)
        assert ranks[0]["merged_export"] < TOL, (case, ranks[0])  # float64 (peft_parity.py)


def test_refusals(cases, tmp_path):
    case = cases["llama", "lora"]
    base = Path(case["base"])
    with pytest.raises(ValueError, match="match no linear layer"):
        _provide(base, LoRA(target_modules=["linear_qkv"], exclude_modules=["*.linear_qkv"]))
    with pytest.raises(ValueError, match="needs the model's spec"):
        LoRA()([])
    bridge, _, model = _provide(base, HOOKS["dora"]())
    with pytest.raises(ValueError, match="the model's adapters are dora dim=4"):
        bridge.load_hf_adapter(model, Path(case["adapter"]))
    bridge, _, model = _provide(base, LoRA(dim=4, alpha=16))
    with pytest.raises(ValueError, match="different lora_A"):
        bridge.load_hf_adapter(model, Path(cases["llama", "peft-False"]["adapter"]))
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        bridge.load_hf_adapter(model, tmp_path)
    cfg_dir = tmp_path / "rs"
    perturb(Path(case["adapter"]), cfg_dir)
    cfg = json.loads((cfg_dir / "adapter_config.json").read_text())
    (cfg_dir / "adapter_config.json").write_text(json.dumps(dict(cfg, use_rslora=True)))
    with pytest.raises(ValueError, match="use_rslora"):
        bridge.load_hf_adapter(model, cfg_dir)
