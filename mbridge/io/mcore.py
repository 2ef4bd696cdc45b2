"""Megatron-Core distributed checkpoints (the ``torch_dist`` format) on disk: a writer that
streams chunks group by group and a reader of any box of any tensor, both on
``torch.distributed.checkpoint``'s file format; no megatron.core, no process group.

A checkpoint directory holds what ``megatron.core.dist_checkpointing.save`` writes::

    metadata.json    {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                      "common_backend": "torch", "common_backend_version": 1}
    common.pt        torch.save of the non-sharded part of the state dict ({} for a model)
    .metadata        pickled ``torch.distributed.checkpoint.Metadata``: for every key its
                     global shape, dtype and chunks, and the file, offset and length of each
    __0_<n>.distcp   the chunks, each one ``torch.save``d at a page-aligned offset; one
                     file per ``write`` call (Megatron-Core names its files
                     ``__<rank>_<k>.distcp``; readers go by ``.metadata``)

and, written by mbridge so that export needs nothing else::

    hf/              config.json, generation_config.json and tokenizer files of the HF model
    mbridge.json     {"format": 1, "model_spec": <ModelSpec>}

Bounded memory: ``McoreWriter.write`` writes its chunks to a new file at once and keeps only
their metadata, so a whole model is written one layer group at a time; ``finish`` writes the
index (``.metadata``) covering every file. ``McoreReader`` memory-maps chunks it can (see
``torch_record``), so reading costs no copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult

from mbridge.io.hf import CheckpointError, copy_side_files, inside
from mbridge.io.output import writing
from mbridge.io.safe_load import check_pickles, read_metadata
from mbridge.io.torch_record import Window, map_record
from mbridge.sharding.dist_checkpoint import Region
from mbridge.train.cadence import checkpoint_name

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
HF_DIR = "hf"
INFO = "mbridge.json"


ALIGN = 4096  # each record starts page-aligned, so its data (64-aligned inside) can be mapped


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage is exactly its bytes (``torch.save`` writes
    whole storages, so a view would drag its base along)."""
    nbytes = tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if storage.size() == nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    alias = torch.empty(0, dtype=tensor.dtype)
    return alias.set_(storage[start:start + nbytes], 0, tensor.shape, tensor.stride())


class McoreWriter:
    """Writes a ``torch_dist`` checkpoint into ``directory`` (empty, e.g. from ``atomic_dir``)
    chunk group by chunk group; ``finish()`` writes the metadata that makes it loadable.

    Records are laid out as ``FileSystemWriter`` lays them out (one ``torch.save`` archive
    per chunk, ``torch.save([obj])`` per object), each at a page-aligned offset."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._results: list[WriteResult] = []
        self._files = 0

    def write(self, chunks: Sequence[tuple[Region, torch.Tensor]],
              objects: Mapping[str, Any] | None = None) -> int:
        """Write ``chunks`` (each tensor shaped as its region) and ``objects`` (stored as
        Megatron-Core stores ShardedObjects) to one new file, at once. Returns the bytes of
        tensor data written. fsync is left out (it would dominate on page-cache-backed
        disks); atomicity comes from ``atomic_dir``."""
        records: list[tuple[MetadataIndex, Any]] = []
        nbytes = 0
        for reg, tensor in chunks:
            if tuple(tensor.shape) != reg.shape:
                raise ValueError(f"chunk of {reg.key} has shape {list(tensor.shape)}, "
                                 f"its region {list(reg.shape)}")
            props = TensorProperties.create_from_tensor(tensor)
            self._tensor_md(reg, props).chunks.append(
                ChunkStorageMetadata(torch.Size(reg.offset), torch.Size(reg.shape)))
            records.append((MetadataIndex(reg.key, torch.Size(reg.offset)),
                            _own_storage(tensor.detach().contiguous())))
            nbytes += tensor.numel() * tensor.element_size()
        for key, obj in (objects or {}).items():
            self._objects[key] = BytesStorageMetadata()
            records.append((MetadataIndex(key), [obj]))
        name = f"__0_{self._files}.distcp"
        self._files += 1
        # torch.load does not check a record's zip CRC32, and computing it costs about a
        # tenth of the write.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with writing(self.dir / name), open(self.dir / name, "wb") as f:
                for index, value in records:
                    f.write(bytes(-f.tell() % ALIGN))
                    offset = f.tell()
                    torch.save(value, f)
                    length = f.tell() - offset
                    self._results.append(WriteResult(index=index, size_in_bytes=length,
                                                     storage_data=_StorageInfo(name, offset,
                                                                               length)))
        finally:
            torch.serialization.set_crc32_options(crc)
        return nbytes

    def _tensor_md(self, reg: Region, props: TensorProperties) -> TensorStorageMetadata:
        md = self._tensors.setdefault(
            reg.key, TensorStorageMetadata(props, torch.Size(reg.global_shape), []))
        if md.size != torch.Size(reg.global_shape) or md.properties.dtype != props.dtype:
            raise ValueError(f"{reg.key}: chunks disagree on global shape or dtype "
                             f"({list(md.size)} {md.properties.dtype} vs "
                             f"{list(reg.global_shape)} {props.dtype})")
        return md

    def finish(self, common: dict | None = None) -> None:
        """Write ``.metadata`` (through ``FileSystemWriter.finish``, which stamps the DCP
        version), ``metadata.json`` and ``common.pt``."""
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._objects})
        with writing(self.dir / ".metadata"):
            FileSystemWriter(self.dir, sync_files=False).finish(metadata, [self._results])
        with writing(self.dir / "metadata.json"):
            (self.dir / "metadata.json").write_text(json.dumps(BACKEND))
        with writing(self.dir / "common.pt"):
            torch.save(common or {}, self.dir / "common.pt")


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for axis, (lo, n) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(axis, lo, n)
    return tensor


class McoreReader:
    """Read-only view of a ``torch_dist`` checkpoint: any box of any tensor, whatever chunks
    it was written in (by this writer, or by Megatron-Core at any TP/PP). Validates on open
    that it is a torch_dist checkpoint whose data files exist inside the directory and whose
    pickles (``.metadata``, ``common.pt``, object records) hold nothing that runs code."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        meta = self.path / "metadata.json"
        if not meta.is_file():
            raise CheckpointError(f"{self.path} is not a Megatron-Core distributed checkpoint "
                                  "(no metadata.json)")
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{meta} is not valid JSON: {e}") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{self.path} has sharded_backend={backend!r}; only "
                                  "torch_dist checkpoints can be read")
        self.metadata: Metadata = read_metadata(self.path)  # runs no code: safe_load
        self._check_files()
        check_pickles(self.path, self.metadata)

    def _check_files(self) -> None:
        ends: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                           info.offset + info.length)
        for name, end in ends.items():
            target = inside(self.path, name, f"{self.path} metadata names")
            if not target.is_file():
                raise CheckpointError(f"{self.path} metadata names {name!r}, which does not exist")
            if target.stat().st_size < end:
                raise CheckpointError(f"{target} is truncated: {target.stat().st_size} bytes, "
                                      f"the metadata needs {end}")

    def keys(self) -> tuple[str, ...]:
        """Tensor keys (objects and non-tensor entries left out)."""
        return tuple(k for k, v in self.metadata.state_dict_metadata.items()
                     if isinstance(v, TensorStorageMetadata))

    def _md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"tensor {key!r} is missing from {self.path}")
        return md

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._md(key).properties.dtype

    def read(self, key: str, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """The box of ``key`` at ``offset`` of ``shape``; reads only the chunks it overlaps."""
        md = self._md(key)
        if any(o < 0 or o + n > s for o, n, s in zip(offset, shape, md.size, strict=True)):
            raise CheckpointError(f"box {list(offset)}+{list(shape)} is outside {key!r} of "
                                  f"shape {list(md.size)} in {self.path}")
        want = ChunkStorageMetadata(torch.Size(offset), torch.Size(shape))
        items = create_read_items_for_chunk_list(key, md, [want])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != torch.Size(shape).numel():
            raise CheckpointError(f"{self.path} holds only {covered} of the "
                                  f"{torch.Size(shape).numel()} elements of {key!r} at "
                                  f"{list(offset)}+{list(shape)}")
        if any(self.metadata.storage_data[i.storage_index].transform_descriptors for i in items):
            raise CheckpointError(f"{self.path} stores {key!r} with stream transforms "
                                  "(e.g. compression), which mbridge cannot read")
        try:
            if len(items) == 1:  # one stored chunk holds the box: no copy
                return self._load_chunk(items[0])
            out = torch.empty(tuple(shape), dtype=md.properties.dtype)
            for item in items:  # chunks written at another layout: assemble
                _narrow(out, item.dest_offsets, item.lengths).copy_(self._load_chunk(item))
            return out
        except Exception as e:  # truncated or corrupt data files
            raise CheckpointError(f"cannot read {key!r} from {self.path}: {e}") from None

    def _load_chunk(self, item) -> torch.Tensor:
        """The stored chunk ``item`` reads, narrowed to the item: memory-mapped when
        ``map_record`` can, else ``torch.load``ed (``FileSystemReader``'s own steps minus the
        copy into a destination tensor)."""
        info = self.metadata.storage_data[item.storage_index]
        with open(self.path / info.relative_path, "rb") as stream:
            chunk = map_record(stream, info.offset, info.length)
            if chunk is None:
                chunk = torch.load(Window(stream, info.offset, info.length), map_location="cpu",
                                   weights_only=True)
        return _narrow(chunk, item.storage_offsets, item.lengths)

    def read_region(self, reg: Region) -> torch.Tensor:
        return self.read(reg.key, reg.offset, reg.shape)


TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's, in a training save directory


def tracked_step(directory: str | os.PathLike) -> int | None:
    """The step a save directory's tracker names, or None without a tracker;
    CheckpointError if it holds something else."""
    tracker = Path(directory) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold a step number, holds {text[:40]!r}")
    return int(text)


def resolve(directory: str | os.PathLike) -> Path:
    """``directory`` itself when it holds a checkpoint (``metadata.json``); for a training
    run's save directory (Megatron-LM's layout), the iteration its
    ``latest_checkpointed_iteration.txt`` names: ``save/`` -> ``save/iter_0000010``."""
    path = Path(directory)
    step = None if (path / "metadata.json").is_file() else tracked_step(path)
    return path if step is None else path / checkpoint_name(step)


def write_hf_files(directory: str | os.PathLike, hf_config: dict[str, Any],
                   model_spec_json: bytes, source: str | os.PathLike | None = None) -> None:
    """Store the HF config (plus tokenizer and generation files from ``source``) under
    ``hf/`` and the ModelSpec in ``mbridge.json``, so export needs nothing else."""
    hf = Path(directory) / HF_DIR
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    copy_side_files(source, hf)
    info = {"format": 1, "model_spec": json.loads(model_spec_json)}
    (Path(directory) / INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The HF config stored in a checkpoint by ``write_hf_files``, or in a plain HF directory."""
    path = Path(directory)
    cfg = path / HF_DIR / "config.json" if (path / HF_DIR).is_dir() else path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path} has no {HF_DIR}/config.json; pass the HF config "
                              "directory explicitly (--hf-config)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
