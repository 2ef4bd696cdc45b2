"""The pure distributed-checkpoint layout (mbridge/sharding/dist_checkpoint.py) equals what
Megatron-Core's ``GPTModel.sharded_state_dict()`` produces, key by key: checkpoint key,
global shape, offset and chunk shape of every tensor (the swiglu factory's two chunks
included), and every ``_extra_state`` object. Megatron-Core's model is built on the meta
device at TP=1/PP=1 (one-rank gloo group in this process); vocabulary tensors are compared
at Megatron's padded size, the one difference the layout documents.

Also: chunks reassemble into the stacked global tensors, and the streaming safetensors
writer produces files that safetensors reads back.
"""

import pytest
import torch
from models import CONFIGS, hf_config
from safetensors.torch import load_file

from mbridge import config as mconfig
from mbridge.architectures import registry
from mbridge.io.hf_stream import HFStreamWriter, plan_shards
from mbridge.sharding.dist_checkpoint import (
    extra_state_keys,
    pieces,
    region,
    to_chunks,
)
from mbridge.sharding.layout import padded_vocab_size
from mbridge.specs import ParallelSpec


def expected_shape(spec, key):
    """The shape the architecture declares for an mcore tensor (``Architecture.mcore_shape``)."""
    return registry.get(spec.architecture).mcore_shape(spec, key)


def megatron_layout(spec):
    """{state-dict key: sorted (key, global_shape, offset, shape) of its chunks} and the
    object keys, from Megatron-Core's own sharded_state_dict on the meta device."""
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
                                (1,) * t.prepend_axis_num + tuple(t.local_shape),
                                t.allow_shape_mismatch) for t in built)
    return tensors, objects


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout_is_megatrons(name):
    spec = mconfig.from_hf_config(hf_config(name).to_dict())
    layouts = {k: v for g in registry.get(spec.architecture).mapping(spec)
               for k, v in g.mcore_layouts.items()}
    theirs, their_objects = megatron_layout(spec)
    assert set(theirs) == set(layouts)
    padded = padded_vocab_size(spec.vocab_size, 1)
    for key, layout in layouts.items():
        vocab = layout.vocab_size is not None
        mine = sorted((p.key, p.global_shape, p.offset, p.shape, vocab)
                      for p in pieces(key, expected_shape(spec, key), layout, spec))
        if vocab:  # stored unpadded; Megatron's model is padded and allows the mismatch
            mine = [(k, (padded, *g[1:]), o, (padded, *s[1:]), m) for k, g, o, s, m in mine]
        assert mine == theirs[key], key
    assert set(extra_state_keys(layouts, spec)) == their_objects


def test_chunks_reassemble_the_stacked_tensor():
    spec = mconfig.from_hf_config(hf_config("qwen3").to_dict())
    groups = registry.get(spec.architecture).mapping(spec)
    gen = torch.Generator().manual_seed(0)
    stacked = {}
    trees = []
    for group in groups:
        tree = {k: torch.randn(expected_shape(spec, k), generator=gen) for k in group.mcore_keys}
        trees.append(tree)
        for reg, chunk in to_chunks(tree, spec):
            assert tuple(chunk.shape) == reg.shape
            out = stacked.setdefault(reg.key, torch.full(reg.global_shape, float("nan")))
            box = out
            for axis, (lo, n) in enumerate(zip(reg.offset, reg.shape)):
                box = box.narrow(axis, lo, n)
            assert box.isnan().all(), f"{reg.key}: chunks overlap"
            box.copy_(chunk)
    for tree in trees:
        for key, tensor in tree.items():
            reg = region(key, tuple(tensor.shape), spec)
            got = stacked[reg.key][reg.offset[0]] if len(reg.shape) > tensor.dim() \
                else stacked[reg.key]
            assert torch.equal(got, tensor), key


def test_stream_writer_files_read_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).half(),
               "c": torch.randn(2, 2, generator=gen).bfloat16(), "d": torch.arange(6).int(),
               "e": torch.zeros(0, 4)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    assert [len(s) for s in plan_shards(entries, 64)] == [1, 4]  # a: 60 B; b+c+d+e: 46 B
    writer = HFStreamWriter(tmp_path, entries, shard_bytes=64)
    for k, v in tensors.items():
        writer.add(k, v)
    writer.finish()
    back = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        back.update(load_file(f))
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="expected a"):
        HFStreamWriter(tmp_path / "x", entries).add("c", tensors["c"])


def test_hf_writer_writes_what_safetensors_writes(tmp_path):
    """HFWriter writes header and bytes itself (no copy to ``bytes`` per tensor): the file is
    byte for byte ``safetensors.torch.save_file``'s for tensors given in its order (one dtype,
    sorted names), and reads back exactly for mixed dtypes, views and empty tensors."""
    from safetensors.torch import save_file

    from mbridge.io.hf import HFWriter

    gen = torch.Generator().manual_seed(1)
    same = {k: torch.randn(4, 3, generator=gen).bfloat16() for k in ("a.w", "b", "c.x.y")}
    save_file(same, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    (tmp_path / "one").mkdir()
    writer = HFWriter(tmp_path / "one")
    for k, v in same.items():
        writer.add(k, v)
    writer.finish()
    assert (tmp_path / "one/model.safetensors").read_bytes() == \
        (tmp_path / "ref.safetensors").read_bytes()

    base = torch.randn(6, 4, generator=gen)
    mixed = {"f32": base, "view": base.t(), "half": base[::2].half(), "i64": torch.arange(5),
             "flag": torch.tensor([True, False]), "none": torch.zeros(0, 3).bfloat16()}
    (tmp_path / "two").mkdir()
    writer = HFWriter(tmp_path / "two", shard_bytes=100)
    for k, v in mixed.items():
        writer.add(k, v)
    writer.finish()
    back = {}
    for f in sorted((tmp_path / "two").glob("*.safetensors")):
        back.update(load_file(f))
    assert len(list((tmp_path / "two").glob("*.safetensors"))) > 1
    assert back.keys() == mixed.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in mixed.items())
    with pytest.raises(ValueError, match="cannot be stored"):
        HFWriter(tmp_path / "two").add("c", torch.zeros(2, dtype=torch.complex64))
