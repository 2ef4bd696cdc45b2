"""Loading without copying: ``HFCheckpoint`` hands out tensors that are private,
copy-on-write maps of the file, and ``convert.load_hf`` gives a parameter that memory when the
mapping passed a tensor through unchanged (``convert._adopt_or_copy``). What must hold:
the parameters equal the file's tensors, no two parameters share a byte, writing a
parameter (a training step) leaves the file and a fresh read of it unchanged, and parameters
the mapping fuses or casts are copies."""

import hashlib

import torch
from models import make_hf

from mbridge import AutoBridge
from mbridge.io.hf import HFCheckpoint


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(directory, dtype):
    provider = AutoBridge.from_hf_pretrained(directory).to_megatron_provider(load_weights=True)
    provider.params_dtype = dtype
    provider.finalize()
    return provider.provide_distributed_model(wrap_with_ddp=False)


def _file_backed(tensor, path) -> bool:
    """Whether ``tensor``'s memory lies in a map of file ``path`` (``/proc/self/maps``)."""
    ptr = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


def test_reads_are_private_maps_of_the_file(tmp_path):
    make_hf("llama", tmp_path / "hf", dtype=torch.bfloat16)
    ckpt = HFCheckpoint(tmp_path / "hf")
    key = "model.layers.0.mlp.down_proj.weight"
    before = _digest(tmp_path / "hf/model.safetensors")
    a = ckpt.read(key)
    assert ckpt.mapped(key) is not None
    want = a.clone()
    a.mul_(3).add_(1)  # written: this process's pages only
    assert torch.equal(ckpt.read(key), want)
    assert _digest(tmp_path / "hf/model.safetensors") == before
    part = ckpt.read_slices(key, 1, [(8, 24)])
    assert torch.equal(part, want[:, 8:24])


def test_loaded_parameters_adopt_the_maps_and_never_alias(tmp_path):
    make_hf("llama", tmp_path / "hf", dtype=torch.bfloat16)
    source = tmp_path / "hf/model.safetensors"
    before = _digest(source)
    chunks = _load(tmp_path / "hf", "bfloat16")
    params = dict(chunks[0].named_parameters())
    ckpt = HFCheckpoint(tmp_path / "hf")
    # unchanged tensors live in maps of the file; fused ones (qkv, gate+up) are the
    # mapping's own tensors, adopted as they are
    down = params["decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(down, ckpt.read("model.layers.0.mlp.down_proj.weight"))
    mapped = {n for n, p in params.items() if _file_backed(p, source)}
    # (the tiny vocabulary of 300 is padded, so the embedding is a copy)
    assert {"decoder.layers.0.mlp.linear_fc2.weight", "decoder.final_layernorm.weight",
            "decoder.layers.0.self_attention.linear_proj.weight"} <= mapped
    assert not any("linear_qkv.weight" in n or "linear_fc1.weight" in n for n in mapped)
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
                   for p in params.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "aliased params"
    # a training step writes every parameter: the file and fresh reads stay as they were
    want = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(chunks[0].parameters(), lr=1.0)
    for p in chunks[0].parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(p, want[n]) for n, p in params.items())
    assert _digest(source) == before
    assert torch.equal(HFCheckpoint(tmp_path / "hf").read("model.layers.0.mlp.down_proj.weight"),
                       want["decoder.layers.0.mlp.linear_fc2.weight"])


def test_a_cast_is_a_copy(tmp_path):
    make_hf("llama", tmp_path / "hf", dtype=torch.bfloat16)
    chunks = _load(tmp_path / "hf", "float32")
    params = dict(chunks[0].named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert not any(_file_backed(p, tmp_path / "hf/model.safetensors") for p in params.values())
