"""HF checkpoints on disk: a lazy reader (per key, per slice) and an atomic sharded writer.

The reader validates before anything is converted: config.json present and valid, index
json naming only files inside the directory that exist, every file a readable safetensors.
The writer streams tensors into ``model-0000k-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` inside a directory from ``mbridge.io.output.atomic_dir``
(a hidden sibling renamed into place only when complete, so a failed run never leaves a
directory that looks finished).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mbridge.io.direct import SequentialFile
from mbridge.io.output import atomic_dir, writing  # noqa: F401  (atomic_dir re-exported)
from mbridge.keys import split_index

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
              "chat_template.jinja", "added_tokens.json",
              # processors of vision-language models (image resizing, placeholder expansion)
              "preprocessor_config.json", "processor_config.json", "chat_template.json")


_ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                  "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
                  "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, malformed or does not match the model."""


def hub_repo(directory: Path) -> Path | None:
    """The repo cache a Hugging Face hub snapshot lives in, or None:
    ``~/.cache/huggingface/hub/models--org--name/snapshots/<rev>`` ->
    ``.../models--org--name`` (its files are symlinks into that repo's ``blobs/``)."""
    directory = directory.absolute()
    repo = directory.parent.parent
    if directory.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return None


def inside(directory: str | os.PathLike, name: str, who: str) -> Path:
    """``directory / name`` when it stays inside ``directory``; CheckpointError otherwise.

    ``name`` (from an index file, so untrusted) must not leave ``directory`` by itself:
    absolute paths and ``..`` are refused however they resolve. The file it names may be a
    symlink to a file inside ``directory``, or, in a Hugging Face hub snapshot, into the
    snapshot's own repo cache (``../../blobs/<hash>``, how the hub stores every file)."""
    directory = Path(directory)
    parts = Path(os.path.normpath(name)).parts
    if not parts or Path(name).is_absolute() or parts[0] == "..":
        raise CheckpointError(f"{who} {name!r}, a path outside {directory}")
    path = directory / name
    target = path.resolve()
    roots = [directory.resolve()] + [r.resolve() for r in [hub_repo(directory)] if r]
    if not any(root in target.parents for root in roots):
        raise CheckpointError(f"{who} {name!r}, a symlink to {target}, a path outside "
                              f"{directory}; copy the file into the directory")
    return path


class HFCheckpoint:
    """Read-only view of an HF checkpoint directory; tensors are read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path} has no config.json")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
        self._files = self._weight_map()
        self._handles: dict[str, Any] = {}
        self._layouts: dict[str, tuple] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for name in sorted(set(self._files.values())):
            handle = self._open(name)
            for key in handle.keys():
                sl = handle.get_slice(key)
                self._meta[key] = (tuple(sl.get_shape()), sl.get_dtype())
        missing = [k for k, f in self._files.items() if k not in self._meta]
        if missing:
            raise CheckpointError(f"index names tensors its shards do not hold: {missing[:5]}")

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            for name in set(weight_map.values()):
                target = inside(self.path, name, f"{index} names")
                if not target.is_file():
                    raise CheckpointError(f"{index} names shard {name!r}, which does not exist")
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            inside(self.path, SINGLE, f"{self.path} holds")
            with self._open_file(SINGLE) as f:
                return {k: SINGLE for k in f.keys()}
        raise CheckpointError(f"{self.path} has neither {INDEX} nor {SINGLE}")

    def _open_file(self, name: str):
        try:
            return safe_open(self.path / name, framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {self.path / name}: {e}") from None

    def _open(self, name: str):
        if name not in self._handles:
            self._handles[name] = self._open_file(name).__enter__()
        return self._handles[name]

    def keys(self) -> tuple[str, ...]:
        return tuple(sorted(self._meta))

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta_of(key)[0]

    def _meta_of(self, key: str):
        base, row = split_index(key)  # "name[e]": row e of a stacked tensor (mappings.stacked)
        if base not in self._meta:
            raise CheckpointError(f"tensor {base!r} is missing from {self.path}")
        if row is None:
            return self._meta[key]
        shape, dtype = self._meta[base]
        if not shape or row >= shape[0]:
            raise CheckpointError(f"{key}: tensor {base!r} of shape {list(shape)} has no row "
                                  f"{row}")
        return shape[1:], dtype

    def has(self, key: str) -> bool:
        """Whether ``key`` (or row ``e`` for ``"name[e]"``) is stored."""
        try:
            self._meta_of(key)
        except CheckpointError:
            return False
        return True

    def nbytes(self, key: str) -> int:
        """Size of tensor ``key`` in bytes, from the file header."""
        shape, dtype = self._meta_of(key)
        return torch.Size(shape).numel() * _ELEMENT_BYTES[dtype]

    def close(self) -> None:
        """Drop the open files and their memory maps (reopened on the next read), so pages
        already read stop counting against this process once their tensors are freed."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def read(self, key: str) -> torch.Tensor:
        self._meta_of(key)
        base, row = split_index(key)
        if row is not None:
            return self._read(base, (0, row, row + 1))[0]
        return self._read(key, None)

    def read_slices(self, key: str, dim: int, ranges, pad: int = 0) -> torch.Tensor:
        """Rows ``ranges`` (half-open, along ``dim``) of ``key``, concatenated, plus ``pad``
        zero rows: reads only those bytes from disk."""
        shape = self._meta_of(key)[0]
        pieces = [self._read(key, (dim, lo, hi)) for lo, hi in ranges]
        if pad:
            pad_shape = list(shape)
            pad_shape[dim] = pad
            pieces.append(torch.zeros(pad_shape, dtype=pieces[0].dtype))
        return torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]

    def _read(self, key: str, window) -> torch.Tensor:
        mapped = self.mapped(key)
        if mapped is not None:
            if window is None:
                return mapped
            dim, lo, hi = window
            return mapped.narrow(dim, lo, hi - lo)
        sl = self._open(self._files[key]).get_slice(key)
        try:
            if window is None:
                return sl[:]
            dim, lo, hi = window
            return sl[(slice(None),) * dim + (slice(lo, hi),)]
        except Exception as e:
            raise CheckpointError(
                f"cannot read tensor {key!r} from {self._files[key]}: {e}") from None

    def mapped(self, key: str) -> torch.Tensor | None:
        """Tensor ``key`` as a view of a private, copy-on-write memory map of its bytes in the
        file: no copy is made, pages are read from the page cache when first touched, writes
        stay in this process, and the map closes when the last view of it is freed. ``None``
        where the bytes cannot back a tensor in place (misaligned, or a dtype torch lacks).
        The file must not be modified in place while the view lives (mbridge's writers
        never do: they write beside the target and rename)."""
        name = self._files[key]
        start, dtypes = self._layout(name)
        entry = dtypes.get(key)
        if entry is None:
            return None
        dtype, shape, lo, hi = entry
        if dtype is None or (start + lo) % dtype.itemsize:
            return None
        if hi == lo:
            return torch.empty(shape, dtype=dtype)
        base = (start + lo) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(self.path / name, "rb") as f:
            if os.fstat(f.fileno()).st_size < start + hi:
                raise CheckpointError(f"{self.path / name} is shorter than its header says "
                                      f"(tensor {key!r} ends at byte {start + hi})")
            window = mmap.mmap(f.fileno(), start + hi - base, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        count = (hi - lo) // dtype.itemsize
        return torch.frombuffer(window, dtype=dtype, count=count,
                                offset=start + lo - base).view(shape)

    def _layout(self, name: str):
        """``(data start, {key: (torch dtype or None, shape, begin, end)})`` of one file, from
        its header (already validated by safetensors when the checkpoint was opened)."""
        if name not in self._layouts:
            with open(self.path / name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                head = json.loads(f.read(n))
            head.pop("__metadata__", None)
            self._layouts[name] = (8 + n, {
                k: (_TORCH_DTYPES.get(v["dtype"]), tuple(v["shape"]), *v["data_offsets"])
                for k, v in head.items()})
        return self._layouts[name]


Entry = tuple[str, tuple[int, ...], torch.dtype]

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def header(entries: Sequence[Entry]) -> bytes:
    """Length prefix + JSON header of a safetensors file holding ``entries`` in order."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        end = offset + nbytes(shape, dtype)
        meta[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file: the header, then every tensor's bytes in
    order, through ``SequentialFile`` (``O_DIRECT`` where the filesystem allows: no page
    cache filled, no dirty-page throttling, memory bounded by its two buffers). Each tensor
    is made contiguous only while it is written (``safetensors.torch.save_file`` copies every
    tensor to ``bytes`` first)."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    head = header(entries)
    size = len(head) + sum(nbytes(shape, dtype) for _, shape, dtype in entries)
    out = SequentialFile(path, size_hint=size)
    try:
        out.write(head)
        for tensor in tensors.values():
            out.write(tensor)
    except BaseException:
        out.abort()
        raise
    out.close()


def _size_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HFWriter:
    """Collects tensors into safetensors shards of at most ``shard_bytes`` each inside
    ``directory``; ``finish()`` names the shards and writes the index. Tensors are held as
    given until their shard is written: do not change them before ``finish()``."""

    def __init__(self, directory: Path, shard_bytes: int = 5 * 2**30):
        self.dir = Path(directory)
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = _size_bytes(tensor)
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        if tensor.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        # held as given (a view of a live parameter costs nothing); each is made contiguous
        # on the CPU only while its bytes are written, so at most one such copy is alive
        self._pending[name] = tensor.detach()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = f"shard-{len(self._written):05d}.tmp"
        with writing(self.dir / tmp):
            write_file(self.dir / tmp, self._pending)
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        n = len(self._written)
        if n == 1:
            os.replace(self.dir / self._written[0][0], self.dir / SINGLE)
            return
        weight_map = {}
        for k, (tmp, keys) in enumerate(self._written):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: str | os.PathLike | None, dst: Path) -> None:
    """Copy tokenizer and generation files, when the source has them (contents only: the
    copies get the umask's permissions, like every other output file)."""
    if src is None:
        return
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)


def parse_size(size: int | str) -> int:
    """``"5GB" -> 5 * 10**9``, ``"512MiB" -> 512 * 2**20``, ints pass through; a size of
    less than one byte is refused (a shard size of 0 would put every tensor in a shard of its
    own)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m:
            raise ValueError(f"cannot read size {size!r}; write e.g. 5GB or 500MB")
        unit = m.group(2).rstrip("B") or "B"
        base = 1024 if unit.endswith("I") else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I") or "B"]
        n = int(float(m.group(1)) * base**power)
    if n < 1:
        raise ValueError(f"shard size {size!r} is not positive; write e.g. 5GB or 500MB")
    return n
