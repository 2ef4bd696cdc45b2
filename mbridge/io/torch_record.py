"""Memory-map the tensor that one ``torch.save`` record inside a larger file holds.

A torch_dist checkpoint stores each chunk as a ``torch.save`` zip archive at some offset of a
``.distcp`` file. ``torch.load`` copies the chunk into fresh memory; mapping the archive's raw
data record instead costs no copy (pages come straight from the page cache, as safetensors
does), so export streams at the speed of the disk. The mapping is used only when it is
certainly right: one contiguous little-endian tensor whose storage is exactly its data,
stored uncompressed and aligned for its dtype; otherwise ``map_record`` returns None and the
caller loads the record with ``torch.load``.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
from typing import BinaryIO

import torch


class Window(io.RawIOBase):
    """Read-only file view of ``length`` bytes at ``offset`` of ``f`` (seekable, so both
    ``torch.load`` and ``zipfile`` read a record in place)."""

    def __init__(self, f: BinaryIO, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


def _data_start(window: Window, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes begin: after its local header (whose extra field may
    differ from the central directory's)."""
    window.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", window.read(30)[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _raw(window: Window, info: zipfile.ZipInfo) -> bytes:
    """A small record's bytes, unchecked (the writer may leave CRC32s out)."""
    window.seek(_data_start(window, info))
    return window.read(info.file_size)


def map_record(f: BinaryIO, offset: int, length: int) -> torch.Tensor | None:
    """The tensor saved at ``[offset, offset + length)`` of open file ``f``, memory-mapped
    (copy-on-write, so it is writable and the file is never modified), or None."""
    if os.fstat(f.fileno()).st_size < offset + length:
        return None  # truncated: mapping past the end would crash on access (SIGBUS)
    window = Window(f, offset, length)
    meta = torch.load(window, map_location="meta", weights_only=True)
    if not isinstance(meta, torch.Tensor) or not meta.is_contiguous() or meta.storage_offset():
        return None
    nbytes = meta.numel() * meta.element_size()
    window.seek(0)
    with zipfile.ZipFile(window) as archive:
        records = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
        data = records.get("data/0")
        if data is None or len([r for r in records if r.startswith("data/")]) != 1 or \
                data.compress_type != zipfile.ZIP_STORED or data.file_size != nbytes:
            return None
    order = records.get("byteorder")
    if order is not None and _raw(window, order) != b"little":
        return None
    start = offset + _data_start(window, data)
    if start % meta.element_size() or nbytes == 0:
        return None
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=meta.dtype, count=meta.numel(),
                            offset=start).view(meta.shape)
