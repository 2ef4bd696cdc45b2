"""Megatron-Core distributed checkpoints (the ``torch_dist`` format) on disk: a writer that
streams chunks group by group and a reader of any box of any tensor, both on
``torch.distributed.checkpoint``'s file format; no megatron.core, no process group.

A checkpoint directory holds what ``megatron.core.dist_checkpointing.save`` writes::

    metadata.json    {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                      "common_backend": "torch", "common_backend_version": 1}
    common.pt        torch.save of the non-sharded part of the state dict ({} for a model)
    .metadata        pickled ``torch.distributed.checkpoint.Metadata``: for every key its
                     global shape, dtype and chunks, and the file, offset and length of each
    __0_<n>_0.distcp the chunks: each one ``torch.save``d, one file per ``write`` call

and, written by mbridge so that export needs nothing else::

    hf/              config.json, generation_config.json and tokenizer files of the HF model
    mbridge.json     {"format": 1, "model_spec": <ModelSpec>}

Bounded memory: ``McoreWriter.write`` writes its chunks to a new file at once and keeps only
their metadata, so a whole model is written one layer group at a time; ``finish`` writes the
index (``.metadata``) covering every file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mbridge.io.hf import CheckpointError, copy_side_files
from mbridge.sharding.dist_checkpoint import Region

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
HF_DIR = "hf"
INFO = "mbridge.json"


class _Source:
    """The planner half that ``FileSystemWriter.write_data`` asks for each item's data."""

    def __init__(self, data: dict[MetadataIndex, Any]):
        self.data = data

    def resolve_data(self, item: WriteItem):
        return self.data[item.index]


class McoreWriter:
    """Writes a ``torch_dist`` checkpoint into ``directory`` (empty, e.g. from ``atomic_dir``)
    chunk group by chunk group; ``finish()`` writes the metadata that makes it loadable."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        # fsync would dominate on page-cache-backed disks; atomicity comes from atomic_dir.
        self._fs = FileSystemWriter(self.dir, sync_files=False, thread_count=1)
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._results: list = []
        self._calls = 0

    def write(self, chunks: Sequence[tuple[Region, torch.Tensor]],
              objects: Mapping[str, Any] | None = None) -> int:
        """Write ``chunks`` (each tensor shaped as its region) and ``objects`` (stored as
        Megatron-Core stores ShardedObjects: ``torch.save([obj])``) to one new file.
        Returns the bytes of tensor data written."""
        items, data, nbytes = [], {}, 0
        for reg, tensor in chunks:
            if tuple(tensor.shape) != reg.shape:
                raise ValueError(f"chunk of {reg.key} has shape {list(tensor.shape)}, "
                                 f"its region {list(reg.shape)}")
            index = MetadataIndex(reg.key, torch.Size(reg.offset))
            props = TensorProperties.create_from_tensor(tensor)
            chunk = ChunkStorageMetadata(torch.Size(reg.offset), torch.Size(reg.shape))
            self._tensor_md(reg, props).chunks.append(chunk)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk, props,
                                                               torch.Size(reg.global_shape))))
            data[index] = tensor.detach().contiguous()
            nbytes += tensor.numel() * tensor.element_size()
        for key, obj in (objects or {}).items():
            buffer = io.BytesIO()
            torch.save([obj], buffer)
            index = MetadataIndex(key)
            items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            data[index] = buffer
            self._objects[key] = BytesStorageMetadata()
        plan = SavePlan(items, storage_data=_StoragePrefix(f"__0_{self._calls}_"))
        self._calls += 1
        self._results += self._fs.write_data(plan, _Source(data)).wait()
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
        """Write ``.metadata``, ``metadata.json`` and ``common.pt``."""
        metadata = Metadata(state_dict_metadata={**self._tensors, **self._objects})
        self._fs.finish(metadata, [self._results])
        (self.dir / "metadata.json").write_text(json.dumps(BACKEND))
        torch.save(common or {}, self.dir / "common.pt")


class _Target:
    """The planner half that ``FileSystemReader.read_data`` copies each read into."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item):
        view = self.out
        for axis, (lo, n) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(axis, lo, n)
        return view

    def commit_tensor(self, item, tensor) -> None:
        pass


class McoreReader:
    """Read-only view of a ``torch_dist`` checkpoint: any box of any tensor, whatever chunks
    it was written in (by this writer, or by Megatron-Core at any TP/PP). Validates on open
    that it is a torch_dist checkpoint whose data files exist inside the directory."""

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
        self._reader = FileSystemReader(self.path)
        try:
            self.metadata: Metadata = self._reader.read_metadata()
        except Exception as e:  # pickle and file errors alike
            raise CheckpointError(f"cannot read {self.path / '.metadata'}: {e}") from None
        self._reader.set_up_storage_reader(self.metadata, True)
        self._check_files()

    def _check_files(self) -> None:
        root = self.path.resolve()
        for name in {info.relative_path for info in self.metadata.storage_data.values()}:
            target = (self.path / name).resolve()
            if root not in target.parents:
                raise CheckpointError(f"{self.path} metadata names {name!r}, outside the directory")
            if not target.is_file():
                raise CheckpointError(f"{self.path} metadata names {name!r}, which does not exist")

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
        out = torch.empty(tuple(shape), dtype=md.properties.dtype)
        want = ChunkStorageMetadata(torch.Size(offset), torch.Size(shape))
        items = create_read_items_for_chunk_list(key, md, [want])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != out.numel():
            raise CheckpointError(f"{self.path} holds only {covered} of the {out.numel()} "
                                  f"elements of {key!r} at {list(offset)}+{list(shape)}")
        try:
            self._reader.read_data(LoadPlan(items), _Target(out)).wait()
        except Exception as e:  # truncated or corrupt data files
            raise CheckpointError(f"cannot read {key!r} from {self.path}: {e}") from None
        return out

    def read_region(self, reg: Region) -> torch.Tensor:
        return self.read(reg.key, reg.offset, reg.shape)


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
