"""MoE models through a Megatron-Core distributed checkpoint: the pure layout
(mbridge/sharding/dist_checkpoint.py) equals what Megatron-Core's ``sharded_state_dict()``
produces for every MoE architecture (experts stacked on an expert axis, layer axis or
per-layer keys, Transformer Engine's norm names, extra states); HF -> distributed checkpoint
-> HF is bit-exact for both HF expert layouts; a checkpoint loads at EP=2 and TP=2 x EP=2
with HF logits (1e-5), exports online bit-exact, and Megatron-Core's own save of the
EP-sharded model exports offline bit-exact.
"""

from pathlib import Path

import pytest
import torch
from dist_util import torchrun
from moe_models import CONFIGS, hf_config
from safetensors.torch import load_file
from test_moe_parity import SCRIPT, STACKED, TOL, tensors

from mbridge import config as mconfig
from mbridge import offline, verify
from mbridge.architectures import registry
from mbridge.sharding.dist_checkpoint import extra_state_keys, pieces
from mbridge.sharding.layout import padded_vocab_size
from mbridge.specs import ParallelSpec

NAMES = sorted(CONFIGS)
LAYOUTS = ["ep=2", "tp=2,ep=2"]


def expected_shape(spec, key):
    """The shape the architecture declares for an mcore tensor (``Architecture.mcore_shape``)."""
    return registry.get(spec.architecture).mcore_shape(spec, key)


def megatron_layout(spec):
    """{state-dict key: sorted (key, global_shape, offset, chunk shape)} and the object keys
    of Megatron-Core's own ``sharded_state_dict()``, model built on the meta device."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    from mbridge.shell import dist, model

    dist.init(ParallelSpec())
    with torch.device("meta"):
        chunk = model.build_chunks(spec, ParallelSpec(), 0, use_te=False)[0]
    tensors, objects = {}, set()
    for name, item in chunk.sharded_state_dict().items():
        if isinstance(item, ShardedObject):
            objects.add(item.unique_key)
            continue
        built = item.build_fn(item.key, item.data, item.replica_id, None) \
            if isinstance(item, ShardedTensorFactory) else [item]
        tensors[name] = sorted((t.key, tuple(t.global_shape), tuple(t.global_offset),
                                (1,) * t.prepend_axis_num + tuple(t.local_shape)) for t in built)
    return tensors, objects


@pytest.mark.parametrize("name", NAMES)
def test_layout_is_megatrons(name):
    spec = mconfig.from_hf_config(hf_config(name).to_dict())
    layouts = {k: v for g in registry.get(spec.architecture).mapping(spec)
               for k, v in g.mcore_layouts.items()}
    theirs, their_objects = megatron_layout(spec)
    assert set(theirs) == set(layouts)
    padded = padded_vocab_size(spec.vocab_size, 1)
    for key, layout in layouts.items():
        mine = sorted((p.key, p.global_shape, p.offset, p.shape) for p in
                      pieces(key, expected_shape(spec, key), layout, spec))
        if layout.vocab_size is not None:  # stored unpadded; Megatron allows the mismatch
            mine = [(k, (padded, *g[1:]), o, (padded, *s[1:])) for k, g, o, s in mine]
        assert mine == theirs[key], key
    assert set(extra_state_keys(layouts, spec)) == their_objects


@pytest.fixture(scope="module")
def mcore_dirs(moe_dirs, tmp_path_factory):
    """Every per-expert MoE model imported offline: {name: checkpoint dir}."""
    root = tmp_path_factory.mktemp("moe_mcore")
    for name in NAMES:
        offline.import_hf(moe_dirs[name], root / name)
    return {name: root / name for name in NAMES}


@pytest.mark.parametrize("name", NAMES + [n + "_stacked" for n in STACKED])
def test_round_trip_is_bit_exact(name, moe_dirs, mcore_dirs, tmp_path):
    base = name.removesuffix("_stacked")
    mcore = mcore_dirs[base]
    if name != base:  # stacked HF experts import to the same checkpoint
        offline.import_hf(moe_dirs[name], mcore := tmp_path / "mcore")
    offline.export_hf(mcore, tmp_path / "hf", shard_size="100KB")
    src, dst = tensors(moe_dirs[base]), tensors(tmp_path / "hf")
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[k], dst[k]) and src[k].dtype == dst[k].dtype for k in src)
    report = verify.verify(moe_dirs[name], mcore)
    assert report.passed and report.identical == report.tensors > 0


@pytest.fixture(scope="module")
def loaded(moe_dirs, mcore_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_mcore_out")
    dirs = [f"{mcore_dirs[n]}@{moe_dirs[n]}" for n in NAMES]
    return out, torchrun(SCRIPT, str(out), ";".join(LAYOUTS), *dirs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_at_expert_parallel(loaded, moe_dirs, tmp_path, layout, name):
    out, results = loaded
    rows = [r for r in results if r["layout"] == layout and r["model"] == name]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert "error" not in r, r["error"]
        assert r["logits_diff"] < TOL and r["exact"], r
    saved = out / f"megatron-{name}-{layout.replace(',', '_').replace('=', '')}"
    offline.export_hf(saved, tmp_path / "hf", hf_config=moe_dirs[name])
    src = tensors(moe_dirs[name])
    dst = {k: v for f in sorted(Path(tmp_path / "hf").glob("*.safetensors"))
           for k, v in load_file(f).items()}
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
