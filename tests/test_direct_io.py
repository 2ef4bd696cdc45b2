"""SequentialFile (mbridge/io/direct.py): the bytes on disk are exactly the bytes written, in
order, for any chunking against the block size, with O_DIRECT (where tmp_path's filesystem
allows it) and without; write_file's safetensors read back equal through safetensors."""

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mbridge.io.direct import ALIGN, SequentialFile
from mbridge.io.hf import write_file


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * ALIGN + 7), max_size=12),
       blocks=st.integers(1, 3), direct=st.booleans(), as_tensor=st.booleans())
def test_bytes_on_disk_are_the_bytes_written(tmp_path_factory, sizes, blocks, direct, as_tensor):
    path = tmp_path_factory.mktemp("seq") / "f.bin"
    g = torch.Generator().manual_seed(sum(sizes) + blocks)
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    f = SequentialFile(path, direct=direct, block=blocks * ALIGN)
    for c in chunks:
        f.write(c if as_tensor else bytes(c.numpy()))
    f.close()
    want = b"".join(bytes(c.numpy()) for c in chunks)
    assert path.read_bytes() == want
    assert f.written == len(want)


def test_small_files_skip_o_direct(tmp_path):
    """A file announced smaller than two blocks is written buffered; where O_DIRECT does not
    exist neither is."""
    big = SequentialFile(tmp_path / "big", block=ALIGN)
    small = SequentialFile(tmp_path / "small", block=ALIGN, size_hint=ALIGN)
    for f in (big, small):
        f.write(b"x" * (ALIGN + 1))
        f.close()
    assert (tmp_path / "big").read_bytes() == b"x" * (ALIGN + 1)
    assert not small.direct
    if not hasattr(os, "O_DIRECT"):
        assert not big.direct


def test_write_file_reads_back_through_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(1031, 517, generator=g).to(torch.bfloat16),
        "b.f32.noncontig": torch.randn(300, 7000, generator=g).t(),
        "c.bool": torch.rand(13, generator=g) > 0.5,
        "d.u8": torch.randint(0, 256, (4097,), dtype=torch.uint8, generator=g),
        "e.empty": torch.empty(0, 3),
        "f.f16": torch.randn(5000, 4000, generator=g).half(),  # 40 MB: O_DIRECT,
    }
    write_file(tmp_path / "m.safetensors", tensors)
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v.contiguous()), k


def test_abort_leaves_the_fd_closed(tmp_path):
    f = SequentialFile(tmp_path / "x", block=ALIGN)
    f.write(b"y" * (3 * ALIGN))
    f.abort()
    assert f._fd == -1

